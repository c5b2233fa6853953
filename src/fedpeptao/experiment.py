"""Build an experiment from its config: backbone, tuned model, tokenised data, partitions, algorithm.

Both runtimes call :func:`build_federation` (devices) and :func:`make_run_algorithm` (server), so
the embedded simulator and a Flower deployment start from the same frozen backbone, the same
initial tuning tensors (seeded by ``cfg.seed``), the same tokenised data, the same partition and
the same algorithm: the basis of their equality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpeptao.algorithms import Algorithm, ServerContext, make_algorithm
from fedpeptao.config import ExperimentConfig
from fedpeptao.core.client import LocalTrainConfig
from fedpeptao.core.federation import averaging
from fedpeptao.core.metrics import MetricName, metric_for_task
from fedpeptao.data.dataset import TextDataset
from fedpeptao.data.encoding import EncodedDataset, default_label_words, encode, label_word_ids
from fedpeptao.data.partition import partition
from fedpeptao.data.tasks import load_splits
from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.models.loading import Backbone, default_head, load_backbone
from fedpeptao.prompts.prefix import max_text_length
from fedpeptao.tunings import build_tuning

Tensors = dict[str, torch.Tensor]


def resolve_head(cfg: ExperimentConfig, backbone: Backbone) -> str:
    return default_head(backbone.kind) if cfg.model.head == "auto" else cfg.model.head


def local_config(cfg: ExperimentConfig) -> LocalTrainConfig:
    c = cfg.client
    return LocalTrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                            max_grad_norm=c.max_grad_norm, optimizer=c.optimizer, reset_optimizer=c.reset_optimizer)


def prompt_tokens(cfg: ExperimentConfig) -> int:
    """Positions the tuning prepends to every sequence (deep prompts shift none of the text)."""
    return getattr(cfg.tuning, "num_prompt_tokens", 0)


@dataclass
class Federation:
    """One tuned model plus every client's data, as a device (or the simulator) holds them.

    ``initial`` is a copy of the freshly initialised trainable tensors: what every client starts from.
    """

    cfg: ExperimentConfig
    model: PromptedClassifier
    initial: Tensors
    train_data: EncodedDataset
    eval_data: EncodedDataset
    train_parts: list[np.ndarray]
    eval_parts: list[np.ndarray]
    local_cfg: LocalTrainConfig
    metric: MetricName
    num_labels: int
    backbone: Backbone
    head: str
    train_set: TextDataset
    eval_set: TextDataset


def build_federation(cfg: ExperimentConfig, backbone: Backbone | None = None, own_data: bool = False) -> Federation:
    """Everything a device needs, built from its config. ``own_data``: the data set is one client's, not partitioned."""
    torch.manual_seed(cfg.seed)
    backbone = backbone or load_backbone(cfg.model.name, head=cfg.model.head)
    head = resolve_head(cfg, backbone)
    train_set, eval_set = load_splits(cfg.data, cfg.seed)
    tokenizer = backbone.tokenizer
    words = None
    if head in ("mlm", "lm"):
        words = cfg.model.label_words or default_label_words(train_set.label_names, train_set.is_pair)
        if len(words) != train_set.num_labels:
            raise ValueError(f"model.label_words: expected {train_set.num_labels} words, got {len(words)}")
    model = build_tuning(cfg.tuning, backbone.model, head, train_set.num_labels,
                         label_word_ids(tokenizer, words, head) if words else None, cfg.seed)
    length = max_text_length(backbone.model, prompt_tokens(cfg), cfg.model.max_length)
    train_data = encode(train_set, tokenizer, head, length, cfg.model.template)
    eval_data = encode(eval_set, tokenizer, head, length, cfg.model.template)
    if own_data:
        train_parts = [np.arange(len(train_set), dtype=np.int64)]
        eval_parts = [np.arange(len(eval_set), dtype=np.int64)]
    else:
        train_parts, eval_parts = partition(
            train_set.labels, eval_set.labels, cfg.data.partition, cfg.federated.num_clients, cfg.data.alpha,
            cfg.seed, min_size=2, size_alpha=cfg.data.size_alpha)
    return Federation(cfg, model, model.trainable_state(), train_data, eval_data, train_parts, eval_parts,
                      local_config(cfg), metric_for_task(cfg.data.task), train_set.num_labels,
                      backbone, head, train_set, eval_set)


def server_context(cfg: ExperimentConfig, layer_groups: dict[int, list[str]], head_names: list[str]) -> ServerContext:
    return ServerContext(num_clients=cfg.federated.num_clients, local_lr=cfg.client.lr, seed=cfg.seed,
                         rounds=cfg.federated.rounds, layer_groups=layer_groups, head_names=head_names,
                         average=averaging(cfg.server.aggregation, cfg.server.trim_ratio))


def make_run_algorithm(cfg: ExperimentConfig, initial: Tensors, layer_groups: dict[int, list[str]],
                       head_names: list[str]) -> Algorithm:
    """The configured algorithm at its start, from what the server knows (names, not the model)."""
    return make_algorithm(cfg.method, server_context(cfg, layer_groups, head_names), initial)


def device_algorithm(cfg: ExperimentConfig, fed: Federation) -> Algorithm:
    """The same algorithm on a device: its client hooks, with the device's model groups."""
    return make_run_algorithm(cfg, fed.initial, fed.model.layer_groups(), fed.model.head_names())

"""Build a device's model and data from an ExperimentConfig exactly as the embedded simulator does.

Equality between a Flower run and the simulator rests on both building the same frozen backbone,
the same initial prompts (seeded by ``cfg.seed``), the same tokenised data and the same partition.
:func:`build_federation` is that construction, step for step the one in
``Simulation.__init__`` (which could call it instead of repeating it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedpeptao.config import ExperimentConfig, SelectionConfig
from fedpeptao.core.client import LocalTrainConfig
from fedpeptao.core.metrics import MetricName, metric_for_task
from fedpeptao.core.scoring import select_layers
from fedpeptao.data.encoding import EncodedDataset, default_label_words, encode, label_word_ids
from fedpeptao.data.partition import partition
from fedpeptao.data.tasks import load_splits
from fedpeptao.models.classifier import PROMPT_PREFIX, PromptedClassifier
from fedpeptao.models.registry import Backbone, load_backbone
from fedpeptao.prompts.prefix import max_text_length
from fedpeptao.sim.simulator import local_config, resolve_head

Tensors = dict[str, torch.Tensor]


@dataclass
class Federation:
    """One prompted model plus every client's data, as the simulator holds them.

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


def build_federation(cfg: ExperimentConfig, backbone: Backbone | None = None, own_data: bool = False) -> Federation:
    """The simulator's construction. ``own_data``: the data set is one client's, not partitioned."""
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
    model = PromptedClassifier(
        backbone.model, head, train_set.num_labels, cfg.model.num_prompt_tokens,
        label_word_ids(tokenizer, words, head) if words else None, cfg.model.prompt_dropout, seed=cfg.seed)
    length = max_text_length(backbone.model, cfg.model.num_prompt_tokens, cfg.model.max_length)
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
                      local_config(cfg), metric_for_task(cfg.data.task), train_set.num_labels)


@lru_cache(maxsize=1)
def cached_federation(experiment_json: str, model_path: str | None, data_path: str | None) -> Federation:
    """The last federation built in this process, keyed by everything that determines it.

    Not client state: a Flower worker that serves many simulated clients reuses the frozen backbone
    and the tokenised data, as the embedded simulator does. Every client operation first loads all
    of that client's trainable tensors into the model (or the fresh ``initial`` ones), so nothing of
    one client can leak into another's work.
    """
    cfg = ExperimentConfig.model_validate_json(experiment_json)
    if model_path or data_path:
        cfg = cfg.model_copy(deep=True)
        if model_path:
            cfg.model.name = model_path
        if data_path:
            cfg.data = cfg.data.model_copy(update={"task": data_path, "train_file": None, "eval_file": None})
    return build_federation(cfg, own_data=data_path is not None)


# -- which prompt layers travel (the server needs no model for this) ---------------------------

def layer_names(params: Tensors, layers: list[int]) -> list[str]:
    """Parameter names of the given prompt layers (``PromptedClassifier.layer_names`` from names alone)."""
    return [f"{PROMPT_PREFIX}{i}" for i in layers if f"{PROMPT_PREFIX}{i}" in params]


def head_names(params: Tensors) -> list[str]:
    return [name for name in params if not name.startswith(PROMPT_PREFIX)]


def choose_layers(sel: SelectionConfig, ranking: list[int], estimate_ratio: Callable[[], float]
                  ) -> tuple[float, list[int]]:
    """``(ratio, layers)`` under SPEC 2: explicit layers, a fixed ratio, or an estimated one.

    Same rule as ``Simulation.select``; ``estimate_ratio`` is only called for ``ratio = "auto"``.
    """
    num_layers = len(ranking)
    if sel.layers is not None:
        bad = [i for i in sel.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"selection.layers: {bad} outside 0..{num_layers - 1}")
        return len(set(sel.layers)) / num_layers, sorted(set(sel.layers))
    ratio = estimate_ratio() if sel.ratio == "auto" else float(sel.ratio)
    return ratio, select_layers(ranking, ratio)


def resolve_data_path(path: Path) -> str:
    """A node's own data must be a task folder; say so plainly otherwise."""
    if not path.is_dir():
        raise FileNotFoundError(f"node config 'data-path': {path} is not a folder with train and dev/test tables")
    return str(path.resolve())

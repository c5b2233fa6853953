"""Build an experiment from its config: backbone, tuned model, tokenised data, partitions, algorithm.

Both runtimes call :func:`build_federation` (devices) and :func:`make_run_algorithm` (server), so
the embedded simulator and a Flower deployment start from the same frozen backbone, the same
initial tuning tensors (seeded by ``cfg.seed``), the same tokenised data, the same partition and
the same algorithm: the basis of their equality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpeptao.algorithms import Algorithm, ServerContext, make_algorithm
from fedpeptao.config import ExperimentConfig
from fedpeptao.core.aggregation import averaging
from fedpeptao.core.client import LocalTrainConfig
from fedpeptao.core.metrics import MetricName, default_metric
from fedpeptao.data.dataset import TextDataset
from fedpeptao.data.encoding import EncodedDataset, default_label_words, encode, label_word_ids
from fedpeptao.data.partition import follow_groups, name_list, natural, partition
from fedpeptao.data.instruct import InstructDataset, encode_instruct, load_instruct_splits
from fedpeptao.data.tasks import load_splits
from fedpeptao.models.tuned import TunedModel
from fedpeptao.models.loading import Backbone, default_head, load_backbone, load_random_backbone
from fedpeptao.privacy.engine import ClientPrivacy
from fedpeptao.prompts.prefix import max_text_length
from fedpeptao.tasks import task_class
from fedpeptao.tunings import build_model
from fedpeptao.utils.device import DTYPES, resolve_device

Tensors = dict[str, torch.Tensor]


def resolve_head(cfg: ExperimentConfig, backbone: Backbone) -> str:
    return default_head(backbone.kind) if cfg.model.head == "auto" else cfg.model.head


def local_config(cfg: ExperimentConfig) -> LocalTrainConfig:
    c = cfg.client
    return LocalTrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                            max_grad_norm=c.max_grad_norm, optimizer=c.optimizer, reset_optimizer=c.reset_optimizer,
                            group_by_length=c.group_by_length)


def prompt_tokens(cfg: ExperimentConfig) -> int:
    """Positions the tuning prepends to every sequence (deep prompts shift none of the text)."""
    return getattr(cfg.tuning, "num_prompt_tokens", 0)


@dataclass
class Federation:
    """One tuned model plus every client's data, as a device (or the simulator) holds them.

    ``initial`` is a copy of the freshly initialised trainable tensors: what every client starts from.
    """

    cfg: ExperimentConfig
    model: TunedModel
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
    label_words: list[str] | None = None
    val_data: EncodedDataset | None = None  # the validation examples (``train_data`` when held out)
    val_parts: list[np.ndarray] | None = None  # each client's validation examples in ``val_data``
    splits: dict[str, str] | None = None  # where each role's examples come from, for the summary


@dataclass
class BuiltModel:
    """The tuned model around a backbone, and how it reads text (what a trained run is rebuilt from)."""

    model: TunedModel
    head: str  # the task's name
    label_words: list[str] | None
    max_length: int  # text tokens per example, after the tuning's prompt positions


def build_tuned_model(cfg: ExperimentConfig, backbone: Backbone, label_names: list[str], is_pair: bool) -> BuiltModel:
    """The configured tuning on ``backbone``, read by the configured task for these labels; its
    initial tensors seeded by ``cfg.seed``."""
    head = resolve_head(cfg, backbone)
    task_type = task_class(head)
    words = ids = None
    if task_type.label_words:  # (a generative task reads no classes: label_names are its answers)
        words = cfg.model.label_words or default_label_words(label_names, is_pair)
        if len(words) != len(label_names):
            raise ValueError(f"model.label_words: expected {len(label_names)} words, got {len(words)}")
        ids = label_word_ids(backbone.tokenizer, words, task_type.layout)
    model = build_model(cfg.tuning, backbone.model, task_type(backbone.model, len(label_names), ids), cfg.seed)
    place(model, cfg)
    return BuiltModel(model, head, words, max_text_length(backbone.model, prompt_tokens(cfg), cfg.model.max_length))


def place(model: TunedModel, cfg: ExperimentConfig) -> None:
    """Frozen tensors in ``cfg.precision``, trainable ones in float32, all on ``cfg.device``.

    The tuning is initialised before the cast, so its initial tensors (and hence the run) start
    the same in every precision for the same seed.
    """
    dtype = DTYPES[cfg.precision]
    for param in model.parameters():
        if param.dtype.is_floating_point:
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
    model.to(resolve_device(cfg.device))
    if cfg.model.gradient_checkpointing:
        backbone = model.model
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.24's name
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_configured_backbone(cfg: ExperimentConfig) -> Backbone:
    """The run's backbone: pretrained weights, or (``model.random_init``) an architecture untrained."""
    if cfg.model.random_init:
        return load_random_backbone(cfg.model.name, cfg.model.head, seed=cfg.seed)
    if cfg.model.quantization != "none":  # quantized while loading, on its device, computing in the run's precision
        return load_backbone(cfg.model.name, head=cfg.model.head, dtype=DTYPES[cfg.precision],
                             quantization=cfg.model.quantization, device=resolve_device(cfg.device))
    return load_backbone(cfg.model.name, head=cfg.model.head)


def build_federation(cfg: ExperimentConfig, backbone: Backbone | None = None, own_data: bool = False) -> Federation:
    """Everything a device needs, built from its config. ``own_data``: the data set is one client's, not partitioned."""
    torch.manual_seed(cfg.seed)
    backbone = backbone or load_configured_backbone(cfg)
    generative = task_class(resolve_head(cfg, backbone)).generative
    load = load_instruct_splits if generative else load_splits
    train_set, val_set, eval_set = load(cfg.data, cfg.data_seed())
    # (partitioned before any model or token is built, so a partition that cannot work fails at once)
    train_parts, eval_parts, val_parts, groups = client_parts(cfg, train_set, eval_set, val_set, own_data)
    tokenizer = backbone.tokenizer
    built = build_tuned_model(cfg, backbone, train_set.label_names, train_set.is_pair)
    model, head, length = built.model, built.head, built.max_length

    def encode_split(dataset):
        if generative:
            return encode_instruct(dataset, tokenizer, length, model=backbone.model)
        return encode(dataset, tokenizer, model.task.layout, length, cfg.model.template)

    train_data, eval_data = encode_split(train_set), encode_split(eval_set)
    if val_set is not None:
        val_data = encode_split(val_set)
        validation = f"validation split ({val_set.source or 'dev'})"
    else:
        train_parts, val_parts = hold_out(train_parts, cfg.data.validation_fraction, cfg.data_seed())
        val_data = train_data
        validation = f"{cfg.data.validation_fraction:g} of each client's training data, held out (seeded)"
    splits = {"validation": validation, "test": f"test split ({eval_set.source or cfg.data.task})"}
    if groups is not None:
        splits["clients"] = f"one per {cfg.data.partition_by}, client k the k-th in sorted order: {name_list(groups)}"
    metric = cfg.data.metric or ("exact_match" if generative else default_metric(train_set.layout))
    return Federation(cfg, model, model.trainable_state(), train_data, eval_data, train_parts, eval_parts,
                      local_config(cfg), metric, len(train_set.label_names),
                      backbone, head, train_set, eval_set, built.label_words, val_data, val_parts, splits)


Parts = list[np.ndarray]  # one index array per client
Examples = TextDataset | InstructDataset


def client_parts(cfg: ExperimentConfig, train_set: Examples, eval_set: Examples, val_set: Examples | None,
                 own_data: bool = False) -> tuple[Parts, Parts, Parts | None, list[str] | None]:
    """Each client's indices into the training, test and validation split (None without a
    validation split: :func:`hold_out` then takes it from the training parts), and with
    ``data.partition=natural`` the group each client is (else None). ``own_data``: one client
    holding everything."""
    if own_data:
        def whole(dataset: Examples) -> Parts:
            return [np.arange(len(dataset), dtype=np.int64)]

        return whole(train_set), whole(eval_set), None if val_set is None else whole(val_set), None
    if cfg.data.partition == "natural":
        return natural_parts(cfg, train_set, eval_set, val_set)

    def by_labels(held: Examples) -> tuple[Parts, Parts]:  # the held split follows the training split's label mix
        return partition(train_set.labels, held.labels, cfg.data.partition, cfg.federated.num_clients,
                         cfg.data.alpha, cfg.data_seed(), min_size=2, size_alpha=cfg.data.size_alpha)

    train_parts, eval_parts = by_labels(eval_set)
    return train_parts, eval_parts, None if val_set is None else by_labels(val_set)[1], None


def natural_parts(cfg: ExperimentConfig, train_set: InstructDataset, eval_set: InstructDataset,
                  val_set: InstructDataset | None) -> tuple[Parts, Parts, Parts | None, list[str]]:
    """Clients as the data come grouped (``data.partition_by``: a subject, a source): a federation
    that exists rather than one drawn from the labels. Test and validation examples go to the client
    of their group, so each client is scored on its own kind of data; no seed is involved."""
    column = cfg.data.partition_by

    def values(dataset: InstructDataset) -> list[str]:  # (groups() names the columns there are if it is missing)
        ids, names = dataset.groups(column)
        return [names[i] for i in ids]

    train_parts, names = natural(values(train_set), cfg.federated.num_clients, column)

    def follow(dataset: InstructDataset | None, split: str) -> Parts | None:
        if dataset is None:
            return None
        return follow_groups(names, values(dataset), column, f"the {split} split ({dataset.source or split})")

    return train_parts, follow(eval_set, "test"), follow(val_set, "validation"), names


def hold_out(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's training indices into (train, validation): a seeded ``fraction`` of
    each client's own examples (rounded down, and never the client's last two), so validation
    follows the clients' non-IID mix and no example is in both."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    train, validation = [], []
    for part in parts:
        order = rng.permutation(part)
        count = min(int(fraction * len(part)), max(0, len(part) - 2))
        validation.append(np.sort(order[:count]))
        train.append(np.sort(order[count:]))
    return train, validation


def server_context(cfg: ExperimentConfig, layer_groups: dict[int, list[str]], head_names: list[str],
                   privacy: ClientPrivacy | None = None) -> ServerContext:
    private = privacy is not None and cfg.private_releases() > 0
    return ServerContext(num_clients=cfg.federated.num_clients, local_lr=cfg.client.lr, seed=cfg.seed,
                         rounds=cfg.federated.rounds, layer_groups=layer_groups, head_names=head_names,
                         average=averaging(cfg.server.aggregation, cfg.server.trim_ratio),
                         private_mean=privacy.private_mean if private else None)


def make_run_algorithm(cfg: ExperimentConfig, initial: Tensors, layer_groups: dict[int, list[str]],
                       head_names: list[str], privacy: ClientPrivacy | None = None) -> Algorithm:
    """The configured algorithm at its start, from what the server knows (names, not the model);
    ``privacy`` is the run's DP mechanism, when it releases the algorithm's selection privately."""
    return make_algorithm(cfg.method, server_context(cfg, layer_groups, head_names, privacy), initial)


def make_privacy(cfg: ExperimentConfig) -> ClientPrivacy | None:
    """The run's client-level DP mechanism and accountant (None with ``privacy.mode=none``)."""
    if not cfg.privacy.enabled:
        return None
    fed = cfg.federated
    return ClientPrivacy(cfg.privacy, fed.num_clients, fed.clients_per_round, cfg.seed, cfg.noise_multiplier())


def public_selection_data(cfg: ExperimentConfig, fed: Federation) -> tuple[EncodedDataset, np.ndarray] | None:
    """``privacy.public_data``'s training split, encoded like the run's data, for selection that
    costs no privacy (``privacy.selection=public``); None when selection reads the clients' data."""
    privacy = cfg.privacy
    if not privacy.public_selection:
        return None
    data_cfg = cfg.data.model_copy(update={"task": privacy.public_data, "train_file": None, "eval_file": None,
                                           "validation_file": None, "max_train_examples": privacy.public_examples,
                                           "max_eval_examples": 1})
    public, _, _ = load_splits(data_cfg, cfg.seed)
    if public.label_names != fed.train_set.label_names:
        raise ValueError(f"privacy.public_data: its labels {public.label_names} differ from the task's "
                         f"{fed.train_set.label_names}")
    length = max_text_length(fed.backbone.model, prompt_tokens(cfg), cfg.model.max_length)
    encoded = encode(public, fed.backbone.tokenizer, fed.model.task.layout, length, cfg.model.template)
    return encoded, np.arange(len(public), dtype=np.int64)


def device_algorithm(cfg: ExperimentConfig, fed: Federation, privacy: ClientPrivacy | None = None) -> Algorithm:
    """The same algorithm on a device: its client hooks, with the device's model groups (the
    simulator's also serves as the server, with the run's ``privacy``)."""
    return make_run_algorithm(cfg, fed.initial, fed.model.layer_groups(), fed.model.head_names(), privacy)


MODEL_CARD = "model.json"
MODEL_FORMAT = "fedpeptao-model"


def write_model_card(run_dir: Path, cfg: ExperimentConfig, fed: Federation, clients: list[int],
                     personal: list[str]) -> Path:
    """``model.json``: what a run's tensors belong to, so the model can be rebuilt and used.

    ``personal`` are the trainable tensors that never left the devices (FedPepTAO's unselected
    layers): a model with any is personal by construction, and only ``clients/<k>.safetensors``
    holds a complete one.
    """
    card = {
        "format": MODEL_FORMAT, "version": 1, "base_model": cfg.model.name, "head": fed.head,
        "tuning": cfg.tuning.model_dump(mode="json"), "method": cfg.method.name,
        "labels": fed.train_set.label_names, "pair": fed.train_set.is_pair, "label_words": fed.label_words,
        "template": cfg.model.template, "max_length": cfg.model.max_length, "metric": fed.metric,
        "clients": clients, "personal_tensors": personal, "seed": cfg.seed,
    }
    path = Path(run_dir) / MODEL_CARD
    path.write_text(json.dumps(card, indent=2))
    return path

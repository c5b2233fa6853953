"""The message protocol between the FedPepTAO ServerApp and ClientApp.

Four exchanges, each a Flower message type (``<category>.<action>``):

``query.setup``
    Server -> every node once, before round 0. The node builds its model and data, and replies with
    its client id, data sizes, its freshly initialised trainable tensors (the server checks that all
    nodes agree and starts from them, so the server never loads the language model or any data) and,
    for FedPepTAO, its layer scores.
``query.hessian``
    Server -> a few clients when FedPepTAO estimates the share ratio after the warm-up: the full
    global tensors and a probe seed; reply: the client's ratio.
``train``
    The global *shared* tensors (and, once after the switch to FedPepTAO, the warmed-up tensors
    that become the client's personal layers); reply: the client's shared tensors and step counts.
``evaluate``
    The global shared tensors; reply: a confusion matrix and summed loss on the client's eval data.

Every server message carries the whole ExperimentConfig as JSON and the method's name (a key of
``fedpeptao.baselines.methods.METHODS``), so the config file only has to exist on the SuperLink's
machine. For a baseline whose rule sends more than the model (SCAFFOLD: ``c`` down, ``dc_k`` up),
``global`` and ``update`` of ``train`` carry those tensors too, under the rule's name prefixes.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedpeptao.config import ExperimentConfig

SETUP, HESSIAN = "query.setup", "query.hessian"

# record names inside a message's RecordDict
CONFIG = "config"  # ConfigRecord: experiment JSON, round, ...
GLOBAL = "global"  # ArrayRecord: global tensors sent down
BASE = "base"  # ArrayRecord: warmed-up tensors a client adopts as its personal layers
UPDATE = "update"  # ArrayRecord: a client's shared tensors after local training
INIT = "init"  # ArrayRecord: a client's freshly initialised trainable tensors
METRICS = "metrics"  # MetricRecord: counts, losses, scores

# ConfigRecord keys
EXPERIMENT, ROUND, BASE_VERSION, PROBE_SEED, SCORE = "experiment", "round", "base-version", "probe-seed", "score"
METHOD = "method"


def experiment_json(cfg: ExperimentConfig) -> str:
    """Canonical JSON of a config (sorted keys), so equal configs give equal cache keys."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def config_record(cfg: ExperimentConfig, method: str, **values: int | float | str | bool) -> ConfigRecord:
    """The ConfigRecord every server message carries: the experiment and method plus per-message values."""
    return ConfigRecord({EXPERIMENT: experiment_json(cfg), METHOD: method, **values})


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Owned, writable tensors (the record's buffers are not ours to keep)."""
    return {name: tensor.clone() for name, tensor in record.to_torch_state_dict().items()}


def confusion(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> list[int]:
    """Row-major ``[true, predicted]`` counts: enough to recompute accuracy, MCC and F1 exactly."""
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return counts.reshape(-1).tolist()


def expand_confusion(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(preds, labels)`` arrays with the given ``[true, predicted]`` counts, for the metric functions."""
    num_labels = counts.shape[0]
    true, pred = np.meshgrid(np.arange(num_labels), np.arange(num_labels), indexing="ij")
    flat = counts.reshape(-1)
    return np.repeat(pred.reshape(-1), flat), np.repeat(true.reshape(-1), flat)

"""The message protocol between the ServerApp and the ClientApp, for any algorithm.

Four exchanges, each a Flower message type (``<category>.<action>``):

``query.setup``
    Server -> every node once, before round 0 (and to nodes that join later). The node builds its
    model and data and replies with its client id, data sizes, its freshly initialised trainable
    tensors (the server checks that all nodes agree and starts from them, so the server never
    loads the language model or any data) and the names of its per-layer and head tensors.
``query.task``
    A client-side computation an algorithm's phase asks for (its kind, round, stream and options
    in the config; the tensors to load in ``global``); reply: the algorithm's numbers as JSON.
``train``
    What the algorithm sends this client (``Algorithm.client_message``); reply: what the client's
    algorithm sends back (``Algorithm.client_reply``) and step counts.
``evaluate``
    The same message; reply: a confusion matrix and summed loss on the client's eval data.

Every server message carries the whole ExperimentConfig as JSON, so the config file only has to
exist on the SuperLink's machine, and the run's key, under which nodes keep this run's state.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedpeptao.config import ExperimentConfig

SETUP, TASK = "query.setup", "query.task"

# record names inside a message's RecordDict
CONFIG = "config"  # ConfigRecord: experiment JSON, round, ...
GLOBAL = "global"  # ArrayRecord: what the algorithm sends a client
UPDATE = "update"  # ArrayRecord: a client's shared tensors after local training
INIT = "init"  # ArrayRecord: a client's freshly initialised trainable tensors
METRICS = "metrics"  # MetricRecord: counts, losses, scores

# ConfigRecord keys
EXPERIMENT, ROUND, RUN_KEY, TASK_SPEC, RESULT = "experiment", "round", "run-key", "task", "result"


def experiment_json(cfg: ExperimentConfig) -> str:
    """Canonical JSON of a config (sorted keys), so equal configs give equal cache keys."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def config_record(cfg: ExperimentConfig, run_key: str, **values: int | float | str | bool) -> ConfigRecord:
    """The ConfigRecord every server message carries: the experiment and run key plus per-message values."""
    return ConfigRecord({EXPERIMENT: experiment_json(cfg), RUN_KEY: run_key, **values})


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Owned, writable tensors (the record's buffers are not ours to keep)."""
    return {name: tensor.clone() for name, tensor in record.to_torch_state_dict().items()}

"""The message protocol between the ServerApp and the ClientApp, for any algorithm.

Four exchanges, each a Flower message type (``<category>.<action>``):

``query.setup``
    Server -> every node once, before the first round (and to nodes that join later). The node builds its
    model and data and replies with its client id, data sizes, its freshly initialised trainable
    tensors (the server checks that all nodes agree and starts from them, so the server never
    loads the language model or any data) and the names of its per-layer and head tensors.
``query.task``
    A client-side computation an algorithm's phase asks for (its kind, round, stream and options
    in the config; the tensors to load in ``global``); reply: the algorithm's numbers as JSON.
``train``
    What the algorithm sends this client (``Algorithm.client_message``); reply: what the client's
    algorithm sends back (``Algorithm.client_reply``) and step counts. Under
    ``privacy.secure_aggregation`` the train messages are SecAgg+'s four stages
    (:mod:`fedpeptao.flower.secagg`) and the reply holds no tensors, only a masked vector.
``evaluate``
    The same message; reply, per split of the client's eval data: a confusion matrix
    (``<split>-confusion``), or for a generative task the generated answers' counts and the
    completion tokens (``<split>-generation-examples``, ``-exact``, ``-choice_examples``,
    ``-choice_correct``, ``-tokens``), and the summed loss (``<split>-loss-sum``).

An algorithm's :class:`~fedpeptao.core.payload.Message` travels as one ArrayRecord for its model
tensors (``global`` down, ``update`` up) and one more per extra group, named
``<record>.<group>`` (:func:`message_records`, :func:`read_message`).

Every server message carries the whole ExperimentConfig as JSON, so the config file only has to
exist on the SuperLink's machine, and the run's key, under which nodes keep this run's state.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedpeptao.config import ExperimentConfig
from fedpeptao.core.payload import Message

SETUP, TASK = "query.setup", "query.task"

# record names inside a message's RecordDict
CONFIG = "config"  # ConfigRecord: experiment JSON, round, ...
GLOBAL = "global"  # ArrayRecord: the model tensors the algorithm sends a client (or a task's tensors)
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


def message_records(name: str, message: Message) -> dict[str, ArrayRecord]:
    """``message`` as records of a RecordDict: its model tensors under ``name``, each extra group
    under ``<name>.<group>``."""
    records = {name: to_record(message.model)}
    records.update({f"{name}.{group}": to_record(tensors) for group, tensors in message.extras.items()})
    return records


def read_message(name: str, content: RecordDict) -> Message:
    """Inverse of :func:`message_records` on a received message's content."""
    prefix = f"{name}."
    extras = {key[len(prefix):]: from_record(record) for key, record in content.array_records.items()
              if key.startswith(prefix)}
    return Message(from_record(content[name]), extras)

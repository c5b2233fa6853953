"""Pieces of one federated round that do not depend on the algorithm or on how messages travel.

Both runtimes seed a client's work with :func:`round_seed` and keep a device's state in a
:class:`ClientState`, so the embedded simulator and the Flower app compute the same thing for the
same seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedpeptao.utils.state import State, add_prefix, take_prefix

Tensors = dict[str, torch.Tensor]

TRAIN_STREAM, SCORE_STREAM, HESSIAN_STREAM, PRIVACY_STREAM, COUNT_STREAM, ORDER_STREAM = 0, 1, 2, 3, 4, 5
QUANTIZE_STREAM = 6  # the simulator's stochastic rounding under secure aggregation


def round_seed(seed: int, round_index: int, client_id: int, stream: int = TRAIN_STREAM) -> int:
    """A seed for one client's work in one round, independent of the order clients run in.

    ``stream`` separates draws for different purposes (training, layer scoring, Hessian batches).
    """
    entropy = [seed, round_index, client_id] + ([stream] if stream != TRAIN_STREAM else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def batch_order_seed(seed: int, round_index: int) -> int:
    """The seed every client of round ``round_index`` orders its length-grouped batches with
    (shared, so the clients of one batched pass see batches of similar lengths at each step)."""
    return int(np.random.SeedSequence([seed, round_index, ORDER_STREAM]).generate_state(1)[0])


@dataclass
class ClientState:
    """What a device keeps between rounds: its trainable tensors, optimiser state and the
    algorithm's own per-device tensors (SCAFFOLD's ``c_k``, FedPepTAO's adopted base version)."""

    params: Tensors
    optimizer: dict | None = None  # torch's ``optimizer.state_dict()``
    rounds_trained: int = 0
    algo_state: dict = field(default_factory=dict)  # values: tensors or JSON values

    def state(self) -> State:
        """``(tensors, meta)`` (:mod:`fedpeptao.utils.state`): ``params/<name>``,
        ``optimizer/<param id>/<key>`` and ``algo_state/<key>`` tensors; the optimiser's param
        groups and any non-tensor values as JSON."""
        tensors = add_prefix("params", self.params)
        meta: dict[str, Any] = {"rounds_trained": self.rounds_trained, "optimizer": None, "algo_state": {}}
        for key, value in self.algo_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"algo_state/{key}"] = value
            else:
                meta["algo_state"][key] = value
        if self.optimizer is not None:
            meta["optimizer"] = {"param_groups": self.optimizer["param_groups"], "state": {}}
            for pid, entries in self.optimizer["state"].items():
                meta["optimizer"]["state"][str(pid)] = {}
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer/{pid}/{key}"] = value
                    else:
                        meta["optimizer"]["state"][str(pid)][key] = value
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> ClientState:
        """Inverse of :meth:`state` (an optimiser's hyper-parameter sequences come back as the
        tuples torch keeps them as, e.g. AdamW's ``betas``)."""
        optimizer = None
        if meta["optimizer"] is not None:
            saved = meta["optimizer"]
            state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in saved["state"].items()}
            for key, tensor in take_prefix(tensors, "optimizer").items():
                pid, _, name = key.partition("/")
                state.setdefault(int(pid), {})[name] = tensor
            groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in group.items()}
                      for group in saved["param_groups"]]
            optimizer = {"state": state, "param_groups": groups}
        return cls(params=take_prefix(tensors, "params"), optimizer=optimizer,
                   rounds_trained=int(meta["rounds_trained"]),
                   algo_state={**take_prefix(tensors, "algo_state"), **meta["algo_state"]})


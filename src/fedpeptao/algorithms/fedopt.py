"""FedOpt (Reddi et al., 2021, Alg. 2): an adaptive optimiser on the server, as Flower's FedAdam,
FedYogi and FedAdagrad; one class, three names.

The pseudo-gradient is the averaged change ``Delta = avg_k(y_k) - x`` (the runtime's averaging
rule); ``m`` and ``v`` are per-tensor server state, ``v`` starting at ``eps^2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, register
from fedpeptao.core.aggregation import RoundUpdates, work_dtype
from fedpeptao.utils.state import State, add_prefix, take_prefix

FedOptKind = Literal["adam", "yogi", "adagrad"]


class FedOptSettings(AlgorithmSettings):
    name: Literal["fedadam", "fedyogi", "fedadagrad"] = "fedadam"
    server_lr: float = Field(1e-2, gt=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    eps: float = Field(1e-3, gt=0.0)  # Reddi et al.'s tau: adaptivity, and v's initial sqrt


def fedopt_update(x: Tensor, delta: Tensor, m: Tensor, v: Tensor, kind: FedOptKind, lr: float, beta1: float,
                  beta2: float, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """One server step of Reddi et al. (2021) Alg. 2 on one tensor: returns ``(x_new, m, v)``."""
    m = beta1 * m + (1 - beta1) * delta
    sq = delta * delta
    if kind == "adagrad":
        v = v + sq
    elif kind == "adam":
        v = beta2 * v + (1 - beta2) * sq
    elif kind == "yogi":
        v = v - (1 - beta2) * sq * torch.sign(v - sq)
    else:
        raise ValueError(f"unknown adaptive server optimiser {kind!r}")
    return x + lr * m / (torch.sqrt(v) + tau), m, v


@register
class FedOpt(Algorithm):
    name = "fedopt"
    settings_class = FedOptSettings

    def __init__(self, settings, ctx, initial) -> None:
        super().__init__(settings, ctx, initial)
        self.kind: FedOptKind = settings.name.removeprefix("fed")  # type: ignore[assignment]
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def aggregate(self, round_index: int, sampled: Sequence[int], updates: RoundUpdates) -> None:
        s = self.settings
        avg = self.ctx.average(updates)
        new = {}
        for name in self.shared:
            xw = self.params[name].to(work_dtype(self.params[name]))
            m = self.m.get(name, torch.zeros_like(xw))
            v = self.v.get(name, torch.full_like(xw, s.eps ** 2))
            new[name], self.m[name], self.v[name] = fedopt_update(xw, avg[name].to(xw.dtype) - xw, m, v, self.kind,
                                                                  s.server_lr, s.beta1, s.beta2, s.eps)
        self._set_shared(new)

    def state(self) -> State:
        tensors, meta = super().state()
        return {**tensors, **add_prefix("m", self.m), **add_prefix("v", self.v)}, meta

    def load_state(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.m, self.v = take_prefix(tensors, "m"), take_prefix(tensors, "v")

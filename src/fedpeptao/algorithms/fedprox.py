"""FedProx (Li et al., 2020): FedAvg with a proximal term ``mu/2 ||w - w_global||^2`` on the device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, ExtraLoss, register


class FedProxSettings(AlgorithmSettings):
    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0)  # weight of the proximal term


@register
class FedProx(Algorithm):
    name = "fedprox"
    settings_class = FedProxSettings

    @contextmanager
    def client_training(self, model, message, client) -> Iterator[ExtraLoss | None]:
        """The local loss gains ``mu/2 ||w - w_global||^2`` over the received tensors."""
        params = dict(model.named_parameters())
        mu = self.settings.mu
        anchor = {n: a.detach().to(params[n].device, copy=True) for n, a in message.model.items()}

        def proximal(m: torch.nn.Module, _batch, _out) -> Tensor:
            params = dict(m.named_parameters())
            return 0.5 * mu * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())

        yield proximal

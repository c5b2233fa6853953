"""FedProx (Li et al., 2020): FedAvg with a proximal term ``mu/2 ||w - w_global||^2`` on the device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, ExtraLoss, register
from fedpeptao.core.federation import ClientState


class FedProxSettings(AlgorithmSettings):
    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0)  # weight of the proximal term


@register
class FedProx(Algorithm):
    name = "fedprox"
    settings_class = FedProxSettings

    @contextmanager
    def client_training(self, model: torch.nn.Module, received: Mapping[str, Tensor], client: ClientState
                        ) -> Iterator[ExtraLoss | None]:
        anchor = {n: t.detach().clone() for n, t in self.model_part(received).items()}
        mu = self.settings.mu

        def proximal(m: torch.nn.Module) -> Tensor:
            params = dict(m.named_parameters())
            return 0.5 * mu * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())

        yield proximal

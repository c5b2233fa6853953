"""MOON (Li et al., 2021): model-contrastive learning on the device.

The local objective adds ``mu * CE`` of the cosine similarities of this model's representation
to the global model's (positive) and to the device's previous local model's (negative), at
temperature ``tau``. The previous local model is the device's own tensors from its last round,
which it keeps anyway (:class:`~fedpeptao.core.federation.ClientState`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, ExtraLoss, register
from fedpeptao.core.federation import ClientState
from fedpeptao.core.payload import Message


class MoonSettings(AlgorithmSettings):
    name: Literal["moon"] = "moon"
    mu: float = Field(1.0, ge=0.0)  # weight of the contrastive term
    tau: float = Field(0.5, gt=0.0)  # temperature


@register
class Moon(Algorithm):
    name = "moon"
    settings_class = MoonSettings

    @contextmanager
    def client_training(self, model: torch.nn.Module, message: Message, client: ClientState
                        ) -> Iterator[ExtraLoss | None]:
        mu, tau = self.settings.mu, self.settings.tau
        device = next(model.parameters()).device
        glob = {n: t.detach().to(device, copy=True) for n, t in message.model.items()}  # positive: the global model
        prev = {n: client.params[n].detach().to(device, copy=True) for n in glob}  # negative: this device's last model

        def contrastive(m, batch: Mapping[str, Tensor], out) -> Tensor:
            """``out.features`` is this model's representation of ``batch``; the references' come
            from forwards under the global and the previous tensors (eval mode, no gradient)."""
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "target_pos")}
            refs = [m.forward_with(tensors, inputs).features for tensors in (glob, prev)]
            z = out.features.float()
            logits = torch.stack([F.cosine_similarity(z, r.float(), dim=-1) for r in refs], dim=1) / tau
            target = torch.zeros(len(z), dtype=torch.long, device=z.device)
            return mu * F.cross_entropy(logits, target)

        yield contrastive

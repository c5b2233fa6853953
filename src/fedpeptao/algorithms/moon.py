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


class MoonSettings(AlgorithmSettings):
    name: Literal["moon"] = "moon"
    mu: float = Field(1.0, ge=0.0)  # weight of the contrastive term
    tau: float = Field(0.5, gt=0.0)  # temperature


def representation(model, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """What the classifier reads: masked mean of ``hidden`` (linear head) or its label position."""
    if model.head_kind == "linear":
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch["target_pos"].to(hidden.device)]


@register
class Moon(Algorithm):
    name = "moon"
    settings_class = MoonSettings

    @contextmanager
    def client_training(self, model: torch.nn.Module, received: Mapping[str, Tensor], client: ClientState
                        ) -> Iterator[ExtraLoss | None]:
        mu, tau = self.settings.mu, self.settings.tau
        device = next(model.parameters()).device
        glob = {n: t.to(device) for n, t in self.received_copy(received).items()}  # positive: the global model
        prev = {n: client.params[n].detach().to(device, copy=True) for n in glob}  # negative: this device's last model
        seen: dict[str, object] = {}

        def grab_batch(_module, _args, kwargs):
            seen["batch"] = kwargs

        def grab_hidden(_module, _args, output):
            seen["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handles = [model.register_forward_pre_hook(grab_batch, with_kwargs=True),
                   model.model.base_model.register_forward_hook(grab_hidden)]

        def contrastive(m) -> Tensor:
            batch = {key: seen["batch"][key] for key in ("input_ids", "attention_mask", "target_pos")}
            z = representation(m, seen["hidden"], batch)
            refs = []
            was_training = m.training
            m.eval()
            with torch.no_grad():
                for tensors in (glob, prev):
                    torch.func.functional_call(m, tensors, args=(), kwargs=batch, strict=False)
                    refs.append(representation(m, seen["hidden"], batch))
            m.train(was_training)
            logits = torch.stack([F.cosine_similarity(z.float(), r.float(), dim=-1) for r in refs], dim=1) / tau
            target = torch.zeros(len(z), dtype=torch.long, device=z.device)
            return mu * F.cross_entropy(logits, target)

        try:
            yield contrastive
        finally:
            for h in handles:
                h.remove()

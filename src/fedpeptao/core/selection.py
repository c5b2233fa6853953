"""Device-side measurements that decide which prompt layers travel (SPEC section 2).

The maths lives in :mod:`fedpeptao.core.scoring` and :mod:`fedpeptao.core.hessian`; this module
only feeds them a client's batch through the prompted model. When to measure, on which clients,
and what to decide is FedPepTAO's
:class:`~fedpeptao.algorithms.fedpeptao.selection.LayerSelection`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedpeptao.core.hessian import HvpLockstep, hvp_fn, one_client
from fedpeptao.core.scoring import layer_scores
from fedpeptao.data.encoding import EncodedDataset, stack_batches
from fedpeptao.models.tuned import TunedModel
from fedpeptao.models.slots import ClientView, slot_mode


def _first_batch(data: EncodedDataset, indices: np.ndarray, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return next(data.batches(indices, batch_size, shuffle=True, rng=rng))


@torch.no_grad()
def layer_scores_of(model: TunedModel, data: EncodedDataset, parts: Sequence[np.ndarray],
                    batch_size: int, seeds: Sequence[int]) -> list[torch.Tensor]:
    """Layer-importance scores of each client (each with >= 2 examples) from one batch of its data,
    all under the model's current tensors, in ONE forward pass of the batches stacked together.

    Each client's rows are scored on their own. The extra right padding a shared pass adds is
    masked like any other padding (zero rows add nothing to a flattened example's direction), so
    the scores equal the one-client-at-a-time ones up to float rounding.
    """
    if any(len(indices) < 2 for indices in parts):
        raise ValueError("layer scoring needs at least 2 examples on every client")
    model.eval()
    combined, rows = stack_batches([_first_batch(data, indices, batch_size, seed)
                                    for indices, seed in zip(parts, seeds)], data.pad_id)
    outputs = model.layer_outputs(combined["input_ids"], combined["attention_mask"])
    mask = combined["attention_mask"].unsqueeze(-1).to(outputs[0])
    masked = [h * mask for h in outputs]
    return [layer_scores([h[own] for h in masked]) for own in rows]


def client_hvp(model: TunedModel, data: EncodedDataset, parts: Sequence[np.ndarray], batch_size: int,
               seeds: Sequence[int], names: list[str]) -> tuple[HvpLockstep, int]:
    """Hessian-vector products of each client's batch loss w.r.t. the named trainable tensors (the
    tuning's per-layer groups), all at the model's current tensors; returns ``(hvps, dim)`` for
    :func:`~fedpeptao.core.hessian.slq_runs_lockstep`.

    Evaluated in eval mode (no dropout) so that each operator is a fixed symmetric matrix, and with
    the math SDPA kernel: PyTorch's fused CPU attention kernels have no double backward. One client
    differentiates the model's own tensors. Several clients share ONE forward pass of their
    batches stacked together: each gets its own copy of the tensors (a :class:`ClientView` in slot
    mode) and the loss is the sum of the clients' own mean losses, so the Hessian w.r.t. all copies
    is block diagonal with client ``k``'s Hessian as block ``k``: one double-backward pass gives
    every client's product, each equal to its one-client product up to float rounding.
    """
    model.eval()
    if len(parts) == 1:
        batch = _first_batch(data, parts[0], batch_size, seeds[0])
        named = dict(model.named_parameters())
        params = [named[n] for n in names]
        with sdpa_kernel(SDPBackend.MATH):
            return one_client(hvp_fn(lambda: model(**batch).loss, params)), sum(p.numel() for p in params)
    combined, rows = stack_batches([_first_batch(data, indices, batch_size, seed)
                                    for indices, seed in zip(parts, seeds)], data.pad_id)
    current = {n: p for n, p in model.named_parameters() if p.requires_grad}
    views = [ClientView(model, current) for _ in parts]
    params = [view.tensors()[n] for view in views for n in names]
    dim = sum(current[n].numel() for n in names)

    def loss() -> torch.Tensor:
        with slot_mode(model, [view.tensors() for view in views], [r.stop - r.start for r in rows]):
            out = model(**combined)
        return torch.stack([out.rows(own).loss for own in rows]).sum()

    with sdpa_kernel(SDPBackend.MATH):
        joint = hvp_fn(loss, params)

    def hvps(vectors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        template = next(v for v in vectors if v is not None)
        products = joint(torch.cat([torch.zeros_like(template) if v is None else v for v in vectors])).split(dim)
        return [None if v is None else h for v, h in zip(vectors, products)]

    return hvps, dim


def lanczos_device(model: TunedModel) -> torch.device | None:
    """Where the float64 Lanczos vectors live: beside the model on CUDA, on the host otherwise
    (MPS has no float64; on a CPU the host is the device)."""
    return model.device if model.device.type == "cuda" else None

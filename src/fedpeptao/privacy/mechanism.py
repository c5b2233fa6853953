"""The Gaussian mechanism on model tensors: clip a client's change, add seeded noise.

Pure functions, shared by both runtimes so that the simulator and Flower clip the same updates
and draw the same noise for the same seed: noise is drawn on the CPU from a ``torch.Generator``
in sorted tensor-name order (independent of device and message order), then moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Tensors = dict[str, Tensor]


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """The L2 norm of all tensors together, as one flat vector."""
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors.values())))


def clip(delta: Mapping[str, Tensor], clip_norm: float) -> tuple[Tensors, float]:
    """``delta * min(1, C / ||delta||)`` (float32 or wider) and the norm before clipping."""
    norm = l2_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: t.detach().to(torch.promote_types(t.dtype, torch.float32)) * scale for n, t in delta.items()}, norm


def gaussian_noise(like: Mapping[str, Tensor], std: float, seed: int) -> Tensors:
    """Independent ``N(0, std^2)`` for every coordinate of ``like``, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(int(seed) % 2 ** 63)
    noise = {}
    for name in sorted(like):
        ref = like[name]
        draw = torch.randn(ref.shape, generator=generator, dtype=torch.float64) * std
        noise[name] = draw.to(device=ref.device, dtype=torch.promote_types(ref.dtype, torch.float32))
    return noise


def change(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensors:
    """What a client changed: ``update - reference`` on the reference's names."""
    return {n: update[n].detach().to(ref.device, torch.promote_types(ref.dtype, torch.float32)) - ref
            for n, ref in reference.items()}


def privatise_locally(update: Mapping[str, Tensor], reference: Mapping[str, Tensor], clip_norm: float,
                      noise_multiplier: float, seed: int) -> Tensors:
    """Local DP on the device: ``reference + clip(update - reference) + N(0, (z C)^2)``."""
    clipped, _ = clip(change(update, reference), clip_norm)
    noise = gaussian_noise(clipped, noise_multiplier * clip_norm, seed)
    return {n: (reference[n] + clipped[n] + noise[n]).to(reference[n].dtype) for n in reference}


def noisy_sum(vectors: Sequence[Mapping[str, Tensor]], like: Mapping[str, Tensor], std: float, seed: int
              ) -> Tensors:
    """``sum_k v_k + N(0, std^2)`` (the sum is zero when no vector arrived)."""
    noise = gaussian_noise(like, std, seed)
    return {n: sum((v[n] for v in vectors), torch.zeros_like(noise[n])) + noise[n] for n in like}

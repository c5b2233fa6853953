"""Layer-importance scores and the choice of which prompt layers travel (SPEC section 2, step 1 and 3).

A layer whose outputs keep the examples of a batch apart (a well-conditioned cosine-similarity
matrix between examples) is taken to matter more. With ``S_l`` the BxB cosine-similarity matrix of
layer ``l``'s flattened outputs and ``lambda_j`` its eigenvalues,

    score_l = sum_j [ log(lambda_j + 1e-5) + 1 / (lambda_j + 1e-5) ]            (SPEC 2.1)

the server combines clients by data size, ``Score_l = sum_k (n_k / n) score_{k,l}``, ranks layers by
descending score and shares the top ``ceil(r * L)`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EIG_EPS = 1e-5  # the 1e-5 inside log(.) and 1/(.) of SPEC 2.1


def layer_scores(layer_outputs: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC 2.1 score of every layer from one batch: a float64 tensor ``[L]``.

    ``layer_outputs`` holds one ``[B, T, H]`` tensor per transformer layer (any trailing shape is
    flattened to ``[B, -1]``). ``attention_mask`` (``[B, T]``, 1 = real token) zeroes padded
    positions first, so padding length does not change the similarity of two examples.

    The cosine matrix is positive semi-definite, so any negative eigenvalue is round-off: those are
    clamped to 0 (``eigvalsh`` in float64). An all-zero row has no direction; it is left as a zero
    row of ``S`` (the eigenvalue 0 it adds is scored like any other).
    """
    if len(layer_outputs) == 0:
        raise ValueError("layer_scores needs at least one layer output")
    batch = layer_outputs[0].shape[0]
    if batch < 2:
        raise ValueError(f"layer_scores needs a batch of at least 2 examples, got {batch}")
    scores = []
    for index, hidden in enumerate(layer_outputs):
        if hidden.dim() < 2 or hidden.shape[0] != batch:
            raise ValueError(f"layer {index}: expected shape [{batch}, ...], got {tuple(hidden.shape)}")
        x = hidden.detach()
        if x.device.type == "mps":  # no float64 there
            x = x.cpu()
        x = x.to(torch.float64)
        if attention_mask is not None:
            if hidden.dim() < 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
                raise ValueError(f"layer {index}: attention_mask {tuple(attention_mask.shape)} does not match "
                                 f"outputs {tuple(hidden.shape)}")
            mask = attention_mask.to(device=x.device, dtype=torch.float64)
            x = x * mask.reshape(*mask.shape, *([1] * (x.dim() - 2)))
        x = torch.nn.functional.normalize(x.reshape(batch, -1), dim=1)
        sim = x @ x.T
        eigenvalues = torch.linalg.eigvalsh(0.5 * (sim + sim.T)).clamp_min(0.0)
        shifted = eigenvalues + EIG_EPS
        scores.append((shifted.log() + shifted.reciprocal()).sum().cpu())
    return torch.stack(scores)


def combine_scores(client_scores: Sequence[torch.Tensor], num_examples: Sequence[int]) -> torch.Tensor:
    """Size-weighted sum ``Score_l = sum_k (n_k / n) score_{k,l}`` (SPEC 2.1), float64 ``[L]``."""
    if len(client_scores) == 0 or len(client_scores) != len(num_examples):
        raise ValueError(f"need one size per client score: {len(client_scores)} scores, {len(num_examples)} sizes")
    if any(n < 0 for n in num_examples) or sum(num_examples) <= 0:
        raise ValueError(f"client sizes must be >= 0 with a positive total, got {list(num_examples)}")
    stacked = torch.stack([torch.as_tensor(s, dtype=torch.float64).cpu() for s in client_scores])
    weights = torch.tensor(num_examples, dtype=torch.float64) / sum(num_examples)
    return weights @ stacked


def rank_layers(scores: torch.Tensor) -> list[int]:
    """Layer indices by descending score; equal scores keep the lower layer first."""
    values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist()
    if any(math.isnan(v) for v in values):
        raise ValueError("layer scores contain NaN")
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def select_layers(ranking: list[int], ratio: float) -> list[int]:
    """The top ``ceil(ratio * L)`` layers of ``ranking`` (at least one), sorted ascending (SPEC 2.3).

    ``ratio * L`` is rounded to 9 decimals before ``ceil`` so that float noise such as
    ``0.28 * 25 = 7.000000000000001`` does not add a layer.
    """
    num_layers = len(ranking)
    if sorted(ranking) != list(range(num_layers)) or num_layers == 0:
        raise ValueError(f"ranking must be a permutation of 0..L-1, got {ranking}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    count = min(num_layers, max(1, math.ceil(round(ratio * num_layers, 9))))
    return sorted(ranking[:count])

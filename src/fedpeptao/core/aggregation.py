"""What the server learns from a round's clients, and the rules that average it.

A round yields one of two things, and an algorithm's server step is told which:

* every accepted client's update (a sequence of :class:`ClientUpdate`), when the server sees
  each client's tensors;
* only their mean (a :class:`PopulationUpdate`), when the clients' updates are known together
  and never one by one: central DP releases a noised mean of clipped changes, and secure
  aggregation reveals only the sum (:mod:`fedpeptao.privacy.secure`).

The averaging rule is runtime-wide (``server.aggregation``, :func:`averaging`): the weighted mean,
or a robust coordinate median or trimmed mean. The robust rules are *unweighted* per
coordinate, like Flower's ``FedMedian`` and ``FedTrimmedAvg`` and the original definitions
(Yin et al., 2018): the example counts are self-reported, so weighting by them would let one
client that claims a huge dataset dominate exactly the statistic meant to resist it. A
population's mean is what was released, whatever the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Tensors = dict[str, Tensor]
Averaging = Literal["weighted_mean", "median", "trimmed_mean"]


@dataclass
class ClientUpdate:
    """One client's reply to a training message, as the server uses it."""

    client_id: int
    params: Tensors  # the model tensors it sent: the shared ones after local training
    num_examples: int
    num_steps: int  # K_k, local optimiser steps this round
    extras: dict[str, Tensors] = field(default_factory=dict)  # its algorithm's own groups (SCAFFOLD's dc_k)


@dataclass
class PopulationUpdate:
    """A round's clients known only together: the mean of their model tensors, never one of them."""

    params: Tensors  # the global tensors moved by the population's mean change
    num_clients: int  # the clients the mean stands for (central DP: the public expected count it divides by)
    num_steps: int  # their mean number of local steps, rounded (treated as public, see docs/privacy.md)
    #: per extras group, the SUM over the clients of their replies' tensors (secure aggregation sums an
    #: algorithm's own groups, e.g. SCAFFOLD's ``dc_k``, in the same masked vector); empty otherwise
    extras: dict[str, Tensors] = field(default_factory=dict)


#: what an algorithm's server step receives for a round
RoundUpdates = Sequence[ClientUpdate] | PopulationUpdate


def work_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype server arithmetic runs in: at least float32, float64 kept."""
    return torch.promote_types(tensor.dtype, torch.float32)


def aggregation_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """``p_k = n_k / sum_j n_j``."""
    sizes = [u.num_examples for u in updates]
    if any(n < 0 for n in sizes) or sum(sizes) <= 0:
        raise ValueError(f"num_examples must be >= 0 with a positive total, got {sizes}")
    total = sum(sizes)
    return [n / total for n in sizes]


def weighted_average(updates: Sequence[ClientUpdate]) -> Tensors:
    """FedAvg ``sum_k p_k theta_k`` with ``p_k = n_k / sum_j n_j``, in the first update's dtypes.

    Accumulates in float64 so the result does not depend on the order of the clients.
    """
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    weights = aggregation_weights(updates)
    first = updates[0].params
    return {name: sum(w * u.params[name].to(device=ref.device, dtype=torch.float64) for w, u in zip(weights, updates)
                      ).to(ref.dtype)
            for name, ref in first.items()}


def coordinate_median(updates: Sequence[ClientUpdate]) -> Tensors:
    """Per-coordinate median of the clients' tensors (unweighted; mean of the two middle values
    for an even count, as ``numpy.median`` does, unlike ``torch.median`` which takes the lower one)."""
    def median(stacked: Tensor) -> Tensor:
        k = stacked.shape[0]
        ordered = torch.sort(stacked, dim=0).values
        if k % 2:
            return ordered[k // 2]
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2

    return _per_coordinate(updates, median)


def trimmed_mean(updates: Sequence[ClientUpdate], trim_ratio: float) -> Tensors:
    """Per-coordinate mean after dropping the ``floor(trim_ratio * K)`` largest and smallest values
    (unweighted; same cut as ``scipy.stats.trim_mean``). ``trim_ratio=0`` is the plain mean."""
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    k = len(updates)
    cut = int(trim_ratio * k)
    if k and 2 * cut >= k:
        raise ValueError(f"trim_ratio {trim_ratio} removes all {k} updates")

    def trimmed(stacked: Tensor) -> Tensor:
        ordered = torch.sort(stacked, dim=0).values
        return ordered[cut : k - cut].mean(dim=0)

    return _per_coordinate(updates, trimmed)


def _per_coordinate(updates: Sequence[ClientUpdate], reduce: Callable[[Tensor], Tensor]) -> Tensors:
    """Stack each tensor over clients, reduce in at least float32, return in the clients' dtype."""
    if not updates:
        raise ValueError("no updates to aggregate")
    out: Tensors = {}
    for name, first in updates[0].params.items():
        stacked = torch.stack([u.params[name].detach().to(first.device, work_dtype(first)) for u in updates])
        out[name] = reduce(stacked).to(first.dtype)
    return out


def averaging(kind: Averaging, trim_ratio: float = 0.1) -> Callable[[RoundUpdates], Tensors]:
    """The runtime-wide averaging rule an algorithm's server step calls (``server.aggregation``):
    the rule over individual updates; a population's mean as it was released."""
    if kind == "median":
        rule = coordinate_median
    elif kind == "trimmed_mean":
        def rule(updates: Sequence[ClientUpdate]) -> Tensors:
            return trimmed_mean(updates, trim_ratio)
    else:
        rule = weighted_average

    def average(updates: RoundUpdates) -> Tensors:
        return updates.params if isinstance(updates, PopulationUpdate) else rule(updates)

    return average

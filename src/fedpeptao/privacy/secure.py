"""Secure aggregation's arithmetic, written once for both runtimes (``privacy.secure_aggregation``).

Under secure aggregation the server learns the sum of a round's contributions and never one of
them. Under Flower the sum comes from Flower's SecAgg+ protocol (:mod:`fedpeptao.flower.secagg`:
key agreement, Shamir shares, pairwise masks); the embedded simulator has no one to hide from, so
it runs the same arithmetic without the cryptography (:func:`sum_of`). Either way the round engine
receives a :class:`SecureRound` (:meth:`~fedpeptao.engine.rounds.RoundEngine.receive_secure`) and
the algorithm's server step a :class:`~fedpeptao.core.aggregation.PopulationUpdate`.

A device's contribution (:func:`device_contribution`, run on the device in both runtimes): its
change ``delta = y_k - x`` on the shared tensors, in float64, and a weight ``w_k``:

* without DP: ``w_k = num_examples / secagg.max_examples`` and the arrays ``w_k delta``, so the
  server's ``x + sum_k w_k delta_k / sum_k w_k`` is FedAvg's weighted mean;
* under DP (``central``, ``distributed``, ``local``): ``w_k = 1`` and the arrays the device's
  clipped (and, for ``distributed``, partly noised) change, see
  :meth:`~fedpeptao.privacy.engine.ClientPrivacy.device_share`.

An algorithm's own reply groups (``extras``: SCAFFOLD's control-variate deltas ``dc_k``) travel
in the same masked vector, unweighted, under names ``extras:<group>:<tensor>`` (:data:`EXTRAS`), so
the server learns their sum over contributors and never one of them: SCAFFOLD's
``c + (1/N) sum_k dc_k`` needs nothing else. Under DP a reply with extras is refused (DP's clipping
covers the model change only).

Quantization is Flower's (``flwr.common.secure_aggregation.quantization``), entry by entry: clip to
``[-c, c]``, map to ``y = (x + c) T / (2c)``, round stochastically to ``floor(y)`` or ``ceil(y)``
with ``E = y``; the integers are summed modulo ``M`` and mapped back. :func:`quantize` is Flower's
function with a seeded generator in place of numpy's global one (``tests`` check it draws exactly
Flower's integers for the same random numbers). Each contributed value therefore carries an
unbiased error below one quantum ``q = 2c / T``; an entry of a sum over ``m`` contributors an error
below ``m q`` (:meth:`~fedpeptao.privacy.settings.SecAggConfig.error_bound`), the weight sum too;
the mean (:func:`mean_error_bound`) an error below ``m q (1 + |mean change|) / sum_k w_k``, or
``m q / n`` under DP (divided by the expected count ``n``). A value outside ``[-c, c]`` is not
clipped silently: the device leaves the round instead (:class:`ContributionRefused`), as a
Flower node does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from fedpeptao.core.aggregation import PopulationUpdate
from fedpeptao.privacy.settings import PrivacySettings, SecAggConfig

log = logging.getLogger("fedpeptao.privacy.secure")

#: bytes of one masked entry on the wire (Flower's masked vectors are int64)
MASKED_ENTRY_BYTES = 8
#: the prefix of an extras tensor's name in a contribution: ``extras:<group>:<tensor>``
EXTRAS = "extras:"


class ContributionRefused(ValueError):
    """A device's contribution cannot go into the sum (a value outside the clipping range, a
    non-finite value, extras); the device leaves the round, as a Flower node that raises does."""


class SecureAggregationFailed(RuntimeError):
    """The round's sum cannot be formed (fewer contributors than the reconstruction threshold, or
    contributions laid out differently): nothing is revealed and the round is skipped."""


class RandomSource(Protocol):
    def random(self, size: Any) -> np.ndarray: ...


@dataclass
class Contribution:
    """What one device puts into the masked sum, and its plaintext metrics (public by construction)."""

    client_id: int
    arrays: dict[str, np.ndarray]  # float64: weight * change (clipped / noised under DP)
    weight: float
    num_steps: int
    loss: float
    seconds: float = 0.0

    def metrics(self) -> dict[str, int | float]:
        """The plaintext metrics a Flower node sends beside its masked vector."""
        return {"client-id": self.client_id, "num-steps": self.num_steps, "train-loss": float(self.loss),
                "seconds": float(self.seconds)}


@dataclass
class SecureRound:
    """What the server learns from a round under secure aggregation: one sum, and public metadata.

    ``arrays``: the sum over contributors of their weighted arrays (float64); ``weight_sum``: the sum
    of their weights; ``contributors``: the client ids in the sum; ``dropped``: sampled clients not
    in it; ``num_steps``, ``losses``, ``seconds``: each contributor's plaintext metrics.
    """

    arrays: dict[str, np.ndarray]
    weight_sum: float
    contributors: list[int]
    dropped: list[int] = field(default_factory=list)
    num_steps: dict[int, int] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def mean_steps(self) -> int:
        steps = list(self.num_steps.values())
        return max(1, round(float(np.mean(steps)))) if steps else 1

    def model_arrays(self) -> dict[str, np.ndarray]:
        """The summed model arrays (the weighted changes), without the extras."""
        return {n: a for n, a in self.arrays.items() if not n.startswith(EXTRAS)}

    def extras(self) -> dict[str, dict[str, np.ndarray]]:
        """The summed extras, by group and tensor name (unweighted sums over the contributors)."""
        groups: dict[str, dict[str, np.ndarray]] = {}
        for name, value in self.arrays.items():
            if name.startswith(EXTRAS):
                group, _, tensor = name[len(EXTRAS):].partition(":")
                groups.setdefault(group, {})[tensor] = value
        return groups


# -- the device -------------------------------------------------------------------------------

def contribution_weight(settings: PrivacySettings, num_examples: int) -> float:
    """A device's weight in the masked sum: ``num_examples / max_examples``, or 1 under DP (sizes
    are private there, and the noise is calibrated to a sum of clipped changes)."""
    return 1.0 if settings.enabled else float(num_examples) / settings.secagg.max_examples


def device_contribution(settings: PrivacySettings, privacy, client_id: int, round_index: int,
                        sent: Mapping[str, Tensor], received: Mapping[str, Tensor], *, num_examples: int,
                        num_steps: int, loss: float, seconds: float = 0.0,
                        extras: Mapping[str, Any] | None = None) -> Contribution:
    """Client ``client_id``'s contribution to round ``round_index``'s sum, from the model tensors it
    ``sent`` (after training, and local DP) and those it ``received``. ``privacy``: the run's
    :class:`~fedpeptao.privacy.engine.ClientPrivacy` (None without DP). Raises
    :class:`ContributionRefused` when the contribution cannot be summed."""
    if extras and privacy is not None:
        raise ContributionRefused(f"client {client_id}: its reply carries extras {sorted(extras)}, which DP's "
                                  f"clipping does not cover")
    delta: dict[str, Tensor] = {n: sent[n].detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
                                for n, ref in received.items()}
    if privacy is not None:
        delta = privacy.device_share(delta, client_id, round_index)
    weight = contribution_weight(settings, num_examples)
    arrays = {n: weight * t.detach().to("cpu", torch.float64).numpy() for n, t in delta.items()}
    for group, tensors in (extras or {}).items():  # summed as they are: the algorithm's step wants their sum
        for name, value in tensors.items():
            arrays[f"{EXTRAS}{group}:{name}"] = value.detach().to("cpu", torch.float64).numpy()
    bound = settings.secagg.clipping_range
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ContributionRefused(f"client {client_id}: '{name}' holds a non-finite value")
        outside = int(np.count_nonzero(np.abs(value) > bound))
        if outside:
            raise ContributionRefused(f"client {client_id}: {outside} values of '{name}' exceed "
                                      f"privacy.secagg.clipping_range={bound:g}")
    if not 0 < weight <= bound:
        raise ContributionRefused(f"client {client_id}: its weight {weight:g} is outside (0, "
                                  f"privacy.secagg.clipping_range={bound:g}]")
    return Contribution(int(client_id), arrays, weight, int(num_steps), float(loss), float(seconds))


# -- the arithmetic of the sum -------------------------------------------------------------------

def quantize(values: np.ndarray, clipping_range: float, levels: int, rng: RandomSource) -> np.ndarray:
    """Flower's ``quantize`` of one array, its random numbers drawn from ``rng`` (a
    ``numpy.random.Generator`` or ``RandomState``) instead of numpy's global generator."""
    pre = (np.clip(values, -clipping_range, clipping_range) + clipping_range) * (levels / (2 * clipping_range))
    quantized = np.ceil(pre).astype(np.int32)
    draws = rng.random(quantized.shape)
    quantized[draws < quantized - pre] -= 1
    return quantized


def dequantize_sum(total: np.ndarray, contributors: int, clipping_range: float, levels: int) -> np.ndarray:
    """The sum of ``contributors`` quantized vectors mapped back, as Flower's workflow does (its
    mean, from its weighting factor ``contributors * T``) and our adapter undoes (times ``m``)."""
    value = total.astype(np.float64) * ((2 * clipping_range) / levels) - clipping_range
    value += -(contributors - 1) * clipping_range
    value *= levels / (contributors * levels)
    return value * contributors


def flat(contribution: Contribution) -> np.ndarray:
    """A contribution as the one vector the masks cover: its arrays, flattened, then its weight."""
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in contribution.arrays.values()]
                          + [np.array([contribution.weight], dtype=np.float64)])


def sum_of(contributions: Sequence[Contribution], secagg: SecAggConfig, rng: RandomSource,
           dropped: Sequence[int] = ()) -> SecureRound:
    """The sum SecAgg+ would reveal, without the cryptography: every contribution quantized as a
    Flower node quantizes it (in client order, from ``rng``), the integers summed modulo ``M``, the
    sum mapped back. ``dropped``: the sampled clients whose contribution is missing."""
    contributions = sorted(contributions, key=lambda c: c.client_id)
    if len(contributions) < 2:
        raise SecureAggregationFailed(f"{len(contributions)} contribution(s): a sum reveals nothing only over "
                                      f"2 or more")
    layout = [(n, np.shape(a)) for n, a in contributions[0].arrays.items()]
    for c in contributions[1:]:
        if [(n, np.shape(a)) for n, a in c.arrays.items()] != layout:
            raise SecureAggregationFailed(f"client {c.client_id} contributed differently laid out arrays")
    c_range, levels, modulus = secagg.clipping_range, secagg.quantization_range, secagg.modulus_range
    total = np.zeros(sum(math.prod(shape) for _, shape in layout) + 1, dtype=np.int64)
    for c in contributions:
        total = (total + quantize(flat(c), c_range, levels, rng).astype(np.int64)) % modulus
    summed = dequantize_sum(total, len(contributions), c_range, levels)
    arrays, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        arrays[name] = summed[start:start + size].reshape(shape)
        start += size
    return SecureRound(arrays, float(summed[-1]), [c.client_id for c in contributions], sorted(int(k) for k in dropped),
                       {c.client_id: c.num_steps for c in contributions},
                       {c.client_id: c.loss for c in contributions}, {c.client_id: c.seconds for c in contributions})


# -- the server ------------------------------------------------------------------------------

def layout_problem(summed: SecureRound, reference: Mapping[str, Tensor]) -> str | None:
    """Why the summed model arrays do not fit the shared tensors (names, shapes); None when they do.
    (The extras are the algorithm's to check: :func:`extras_sums` feeds its ``extras_problem``.)"""
    arrays = summed.model_arrays()
    if set(arrays) != set(reference):
        return f"the sum holds tensors {sorted(arrays)}, expected {sorted(reference)}"
    for name, ref in reference.items():
        if tuple(arrays[name].shape) != tuple(ref.shape):
            return f"'{name}' summed with shape {tuple(arrays[name].shape)}, expected {tuple(ref.shape)}"
    return None


def _tensor(value: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)).to(device)


def summed_tensors(summed: SecureRound, reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The summed model arrays as float64 tensors on the reference's devices."""
    return {n: _tensor(summed.arrays[n], ref.device) for n, ref in reference.items()}


def extras_sums(summed: SecureRound, reference: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The summed extras as tensors in the dtype and on the device of the shared tensor of the same
    name (as one reply's extras are typed, so the algorithm's ``extras_problem`` can check them),
    or float64 on the CPU for a name that has none."""
    out: dict[str, dict[str, Tensor]] = {}
    for group, tensors in summed.extras().items():
        out[group] = {}
        for name, value in tensors.items():
            ref = reference.get(name)
            out[group][name] = (_tensor(value, torch.device("cpu")) if ref is None
                                else _tensor(value, ref.device).to(ref.dtype))
    return out


def mean_update(summed: SecureRound, reference: Mapping[str, Tensor]) -> PopulationUpdate:
    """Without DP: ``x + sum_k w_k delta_k / sum_k w_k`` for the contributors, in each tensor's dtype,
    and the sums of the extras (:func:`extras_sums`)."""
    if not summed.weight_sum > 0:
        raise SecureAggregationFailed(f"the contributors' weights sum to {summed.weight_sum}")
    total = summed_tensors(summed, reference)
    params = {n: (ref.to(torch.float64) + total[n] / summed.weight_sum).to(ref.dtype) for n, ref in reference.items()}
    return PopulationUpdate(params, len(summed.contributors), summed.mean_steps(), extras_sums(summed, reference))


def mean_error_bound(secagg: SecAggConfig, contributors: int, weight_sum: float | None = None,
                     mean_change: float = 0.0, expected: int | None = None) -> float:
    """The largest quantization error of one entry of the mean change: ``m q (1 + |mean change|) /
    weight_sum`` for the weighted mean (``weight_sum``: the released one), ``m q / n`` for a sum
    divided by the expected count ``n`` (under DP)."""
    if expected is not None:
        return secagg.error_bound(contributors) / expected
    return secagg.error_bound(contributors) * (1.0 + abs(mean_change)) / weight_sum


def masked_bytes(summed: SecureRound) -> int:
    """The bytes of one masked vector on the wire: int64 entries for every summed value (shared
    tensors and extras), the weight and Flower's weighting factor (the key exchange's few hundred
    bytes per pair not counted)."""
    return MASKED_ENTRY_BYTES * (sum(int(np.size(a)) for a in summed.arrays.values()) + 2)


def secure_summary(cfg, history: Sequence[Mapping[str, Any]], runtime: str) -> dict[str, Any]:
    """The run summary's ``secure_aggregation`` section."""
    privacy, secagg = cfg.privacy, cfg.privacy.secagg
    summary: dict[str, Any] = {
        "protocol": ("SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod)" if runtime == "flower" else
                     "SecAgg+'s arithmetic (clip, stochastic quantization, modular sum), no cryptography"),
        **secagg.model_dump(), "quantum": secagg.quantum,
        "weights": "uniform (DP)" if privacy.enabled else f"num_examples / {secagg.max_examples}",
        "dp_noise": {"none": None, "central": "server, on the sum", "local": "each device, whole",
                     "distributed": "each device, a 1/clients_per_round share"}[privacy.mode],
        "contributions": int(sum(r.get("contributors", 0) for r in history)),
        "dropped": int(sum(r.get("dropped", 0) for r in history)),
        "skipped_rounds": [r["round"] for r in history if r.get("skipped")],
    }
    if cfg.method.name == "fedpeptao":
        summary["fedpeptao_form"] = "population"  # per-client control variates need individual updates
    return summary


__all__ = ["Contribution", "ContributionRefused", "SecureAggregationFailed", "SecureRound", "contribution_weight",
           "dequantize_sum", "device_contribution", "EXTRAS", "extras_sums", "layout_problem", "masked_bytes", "mean_error_bound",
           "mean_update", "quantize", "secure_summary", "sum_of", "summed_tensors"]

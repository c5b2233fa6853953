"""Server-side checks on client updates, and robust aggregation rules.

A single malformed or hostile update (a wrong key, a NaN, a huge step) would otherwise spoil the
shared prompts of every client for the rest of the run. The server therefore checks each update
against the tensors it broadcast, drops the bad ones with a log line naming the client, and
aggregates the rest (:func:`filter_updates`).

The robust rules (:func:`coordinate_median`, :func:`trimmed_mean`) are *unweighted* per
coordinate, like Flower's ``FedMedian`` and ``FedTrimmedAvg`` and the original definitions
(Yin et al., 2018): the example counts are self-reported, so weighting by them would let one
client that claims a huge dataset dominate exactly the statistic meant to resist it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # server.py imports nothing from here; avoid a hard import cycle at runtime
    from fedpeptao.core.server import ClientUpdate


class UpdateRejected(ValueError):
    """One client's update failed a check; ``client_id`` and ``reason`` say which and why."""

    def __init__(self, client_id: int, reason: str):
        super().__init__(f"update from client {client_id} rejected: {reason}")
        self.client_id = client_id
        self.reason = reason


@dataclass
class ValidationPolicy:
    """What the server accepts beyond the structural checks (keys, shapes, dtypes, finiteness).

    ``max_norm`` bounds the global L2 norm of the client's *change*, ``params - expected`` over
    all tensors together, not of the parameters themselves: the prompts' own norm grows with
    their size and is not a sign of anything, while an outsized step is the usual signature of a
    diverged or poisoned client. ``None`` disables the bound.
    """

    max_norm: float | None = None

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (self.max_norm > 0 and math.isfinite(self.max_norm)):
            raise ValueError(f"max_norm must be a positive finite number or None, got {self.max_norm}")


def update_norm(params: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of ``params - expected``, accumulated in float64 so fp16/bf16 cannot overflow."""
    total = 0.0
    for name, ref in expected.items():
        diff = params[name].detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
        total += float(torch.sum(diff * diff))
    return math.sqrt(total)


def validate_update(update: ClientUpdate, expected: Mapping[str, torch.Tensor], policy: ValidationPolicy) -> None:
    """Raise :class:`UpdateRejected` at the first problem found; return ``None`` if the update is usable.

    ``expected`` is what the server broadcast this round (names, shapes and dtypes are checked
    against it exactly; pass tensors in the wire dtype if updates travel in lower precision).
    """
    cid = update.client_id
    if not isinstance(update.num_examples, int) or isinstance(update.num_examples, bool) or update.num_examples <= 0:
        raise UpdateRejected(cid, f"num_examples must be a positive integer, got {update.num_examples!r}")
    params = update.params
    missing = sorted(set(expected) - set(params))
    if missing:
        raise UpdateRejected(cid, f"missing key(s) {_names(missing)}")
    extra = sorted(set(params) - set(expected))
    if extra:
        raise UpdateRejected(cid, f"unexpected key(s) {_names(extra)}")
    for name, ref in expected.items():
        value = params[name]
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(cid, f"'{name}' is a {type(value).__name__}, not a tensor")
        if value.shape != ref.shape:
            raise UpdateRejected(cid, f"'{name}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(cid, f"'{name}' has dtype {value.dtype}, expected {ref.dtype}")
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise UpdateRejected(cid, f"'{name}' has {bad} non-finite value(s) (NaN/Inf)")
    if policy.max_norm is not None:
        norm = update_norm(params, expected)
        if not norm <= policy.max_norm:
            raise UpdateRejected(cid, f"update norm {norm:.4g} exceeds the bound {policy.max_norm:.4g}")


def filter_updates(
    updates: Sequence[ClientUpdate],
    expected: Mapping[str, torch.Tensor],
    policy: ValidationPolicy,
    log: logging.Logger,
) -> tuple[list[ClientUpdate], list[tuple[int, str]]]:
    """Split updates into (accepted, rejected as ``(client_id, reason)``), logging one warning per rejection.

    Order is preserved in ``accepted`` so aggregation over the survivors is exactly what it would
    have been had the rejected clients never been sampled.
    """
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[int, str]] = []
    for update in updates:
        try:
            validate_update(update, expected, policy)
        except UpdateRejected as exc:
            log.warning("rejected update from client %s: %s", exc.client_id, exc.reason)
            rejected.append((exc.client_id, exc.reason))
        else:
            accepted.append(update)
    return accepted, rejected


def coordinate_median(updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Per-coordinate median of the clients' tensors (unweighted; mean of the two middle values
    for an even count, as ``numpy.median`` does, unlike ``torch.median`` which takes the lower one)."""
    def median(stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        ordered = torch.sort(stacked, dim=0).values
        if k % 2:
            return ordered[k // 2]
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2

    return _per_coordinate(updates, median)


def trimmed_mean(updates: Sequence[ClientUpdate], trim_ratio: float) -> dict[str, torch.Tensor]:
    """Per-coordinate mean after dropping the ``floor(trim_ratio * K)`` largest and smallest values
    (unweighted; same cut as ``scipy.stats.trim_mean``). ``trim_ratio=0`` is the plain mean."""
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    k = len(updates)
    cut = int(trim_ratio * k)
    if k and 2 * cut >= k:
        raise ValueError(f"trim_ratio {trim_ratio} removes all {k} updates")

    def trimmed(stacked: torch.Tensor) -> torch.Tensor:
        ordered = torch.sort(stacked, dim=0).values
        return ordered[cut : k - cut].mean(dim=0)

    return _per_coordinate(updates, trimmed)


def _per_coordinate(updates: Sequence[ClientUpdate], reduce) -> dict[str, torch.Tensor]:
    """Stack each tensor over clients, reduce in at least float32, return in the clients' dtype."""
    if not updates:
        raise ValueError("no updates to aggregate")
    out: dict[str, torch.Tensor] = {}
    for name, first in updates[0].params.items():
        work = torch.promote_types(first.dtype, torch.float32)
        stacked = torch.stack([u.params[name].detach().to(first.device, work) for u in updates])
        out[name] = reduce(stacked).to(first.dtype)
    return out


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def filter_model_updates(
    updates: Sequence[ClientUpdate],
    expected: Mapping[str, torch.Tensor],
    policy: ValidationPolicy | None,
    log: logging.Logger,
    extra_prefixes: tuple[str, ...] = (),
) -> tuple[list[ClientUpdate], list[tuple[int, str]]]:
    """:func:`filter_updates` on the model tensors of each update, keeping the accepted updates
    whole: an algorithm's own entries (names starting with one of ``extra_prefixes``, SCAFFOLD's
    ``dc_k``) travel with them; any other unexpected name is a rejection. ``policy=None`` accepts
    everything."""
    if policy is None:
        return list(updates), []
    model_part = [type(u)(u.client_id, {n: t for n, t in u.params.items() if not n.startswith(extra_prefixes)},
                          u.num_examples, u.num_steps) for u in updates] if extra_prefixes else list(updates)
    accepted, rejected = filter_updates(model_part, expected, policy, log)
    keep = {u.client_id for u in accepted}
    return [u for u in updates if u.client_id in keep], rejected

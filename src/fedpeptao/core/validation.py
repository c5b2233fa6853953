"""Server-side checks on client updates.

A single malformed or hostile update (a wrong key, a NaN, a huge step) would otherwise spoil the
shared prompts of every client for the rest of the run. The server therefore checks each update's
model tensors against the tensors it broadcast, asks the algorithm whether the update's extras
are usable (only the algorithm knows what they should be: SCAFFOLD's control-variate deltas),
drops the bad updates with a log line naming the client, and aggregates the rest
(:func:`filter_updates`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpeptao.core.aggregation import ClientUpdate

#: why an update's extras are unusable (None: they are fine), the algorithm's own check
ExtrasCheck = Callable[[ClientUpdate], str | None]


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


def tensors_problem(tensors: Mapping[str, object], expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` do not match ``expected`` (names, shapes and dtypes exactly) or hold a
    non-finite value; None when they are usable."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        return f"missing key(s) {_names(missing)}"
    extra = sorted(set(tensors) - set(expected))
    if extra:
        return f"unexpected key(s) {_names(extra)}"
    for name, ref in expected.items():
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            return f"'{name}' is a {type(value).__name__}, not a tensor"
        if value.shape != ref.shape:
            return f"'{name}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"'{name}' has dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                return f"'{name}' has {bad} non-finite value(s) (NaN/Inf)"
    return None


def groups_problem(groups: Mapping[str, Mapping[str, object]], expected: Mapping[str, Mapping[str, torch.Tensor]]
                   ) -> str | None:
    """:func:`tensors_problem` for an update's extras: exactly the ``expected`` groups, each
    usable; an algorithm's :meth:`~fedpeptao.algorithms.base.Algorithm.extras_problem` calls it."""
    if set(groups) != set(expected):
        return f"extras {sorted(groups)}, expected {sorted(expected) or 'none'}"
    for group, tensors in expected.items():
        problem = tensors_problem(groups[group], tensors)
        if problem is not None:
            return f"{group}: {problem}"
    return None


def no_extras(update: ClientUpdate) -> str | None:
    """The check of an algorithm whose replies carry only model tensors."""
    return groups_problem(update.extras, {})


def validate_update(update: ClientUpdate, expected: Mapping[str, torch.Tensor], policy: ValidationPolicy,
                    extras_problem: ExtrasCheck = no_extras) -> None:
    """Raise :class:`UpdateRejected` at the first problem found; return ``None`` if the update is usable.

    ``expected`` is what the server broadcast this round (names, shapes and dtypes are checked
    against it exactly; pass tensors in the wire dtype if updates travel in lower precision).
    ``extras_problem`` is the algorithm's check of the update's extras; the norm bound is on the
    model tensors only.
    """
    cid = update.client_id
    if not isinstance(update.num_examples, int) or isinstance(update.num_examples, bool) or update.num_examples <= 0:
        raise UpdateRejected(cid, f"num_examples must be a positive integer, got {update.num_examples!r}")
    problem = tensors_problem(update.params, expected) or extras_problem(update)
    if problem is not None:
        raise UpdateRejected(cid, problem)
    if policy.max_norm is not None:
        norm = update_norm(update.params, expected)
        if not norm <= policy.max_norm:
            raise UpdateRejected(cid, f"update norm {norm:.4g} exceeds the bound {policy.max_norm:.4g}")


def filter_updates(
    updates: Sequence[ClientUpdate],
    expected: Mapping[str, torch.Tensor],
    policy: ValidationPolicy | None,
    log: logging.Logger,
    extras_problem: ExtrasCheck = no_extras,
) -> tuple[list[ClientUpdate], list[tuple[int, str]]]:
    """Split updates into (accepted, rejected as ``(client_id, reason)``), logging one warning per
    rejection; ``policy=None`` (``server.validate_updates=false``) accepts everything.

    Order is preserved in ``accepted`` so aggregation over the survivors is exactly what it would
    have been had the rejected clients never been sampled.
    """
    if policy is None:
        return list(updates), []
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[int, str]] = []
    for update in updates:
        try:
            validate_update(update, expected, policy, extras_problem)
        except UpdateRejected as exc:
            log.warning("rejected update from client %s: %s", exc.client_id, exc.reason)
            rejected.append((exc.client_id, exc.reason))
        else:
            accepted.append(update)
    return accepted, rejected


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

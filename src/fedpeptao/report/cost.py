"""Cost to target: the rounds, bytes and seconds a run spends before its metric reaches a target.

The target is judged on the validation metric (``val_metric`` of ``metrics.jsonl``), never on the
test metric: "how long until it is good enough" is a decision taken while training, and taking it
on the test split would let the test split choose the reported numbers. A run without validation
rows therefore never reaches a target.

The costs come from the first evaluated row at or above the target: its 1-based round, its
cumulative bytes sent up and down (``total_bytes``), its training seconds (``train_time_s``: the
sum over rounds of the slowest sampled client's local training time, SPEC section 4, the time a
synchronous round waits for) and its wall seconds since the rounds started (``elapsed_s``: what
this machine spent, evaluation included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """``--target``: an absolute metric value, or (``relative``) a fraction of the best method's
    mean best validation metric, so one setting works across tasks whose attainable metric differs."""

    value: float
    relative: bool = False

    def goal(self, best: float | None) -> float | None:
        """The metric to reach; a relative target needs ``best`` (None without one)."""
        if not self.relative:
            return self.value
        return None if best is None else self.value * best

    def describe(self) -> str:
        return f"{self.value:.0%} of the best method's mean best validation metric" if self.relative else f"{self.value:g}"


def parse_target(text: str) -> Target:
    """``0.8`` (absolute) or ``95%`` (relative to the best method); ValueError names the problem."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw.removesuffix("%"))
    except ValueError:
        raise ValueError(f"--target {text!r}: give a metric value (0.8) or a share of the best method (95%)") from None
    if relative:
        if not 0 < value <= 100:
            raise ValueError(f"--target {text!r}: a share of the best method is above 0% and at most 100%")
        return Target(value / 100, relative=True)
    if not math.isfinite(value):
        raise ValueError(f"--target {text!r}: not a number")
    return Target(value)


@dataclass(frozen=True)
class Cost:
    """What one run spent until its validation metric first reached the target."""

    rounds: int  # 1-based round of the first evaluation at or above the target
    mb: float  # megabytes sent up and down through that round
    train_s: float  # summed slowest-client training seconds through that round
    wall_s: float  # wall seconds from the start of the rounds to the end of that round


def cost_to_target(rows: Iterable[Mapping[str, Any]], goal: float) -> Cost | None:
    """The cost at the first row whose validation metric is at least ``goal`` (None: never)."""
    for row in rows:
        value = row.get("val_metric")
        if isinstance(value, (int, float)) and value >= goal:
            return Cost(rounds=int(row["round"]), mb=row.get("total_bytes", 0) / 1e6,
                        train_s=float(row.get("train_time_s", 0.0)), wall_s=float(row.get("elapsed_s", 0.0)))
    return None


__all__ = ["Cost", "Target", "cost_to_target", "parse_target"]

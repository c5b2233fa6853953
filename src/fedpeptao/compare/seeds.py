"""Tables over repeated seeds (``fedpeptao compare --seeds``) and the cost-to-target table.

A record is one (method, seed) run as :mod:`fedpeptao.compare.runner` stores it; its seed is its
config's ``seed``. What a seed changes (the same for every method, so each seed is a paired
replicate of the whole comparison):

- the data: the bundled tasks' generated examples and the ``max_*_examples`` subsamples;
- the partition: which examples each client holds (train, validation hold-out and test shares);
- the initial tensors: the tuning's initial prompts or weights (and an untrained backbone's);
- the client sampling of every round;
- each client's local training: its shuffling, dropout and the length-grouped batch order;
- the noise of differential privacy, when it is on.

``data.partition_seed`` (``compare --fixed-partition``) holds the data and the partition fixed
while the rest varies with ``seed``.

Beside the pooled test metric, each row has the test metric of the clients that trained at least
once and of those that never did (cross-device runs sample few clients; SPEC section 4), each a
mean over the seeds where the group existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedpeptao.report.cost import Target, cost_to_target
from fedpeptao.report.stats import CONFIDENCE, Interval, paired_interval, t_interval

SEED_CHANGES = ("the data subsamples, the partition (train, validation and test shares), the initial tensors, "
                "the client sampling, each client's shuffling, dropout and batch order, and DP noise")
SEED_CHANGES_FIXED = ("the initial tensors, the client sampling, each client's shuffling, dropout and batch order, "
                      "and DP noise; the data and partition are seed {}'s for every seed (--fixed-partition)")
T_FOOTER = (f"Mean ± std: the sample standard deviation (n - 1) over seeds. {CONFIDENCE:.0%} CI: Student t over "
            f"seeds, mean ± t(0.975, n - 1) · s / √n (scipy.stats.t); none with one seed.")
SEED_COLUMNS = ["method", "seeds", *(f"{name}_{part}" for name in ("test", "difference", "validation")
                                     for part in ("mean", "std", "ci_low", "ci_high")),
                "trained_mean", "untrained_mean", "selected_round_mean", "mb_mean", "trainable_params",
                "params_per_message", "wall_s_mean"]
COSTS = ("rounds", "mb", "train_s", "wall_s")  # the fields of report.cost.Cost
COST_COLUMNS = ["method", "goal", "seeds", "reached", *(f"{name}_{part}" for name in COSTS for part in ("mean", "std"))]


def seed_of(record: dict[str, Any]) -> int:
    return int(record["config"]["seed"])


def by_method(records: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """method -> seed -> record, methods in their first appearance's order."""
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["method"], {})[seed_of(record)] = record
    return groups


def _values(runs: dict[int, dict[str, Any]], pick: Callable[[dict[str, Any]], Any]) -> dict[int, float]:
    """seed -> ``pick(record)`` for the seeds where it is a number."""
    return {seed: float(v) for seed, record in runs.items() if isinstance(v := pick(record), (int, float))}


def _test(record: dict[str, Any]) -> Any:
    """The test metric at the round selected on validation (``best_metric`` in older summaries)."""
    summary = record["summary"]
    return summary.get("test_metric_at_selected", summary["best_metric"])


def seed_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the seeds it ran, intervals over them, and its test metric's paired difference to
    the first method (over the seeds both ran; None for the first method itself)."""
    groups = by_method(records)
    baseline = _values(next(iter(groups.values())), _test)
    rows = []
    for index, (method, runs) in enumerate(groups.items()):
        test = _values(runs, _test)
        paired = sorted(set(test) & set(baseline))
        first = next(iter(runs.values()))
        rows.append({
            "method": method, "seeds": sorted(runs), "test": t_interval(list(test.values())),
            "difference": None if index == 0 else paired_interval([test[s] for s in paired], [baseline[s] for s in paired]),
            "validation": t_interval(list(_values(runs, lambda r: r["summary"].get("validation_metric")).values())),
            "trained": t_interval(list(_values(runs, lambda r: r["summary"].get("trained_metric_at_selected")).values())),
            "untrained": t_interval(list(_values(runs, lambda r: r["summary"].get("untrained_metric_at_selected")
                                                 ).values())),
            "selected_round": t_interval(list(_values(runs, lambda r: r["summary"]["best_round"]).values())),
            "mb": t_interval(list(_values(runs, lambda r: r["summary"]["total_mb"]).values())),
            "trainable_params": first["summary"]["trainable_parameters"],
            "params_per_message": first["params_per_message"],
            "wall_s": t_interval(list(_values(runs, lambda r: r["wall_s"]).values())),
        })
    return rows


def _flat(name: str, interval: Interval | None, parts: Sequence[str] = ("mean", "std", "low", "high")
          ) -> dict[str, float | None]:
    """``{name}_mean``, ``{name}_std``, ``{name}_ci_low``, ``{name}_ci_high`` (None where missing)."""
    return {f"{name}_{'ci_' + part if part in ('low', 'high') else part}": getattr(interval, part, None)
            for part in parts}


def seed_csv_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`seed_rows` flattened to :data:`SEED_COLUMNS` for ``compare.csv``."""
    return [{"method": r["method"], "seeds": len(r["seeds"]), **_flat("test", r["test"]),
             **_flat("difference", r["difference"]), **_flat("validation", r["validation"]),
             "trained_mean": _mean(r["trained"]), "untrained_mean": _mean(r["untrained"]),
             "selected_round_mean": _mean(r["selected_round"]), "mb_mean": _mean(r["mb"]),
             "trainable_params": r["trainable_params"], "params_per_message": r["params_per_message"],
             "wall_s_mean": _mean(r["wall_s"])} for r in rows]


def _mean(interval: Interval | None) -> float | None:
    return None if interval is None else interval.mean


def mean_std(interval: Interval | None, digits: int = 4) -> str:
    """``0.8123 ± 0.0100``; the mean alone for one seed; ``—`` for none."""
    if interval is None:
        return "—"
    return f"{interval.mean:.{digits}f}" + ("" if interval.std is None else f" ± {interval.std:.{digits}f}")


def ci(interval: Interval | None, digits: int = 4) -> str:
    return "—" if interval is None or interval.low is None else f"[{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def seed_table(rows: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """The Markdown table of :func:`seed_rows` and its footer saying how every number is made."""
    first = rows[0]["method"]
    lines = [f"| method | seeds | test {metric} at selected, mean ± std | {CONFIDENCE:.0%} CI | Δ vs {first}, mean "
             f"± std | Δ {CONFIDENCE:.0%} CI | validation {metric}, mean ± std | test, trained clients | test, never "
             f"trained | selected round, mean | MB communicated, "
             f"mean | trainable params | params/message | wall s, mean |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], ",".join(map(str, r["seeds"])), mean_std(r["test"]), ci(r["test"]),
            "—" if r["difference"] is None else mean_std(r["difference"]), ci(r["difference"]),
            mean_std(r["validation"]), mean_std(r["trained"]), mean_std(r["untrained"]),
            mean_std(r["selected_round"], 1), mean_std(r["mb"], 2),
            f"{r['trainable_params']:,}", f"{r['params_per_message']:,}", mean_std(r["wall_s"], 0)]) + " |")
    return lines + ["", f"Test {metric} at the round selected on validation, per seed. {T_FOOTER} Δ: the method's "
                        f"test {metric} minus `{first}`'s, paired by seed (one seed gives both the same partition, "
                        f"sampling and data order), the mean, std and Student t {CONFIDENCE:.0%} CI of the per-seed "
                        f"differences over the seeds both ran. Trained / never trained: the test {metric} at the "
                        f"selected round of the clients that trained at least once / never, mean ± std over the "
                        f"seeds where the group had test examples (— where none did)."]


def resolve_goal(target: Target, records: Sequence[dict[str, Any]]) -> tuple[float | None, str]:
    """The metric value to reach, and a sentence saying where it comes from. A relative target is a
    share of the highest per-method mean, over seeds, of the best validation metric of a run."""
    if not target.relative:
        return target.value, f"{target.value:g} (absolute)"
    means = {method: iv.mean for method, runs in by_method(records).items()
             if (iv := t_interval(list(_values(runs, lambda r: r["summary"].get("validation_metric")).values())))}
    if not means:
        return None, f"{target.describe()}: no run has a validation metric, so there is no best method"
    best = max(means, key=means.get)
    goal = target.goal(means[best])
    return goal, f"{goal:.4f} = {target.value:.0%} of `{best}`'s mean best validation metric {means[best]:.4f}"


def cost_rows(records: Sequence[dict[str, Any]], goal: float) -> list[dict[str, Any]]:
    """Per method: how many seeds reached ``goal`` on validation, and the mean/std of their costs."""
    rows = []
    for method, runs in by_method(records).items():
        costs = [c for record in runs.values() if (c := cost_to_target(record["history"], goal)) is not None]
        rows.append({"method": method, "goal": goal, "seeds": len(runs), "reached": len(costs),
                     **{name: t_interval([getattr(c, name) for c in costs])
                        for name in COSTS}})
    return rows


def cost_csv_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`cost_rows` flattened to :data:`COST_COLUMNS` for ``cost_to_target.csv``."""
    return [{**{k: r[k] for k in ("method", "goal", "seeds", "reached")},
             **{k: v for name in COSTS for k, v in _flat(name, r[name], ("mean", "std")).items()}} for r in rows]


def cost_table(rows: Sequence[dict[str, Any]], metric: str, source: str) -> list[str]:
    """The cost-to-target section of ``compare.md``: the goal, the table, how it is judged."""
    lines = ["## Cost to target", "",
             f"Target: validation {metric} ≥ {source}. Judged on the validation split only (the test split never "
             f"decides it): a seed reaches the target at its first evaluated round whose validation {metric} is at or "
             f"above it. Costs are mean ± std over the seeds that reached it; `reached` counts them. Training s = "
             f"the sum over rounds of the slowest sampled client's local training seconds; wall s = this machine's "
             f"seconds from the first round's start, evaluation included; MB = bytes up + down so far.", "",
             "| method | reached | rounds | MB communicated | training s (slowest client, summed) | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], f"{r['reached']}/{r['seeds']}", mean_std(r["rounds"], 1),
                                        mean_std(r["mb"], 2), mean_std(r["train_s"], 1),
                                        mean_std(r["wall_s"], 1)]) + " |")
    return lines

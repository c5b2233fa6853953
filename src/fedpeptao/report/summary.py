"""The one run summary (``summary.json``), written by both runtimes from the per-round history."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def run_summary(cfg, metric: str, history: list[dict], algorithm_summary: Mapping[str, Any], *, runtime: str,
                **extra: Any) -> dict[str, Any]:
    """Headline numbers of a run: the selected round and its metrics, the final metric, time and
    rounds to target, bytes, time. Rounds are numbered from 1, as in the rows: round ``n`` is the
    ``n``-th, so the round that first reached the target is also how many rounds it took.

    Honest selection: the round is selected on the validation split only (``val_metric``; the
    earliest of equals), and the test split is reported at that round and at the end. A run
    without validation examples selects its last evaluated round. ``cfg`` is the run's
    :class:`~fedpeptao.config.ExperimentConfig`; ``algorithm_summary`` what the algorithm adds
    (FedPepTAO: its layer selection); ``extra`` what only one runtime knows.
    """
    evaluated = [r for r in history if "metric" in r]
    best = select_round(evaluated)
    target = cfg.federated.target_accuracy
    reached = next((r for r in evaluated if target is not None and r["metric"] >= target), None)
    return {
        "runtime": runtime, "algorithm": cfg.describe(), "method": cfg.method.name, "tuning": cfg.tuning.name,
        "model": cfg.model.name, "task": cfg.data.task, "metric": metric,
        "final_metric": evaluated[-1]["metric"] if evaluated else None,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "selected_round": best["round"] if best else None,
        "validation_metric": best.get("val_metric") if best else None,
        "test_metric_at_selected": best["metric"] if best else None,
        # the same, over clients that trained at least once by then and over those that never did
        "trained_metric_at_selected": best.get("trained_metric") if best else None,
        "untrained_metric_at_selected": best.get("untrained_metric") if best else None,
        # kept for readers of older summaries: the test metric at the round selected on validation
        "best_metric": best["metric"] if best else None, "best_round": best["round"] if best else None,
        "target": target, "rounds_to_target": None if reached is None else reached["round"],
        "seconds_to_target": None if reached is None else reached["train_time_s"],
        "total_mb": history[-1]["total_bytes"] / 1e6 if history else 0.0,
        "elapsed_s": history[-1]["elapsed_s"] if history else 0.0,
        # wall time of the algorithm's phases before rounds (FedPepTAO's layer scores and Hessian ratio)
        "phase_seconds": sum(r.get("phase_s", 0.0) for r in history),
        "shared_layers": None, **dict(algorithm_summary), **extra,
    }


def describe_compute(compute: Mapping[str, Any]) -> str:
    """A summary's ``compute`` in words: ``cpu, fp32 backbone, one client at a time``."""
    sharing = ("one client at a time" if compute.get("execution") == "sequential"
               else f"up to {compute.get('clients_per_pass')} clients per shared pass")
    return f"{compute.get('device')}, {compute.get('precision')} backbone, {sharing}"


def select_round(evaluated: list[dict]) -> dict | None:
    """The evaluated row with the best validation metric (the last row when none has one)."""
    scored = [r for r in evaluated if r.get("val_metric") is not None]
    if not scored:
        return evaluated[-1] if evaluated else None
    return max(scored, key=lambda r: (r["val_metric"], -r["round"]))


def config_difference(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = (),
                      prefix: str = "") -> str | None:
    """The first setting that differs between two config dumps, as ``key: old -> new`` (None: same)."""
    ignore = set(ignore)
    for key in sorted(set(old) | set(new), key=lambda k: (k != "name", k)):  # a union's tag first
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = config_difference(a, b, ignore, f"{dotted}.")
            if found:
                return found
        elif a != b:
            return f"{dotted}: {a!r} -> {b!r}"
    return None

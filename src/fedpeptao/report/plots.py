"""PNG plots for a report, drawn with matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` and an explicit ``FigureCanvasAgg``
rather than ``pyplot``: no global backend switch, no GUI, no figure registry to leak memory when
a long-running process writes many reports. Each function returns the path it wrote, or ``None``
when no run has the data it needs (the report then says so instead of showing an empty plot).
Rounds are drawn counted from 1, as the report's tables count them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedpeptao.report.runs import RunData, finite

DPI = 110


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _round_axis(ax) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _metric_label(runs: list[RunData]) -> str:
    names = {r.metric_name for r in runs}
    return names.pop() if len(names) == 1 else "metric"


def metric_per_round(runs: list[RunData], path: Path, target: float | None = None) -> Path | None:
    """The evaluation metric per round, all runs overlaid; accuracy dashed where it differs from the metric."""
    if not any(r.evaluated for r in runs):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        ev = run.evaluated
        if not ev:
            continue
        x = [r["round"] for r in ev]
        ax.plot(x, [r["metric"] for r in ev], color=f"C{i}", marker="o", markersize=3, label=run.label)
        if run.metric_name != "accuracy" and all("accuracy" in r for r in ev):
            ax.plot(x, [r["accuracy"] for r in ev], color=f"C{i}", linestyle="--", label=f"{run.label} (accuracy)")
    for goal in sorted({g for run in runs if (g := run.target(target)) is not None}):
        ax.axhline(goal, color="grey", linestyle=":", linewidth=1, label=f"target {goal:g}")
    ax.set(ylabel=_metric_label(runs), title="Evaluation per round")
    _round_axis(ax)
    ax.legend(fontsize="small")
    return _save(fig, path)


def loss_per_round(runs: list[RunData], path: Path) -> Path | None:
    """Mean local training loss (solid) and evaluation loss (dashed, eval rounds only) per round."""
    if not any("train_loss" in r or "eval_loss" in r for run in runs for r in run.rows):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        train = [(r["round"], r["train_loss"]) for r in run.rows if "train_loss" in r]
        evals = [(r["round"], r["eval_loss"]) for r in run.rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", label=f"{run.label} train")
        if evals:
            ax.plot(*zip(*evals), color=f"C{i}", linestyle="--", marker="o", markersize=3, label=f"{run.label} eval")
    ax.set(ylabel="loss", title="Loss per round")
    _round_axis(ax)
    ax.legend(fontsize="small")
    return _save(fig, path)


def metric_vs_communication(runs: list[RunData], path: Path) -> Path | None:
    """The metric against cumulative megabytes sent up and down: the paper's cost axis."""
    points = [[(r.get("total_bytes", 0) / 1e6, r["metric"]) for r in run.evaluated if "total_bytes" in r] for run in runs]
    if not any(points):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (run, pts) in enumerate(zip(runs, points)):
        if pts:
            ax.plot(*zip(*pts), color=f"C{i}", marker="o", markersize=3, label=run.label)
    ax.set(xlabel="MB communicated (cumulative, up + down)", ylabel=_metric_label(runs), title="Evaluation vs communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def seed_bands(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: Path, *, key: str = "metric",
               x: Literal["round", "mb"] = "round", ylabel: str = "metric", title: str = "",
               target: float | None = None) -> Path | None:
    """One curve per method over its seeds' histories (``groups``: label -> one row list per seed):
    the mean of ``key`` at every round all its seeds evaluated, shaded mean ± std (sample std, n - 1;
    no shade for one seed), against the round or the seeds' mean cumulative MB at that round.

    Bands rather than one line per seed: with several methods, seed lines tangle, while a band shows
    at a glance whether two methods' spreads overlap. ``target`` draws a dotted line at it."""
    curves = {label: _seed_curve(histories, key, x) for label, histories in groups.items()}
    if not any(xs for xs, _, _ in curves.values()):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, (xs, mean, std)) in enumerate(curves.items()):
        if not xs:
            continue
        ax.plot(xs, mean, color=f"C{i}", marker="o", markersize=3, label=f"{label} (n = {len(groups[label])})")
        if std is not None:
            ax.fill_between(xs, mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.4g}")
    ax.set(ylabel=ylabel, title=f"{title} (mean ± std over seeds)")
    if x == "round":
        _round_axis(ax)
    else:
        ax.set_xlabel("MB communicated (cumulative, up + down)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _seed_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str, x: Literal["round", "mb"]
                ) -> tuple[list[float], np.ndarray, np.ndarray | None]:
    """x, mean and std (None for one seed) of ``key`` over the rounds where every seed has it."""
    per_seed = [{int(r["round"]): r for r in rows if isinstance(r.get(key), (int, float))} for rows in histories]
    rounds = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    if not rounds:
        return [], np.array([]), None
    values = np.array([[d[t][key] for t in rounds] for d in per_seed], dtype=float)  # seeds x rounds
    if x == "round":
        xs = list(rounds)
    else:
        xs = np.mean([[d[t].get("total_bytes", 0) / 1e6 for t in rounds] for d in per_seed], axis=0).tolist()
    std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else None
    return xs, values.mean(axis=0), std


def client_spread(runs: list[RunData], path: Path) -> Path | None:
    """Box plot of per-client accuracy at each run's last round that recorded ``client_accuracy``."""
    data, labels = [], []
    for run in runs:
        row = next((r for r in reversed(run.rows) if isinstance(r.get("client_accuracy"), dict)), None)
        values = finite(list(row["client_accuracy"].values())) if row else []
        if values:
            data.append(values)
            labels.append(f"{run.label}\n(round {row['round']}, {len(values)} clients)")
    if not data:
        return None
    fig = _figure(max(5.0, 1.8 * len(data) + 2), 4.2)
    ax = fig.add_subplot()
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize="small")
    ax.set(ylabel="client accuracy", title="Per-client accuracy spread (last evaluated round)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def layer_selection(runs: list[RunData], path: Path) -> Path | None:
    """Each layer's importance score; the selected (shared) layers drawn in colour, the rest grey."""
    chosen = [(i, run) for i, run in enumerate(runs) if run.selection and run.selection.get("scores")]
    if not chosen:
        return None
    fig = _figure(7.0, 2.6 * len(chosen) + 0.6)
    axes = fig.subplots(len(chosen), 1, squeeze=False)[:, 0]
    for ax, (i, run) in zip(axes, chosen):
        scores = run.selection["scores"]
        shared = set(run.selection.get("layers") or [])
        colors = [f"C{i}" if layer in shared else "lightgrey" for layer in range(len(scores))]
        ax.bar(range(len(scores)), scores, color=colors)
        ratio = run.selection.get("ratio")
        ratio_text = f"ratio {ratio:.3g}, " if isinstance(ratio, (int, float)) else ""
        ax.set(xlabel="layer", ylabel="score", title=f"{run.label}: {ratio_text}{len(shared)} of {len(scores)} layers shared")
        ax.set_xticks(range(len(scores)))
        ax.tick_params(axis="x", labelsize="x-small")
    return _save(fig, path)

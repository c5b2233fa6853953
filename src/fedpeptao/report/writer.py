"""``fedpeptao report``: one Markdown file plus PNG plots comparing one or more runs.

Markdown was chosen because it reads as plain text in a terminal, renders on GitHub and in
notebooks, and diffs well; the images sit next to it and are referenced by relative path so the
report folder can be moved or attached as a whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeptao.report import plots
from fedpeptao.report.runs import ReportError, RunData, read_runs
from fedpeptao.report.summary import describe_compute

REPORT_FILE = "report.md"


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """``RUN_DIR/report`` for one run; ``report`` in the runs' common parent for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    try:
        common = os.path.commonpath([os.path.abspath(p) for p in run_dirs])
    except ValueError:  # different drives on Windows
        common = os.getcwd()
    return Path(common) / "report"


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None, target: float | None = None) -> Path:
    """Read every run, draw the plots, write ``report.md``; return the path of ``report.md``.

    ``target`` overrides each run's own ``federated.target_accuracy`` for the time-to-target
    columns, so runs configured differently can be compared at one bar. Raises
    :class:`ReportError` (naming the directory) before writing anything if a run is unreadable.
    """
    run_dirs = [Path(p) for p in run_dirs]
    runs = read_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, Path | None, str]] = [
        ("Evaluation per round", "metric_per_round.png",
         plots.metric_per_round(runs, out / "metric_per_round.png", target), "no run recorded an evaluation"),
        ("Loss per round", "loss_per_round.png", plots.loss_per_round(runs, out / "loss_per_round.png"),
         "no run recorded a loss"),
        ("Evaluation vs communication", "metric_vs_mb.png",
         plots.metric_vs_communication(runs, out / "metric_vs_mb.png"), "no run recorded bytes communicated"),
        ("Per-client accuracy spread", "client_spread.png", plots.client_spread(runs, out / "client_spread.png"),
         "no run recorded per-client accuracy (`client_accuracy`)"),
        ("Selected layers and their scores", "layer_selection.png",
         plots.layer_selection(runs, out / "layer_selection.png"), "no run has a `selection.json` (FedPepTAO layer selection)"),
    ]
    lines = [
        "# FedPepTAO report", "",
        f"Generated {datetime.now().strftime('%Y-%m-%d %H:%M')} from {len(runs)} run(s). "
        "Rounds are counted from 1. *Seconds to target* is simulated training time: the sum over "
        "rounds of the slowest sampled client's local training time. The round is selected on the "
        "validation split only; the test split is reported at that round and at the end.", "",
        "## Summary", "",
        *_summary_table(runs, target), "",
    ]
    for title, name, written, missing in figures:
        lines += [f"## {title}", ""]
        lines += [f"![{title}]({name})" if written is not None else f"_Not drawn: {missing}._", ""]
    lines += ["## Runs", ""]
    for run in runs:
        lines += _run_section(run, out)
    report = out / REPORT_FILE
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report


_COLUMNS: list[tuple[str, Callable[[RunData, dict[str, Any]], str]]] = [
    ("run", lambda run, h: run.label),
    ("algorithm", lambda run, h: run.algorithm),
    ("model", lambda run, h: str((run.summary or {}).get("model") or run.setting("model.name", "?"))),
    ("task", lambda run, h: str((run.summary or {}).get("task") or run.setting("data.task", "?"))),
    ("metric", lambda run, h: run.metric_name),
    ("validation at selected", lambda run, h: _num(h["validation"], 4)),
    ("test at selected", lambda run, h: _num(h["best"], 4)),
    ("trained / never-trained clients", lambda run, h: f"{_num(h['trained'], 4)} / {_num(h['untrained'], 4)}"),
    ("selected round", lambda run, h: _num(h["best_round"])),
    ("test at end", lambda run, h: _num(h["final"], 4)),
    ("rounds", lambda run, h: str(h["rounds"])),
    ("target", lambda run, h: _num(h["target"], 4)),
    ("rounds to target", lambda run, h: _num(h["rounds_to_target"]) if h["target"] is not None else "—"),
    ("seconds to target", lambda run, h: _num(h["seconds_to_target"], 1) if h["target"] is not None else "—"),
    ("MB communicated", lambda run, h: _num(h["total_mb"], 2)),
    ("epsilon (client-level DP)", lambda run, h: "no DP" if h["epsilon"] is None else _num(h["epsilon"], 3)),
    ("wall time (s)", lambda run, h: _num(h["elapsed_s"], 0)),
]


def _summary_table(runs: list[RunData], target: float | None) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for run in runs:
        h = run.headline(target)
        cells = [_cell(fn(run, h)) for _, fn in _COLUMNS]
        # "not reached" is more useful than a blank when a target was set
        if h["target"] is not None and h["rounds_to_target"] is None:
            cells[[n for n, _ in _COLUMNS].index("rounds to target")] = "not reached"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _run_section(run: RunData, out: Path) -> list[str]:
    try:
        where = os.path.relpath(run.path, out)
    except ValueError:
        where = str(run.path)
    planned = run.setting("federated.rounds")
    status = "finished" if run.summary is not None else (
        f"no summary.json: stopped or still running after {len(run.rows)}"
        + (f" of {planned}" if planned else "") + " rounds")
    lines = [f"### {run.label}", "", f"- directory: `{where}`", f"- status: {status}"]
    fed = run.setting("federated") or {}
    if fed:
        lines.append(f"- clients: {fed.get('clients_per_round', '?')} of {fed.get('num_clients', '?')} per round, "
                     f"{fed.get('rounds', '?')} rounds planned, seed {run.setting('seed', '?')}")
    compute = (run.summary or {}).get("compute")
    if compute:
        lines.append(f"- compute: {describe_compute(compute)}")
    if run.selection:
        layers = run.selection.get("layers")
        ratio = run.selection.get("ratio")
        ratio_text = f" (ratio {ratio:.3g})" if isinstance(ratio, (int, float)) else ""
        lines.append(f"- shared layers{ratio_text}: {layers}")
        scores = run.selection.get("scores")
        if scores:
            # the bar chart starts at zero; close scores are only readable as numbers
            lines.append("- layer scores: " + ", ".join(f"{i}: {s:.4g}" for i, s in enumerate(scores)))
    privacy = (run.summary or {}).get("privacy") or run.setting("privacy")
    if privacy and privacy.get("mode", "none") != "none":
        spent = (run.summary or {}).get("privacy", {}).get("epsilon", run.rows[-1].get("epsilon"))
        lines.append(f"- client-level DP ({privacy['mode']}): epsilon {_num(spent, 3)} at delta "
                     f"{privacy.get('delta')}, noise multiplier {privacy.get('noise_multiplier')}, clip "
                     f"{privacy.get('clip_norm')}, selection {privacy.get('selection')}")
    rejected = sum(len(r.get("rejected", []) or []) for r in run.rows)
    if rejected:
        lines.append(f"- client updates rejected by the server: {rejected}")
    return lines + [""]


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}f}" if digits else f"{value:.0f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["ReportError", "default_out_dir", "write_report"]

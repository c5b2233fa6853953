"""Reading a finished (or crashed, or still running) run directory into one object.

The per-round ``metrics.jsonl`` is the source of truth; ``summary.json`` exists only for runs that
finished, so the headline numbers are recomputed from the rows and the summary/config only supply
labels (algorithm, model, task, metric name, target). That keeps crashed and resumed runs
reportable and consistent with finished ones.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedpeptao.report.summary import select_round


log = logging.getLogger(__name__)


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names it and says why."""


@dataclass
class RunData:
    path: Path
    label: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """Rows with an evaluation; ``metric`` falls back to ``accuracy`` for rows lacking it."""
        out = []
        for row in self.rows:
            if "metric" in row or "accuracy" in row:
                out.append({**row, "metric": row.get("metric", row.get("accuracy"))})
        return out

    def setting(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def algorithm(self) -> str:
        return str((self.summary or {}).get("algorithm") or self.setting("method.name")
                   or self.setting("algorithm", "?"))

    @property
    def metric_name(self) -> str:
        """From summary.json; for an unfinished run, the configured ``data.metric`` (else "metric")."""
        name = (self.summary or {}).get("metric") or self.setting("data.metric")
        return str(name) if name else "metric"

    def target(self, override: float | None = None) -> float | None:
        if override is not None:
            return override
        value = (self.summary or {}).get("target", self.setting("federated.target_accuracy"))
        return None if value is None else float(value)

    def headline(self, target: float | None = None) -> dict[str, Any]:
        """Test metric at the round selected on validation ("best"; the last round for runs without
        validation rows), that round (rows number rounds from 1), the final test metric, rounds
        (a count: round ``n`` ends after ``n`` rounds) and time to target, MB."""
        ev = self.evaluated
        last = self.rows[-1]
        goal = self.target(target)
        out: dict[str, Any] = {
            "best": None, "best_round": None, "final": None, "trained": None, "untrained": None,
            "target": goal, "rounds_to_target": None,
            "seconds_to_target": None, "total_mb": last.get("total_bytes", 0) / 1e6,
            "elapsed_s": last.get("elapsed_s"), "rounds": len(self.rows), "epsilon": last.get("epsilon"),
        }
        if ev:
            best = select_round(ev)
            out.update(best=best["metric"], best_round=best["round"], final=ev[-1]["metric"],
                       validation=best.get("val_metric"), trained=best.get("trained_metric"),
                       untrained=best.get("untrained_metric"))
            reached = next((r for r in ev if goal is not None and _score(r["metric"]) >= goal), None)
            if reached is not None:
                out.update(rounds_to_target=reached["round"], seconds_to_target=reached.get("train_time_s"))
        return out


def read_run(path: Path) -> RunData:
    """Load one run directory; raises :class:`ReportError` if it has no usable ``metrics.jsonl``."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: run directory not found")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path}: no metrics.jsonl (not a run directory, or the run never finished a round)")
    by_round: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_round[int(row["round"])] = row  # a resumed run may repeat rounds: the last write wins
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("%s line %d is not a metrics row (truncated by a crash?); skipped", metrics, number)
    if not by_round:
        raise ReportError(f"{metrics}: no rounds recorded")
    if 0 in by_round:  # written before rounds were numbered from 1 as everywhere else: renumbered
        log.info("%s numbers its rounds from 0 (an older fedpeptao); reported from 1", metrics)
        by_round = {r + 1: {**row, "round": r + 1} for r, row in by_round.items()}
    rows = [by_round[r] for r in sorted(by_round)]
    summary = _json(path / "summary.json")
    selection = (summary or {}).get("selection") or _json(path / "selection.json")  # older runs kept a file
    return RunData(path=path, label=path.name, rows=rows, summary=summary, selection=selection,
                   config=_yaml(path / "config.yaml"))


def read_runs(paths: list[Path]) -> list[RunData]:
    """Read every run and give each a short label that is unique among them."""
    if not paths:
        raise ReportError("no run directories given")
    runs = [read_run(p) for p in paths]
    labels = [r.path.name for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    seen: dict[str, int] = {}
    for run, label in zip(runs, labels):
        seen[label] = seen.get(label, 0) + 1
        run.label = label if labels.count(label) == 1 else f"{label} ({seen[label]})"
    return runs


def _score(value: Any) -> float:
    """A metric as a comparable float: missing or NaN ranks below everything."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; ignored", path)
        return None
    return data if isinstance(data, dict) else None


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        log.warning("%s is not valid YAML; ignored", path)
        return {}
    return data if isinstance(data, dict) else {}

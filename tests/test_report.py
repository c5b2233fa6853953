"""``write_report`` on synthetic run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fedpeptao.report import ReportError, read_run, write_report

PLOTS = ["metric_per_round.png", "loss_per_round.png", "metric_vs_mb.png", "client_spread.png", "layer_selection.png"]


def make_run(root: Path, name: str, algorithm: str, accs: list[float], *, eval_every: int = 1, summary: bool = True,
             selection: bool = False, client_acc: bool = False, target: float | None = 0.7,
             vals: list[float] | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"algorithm": algorithm, "seed": 0, "model": {"name": "tiny-bert"}, "data": {"task": "sst2"},
           "federated": {"num_clients": 10, "clients_per_round": 3, "rounds": len(accs), "eval_every": eval_every,
                         "target_accuracy": target}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows, total, train_time = [], 0, 0.0
    for t, acc in enumerate(accs):
        total += 250_000
        train_time += 1.5
        row = {"round": t + 1, "clients": [0, 1, 2], "bytes_up": 125_000, "bytes_down": 125_000, "slowest_client_s": 1.5,
               "train_loss": 1.0 / (t + 1)}
        if (t + 1) % eval_every == 0 or t == len(accs) - 1:
            row.update(accuracy=acc, metric=acc, eval_loss=0.9 / (t + 1))
            if vals is not None:
                row["val_metric"] = vals[t]
            if client_acc:
                row["client_accuracy"] = {"0": acc - 0.1, "1": acc, "2": acc + 0.05, "4": acc + 0.1}
        row.update(shared_tensors=4, train_time_s=train_time, total_bytes=total, elapsed_s=2.0 * (t + 1))
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        best = max(range(len(accs)), key=lambda i: accs[i])
        (run / "summary.json").write_text(json.dumps({"algorithm": algorithm, "model": "tiny-bert", "task": "sst2",
                                                      "metric": "accuracy", "best_round": best + 1, "target": target}))
    if selection:
        (run / "selection.json").write_text(json.dumps(
            {"scores": [3.0, 9.5, 1.2, 7.7], "ranking": [1, 3, 0, 2], "ratio": 0.5, "layers": [1, 3]}))
    return run


def table_row(report: str, label: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def header(report: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith("| run |"))
    return [c.strip() for c in line.strip("|").split("|")]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 100
        img.verify()


def test_two_runs_table_and_plots(tmp_path):
    a = make_run(tmp_path, "peptao", "fedpeptao", [0.5, 0.6, 0.75, 0.8125, 0.8], selection=True, client_acc=True,
                 vals=[0.5, 0.7, 0.74, 0.72, 0.74])  # validation selects round 3, not test's best round 4
    b = make_run(tmp_path, "avg", "fedavg", [0.5, 0.55, 0.6, 0.65], eval_every=2, summary=False)
    out = tmp_path / "out"
    report_path = write_report([a, b], out)
    assert report_path == out / "report.md"
    text = report_path.read_text()
    cols = header(text)
    ra = dict(zip(cols, table_row(text, "peptao")))
    assert ra["algorithm"] == "fedpeptao" and ra["test at selected"] == "0.7500" and ra["selected round"] == "3"
    assert ra["validation at selected"] == "0.7400"
    assert ra["test at end"] == "0.8000" and ra["rounds to target"] == "3" and ra["seconds to target"] == "4.5"
    assert ra["MB communicated"] == "1.25" and ra["model"] == "tiny-bert"
    rb = dict(zip(cols, table_row(text, "avg")))
    assert rb["algorithm"] == "fedavg"  # from config.yaml: this run has no summary.json
    # no validation rows: the last round is reported, never the best test round
    assert rb["test at selected"] == "0.6500" and rb["selected round"] == "4" and rb["rounds to target"] == "not reached"
    assert "stopped or still running" in text and "shared layers (ratio 0.5): [1, 3]" in text
    assert "layer scores: 0: 3, 1: 9.5, 2: 1.2, 3: 7.7" in text
    for name in PLOTS:
        assert f"]({name})" in text
        assert_png(out / name)


def test_single_run_defaults_and_missing_plots(tmp_path):
    run = make_run(tmp_path, "only", "fedavg", [0.4, 0.45], target=None)
    report_path = write_report([run])
    assert report_path == run / "report" / "report.md"
    text = report_path.read_text()
    row = dict(zip(header(text), table_row(text, "only")))
    assert row["target"] == "—" and row["rounds to target"] == "—"
    assert "_Not drawn: no run has a `selection.json`" in text
    assert "_Not drawn: no run recorded per-client accuracy" in text
    assert not (run / "report" / "layer_selection.png").exists()
    assert_png(run / "report" / "metric_per_round.png")


def test_target_override(tmp_path):
    run = make_run(tmp_path, "r", "fedavg", [0.4, 0.45, 0.5], target=None)
    text = write_report([run], tmp_path / "o", target=0.45).read_text()
    row = dict(zip(header(text), table_row(text, "r")))
    assert row["target"] == "0.4500" and row["rounds to target"] == "2"


def test_crashed_and_resumed_metrics_are_tolerated(tmp_path):
    run = make_run(tmp_path, "r", "fedavg", [0.4, 0.45, 0.5], summary=False)
    with (run / "metrics.jsonl").open("a") as fh:  # a resume repeated round 3, then a crash cut a line
        fh.write(json.dumps({"round": 3, "accuracy": 0.9, "metric": 0.9, "total_bytes": 1}) + "\n")
        fh.write('{"round": 4, "accur')
    data = read_run(run)
    assert [r["round"] for r in data.rows] == [1, 2, 3] and data.rows[-1]["metric"] == 0.9
    assert data.headline()["best"] == 0.9


def test_rows_of_an_older_run_numbered_from_0_are_reported_from_1(tmp_path):
    run = make_run(tmp_path, "old", "fedavg", [0.4, 0.8, 0.6], summary=False, target=0.75)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "round": r["round"] - 1}) + "\n" for r in rows))
    data = read_run(run)
    assert [r["round"] for r in data.rows] == [1, 2, 3]
    assert data.headline()["best_round"] == 3 and data.headline()["rounds_to_target"] == 2


def test_same_names_get_distinct_labels(tmp_path):
    a = make_run(tmp_path / "x", "run", "fedavg", [0.5])
    b = make_run(tmp_path / "y", "run", "fedpeptao", [0.6])
    text = write_report([a, b], tmp_path / "o").read_text()
    assert table_row(text, "x/run")[1] == "fedavg" and table_row(text, "y/run")[1] == "fedpeptao"


def test_unreadable_runs_fail_clearly(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        write_report([tmp_path / "empty"])
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(ReportError, match="no rounds"):
        write_report([tmp_path / "empty"])
    with pytest.raises(ReportError):
        write_report([])


def test_seed_bands_draw_the_mean_and_spread_over_seeds(tmp_path):
    from fedpeptao.report.plots import _seed_curve, seed_bands

    def history(vals, every=1):  # seed 1 skips round 2's evaluation: only rounds both seeds have are drawn
        return [{"round": t + 1, "metric": v, "total_bytes": 1000 * (t + 1)} for t, v in enumerate(vals) if t % every == 0]

    groups = {"a": [history([0.5, 0.6, 0.7]), history([0.7, 0.8, 0.9], every=2)], "b": [history([0.4, 0.5, 0.6])]}
    xs, mean, std = _seed_curve(groups["a"], "metric", "mb")
    assert xs == [0.001, 0.003] and list(mean) == pytest.approx([0.6, 0.8]) and list(std) == pytest.approx([0.1414214] * 2)
    xb, _, std_b = _seed_curve(groups["b"], "metric", "round")
    assert xb == [1, 2, 3] and std_b is None  # one seed: a line without a band
    assert_png(seed_bands(groups, tmp_path / "mb.png", x="mb", target=0.8))
    assert seed_bands(groups, tmp_path / "none.png", key="val_metric") is None

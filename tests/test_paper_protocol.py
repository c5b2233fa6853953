"""``benchmarks/paper_protocol.py``: its pieces are resumable compare commands, an ablation starts
from the main comparison's FedPepTAO runs, and the README it writes reads the pieces' tables."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_protocol as study  # noqa: E402

from fedpeptao.compare.seeds import SEED_COLUMNS  # noqa: E402


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "OUT", tmp_path / "paper-protocol")
    monkeypatch.setattr(study, "REPO", tmp_path)
    return tmp_path / "paper-protocol"


def write_csv(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SEED_COLUMNS)
        writer.writeheader()
        writer.writerows([{c: row.get(c, "") for c in SEED_COLUMNS} for row in rows])


def test_every_piece_is_a_resumable_compare_over_its_seeds(out):
    pieces = study.pieces()
    assert {"main:mr", "main:sst-2", "main:rte", "main:mrpc", "ablations:mr", "ablations:rte", "sweep:steps-1"} <= set(pieces)
    main = pieces["main:mr"].command()
    assert main[:3] == ["fedpeptao", "compare", "configs/paper/mr.toml"] and main[-1] == "--resume"
    assert main[main.index("--seeds") + 1] == "0,1,2" and main[main.index("--methods") + 1].startswith("fedpeptao,")
    steps = pieces["sweep:steps-1"].command()
    assert "client.batch_size=64" in steps and steps[steps.index("--methods") + 1] == "fedpeptao,fedpeptao-previous,fedavg"


def test_an_ablation_starts_from_the_main_runs_and_the_readme_reads_the_tables(out):
    pieces = study.pieces()
    runs = pieces["main:mr"].out / "runs" / "fedpeptao"
    runs.mkdir(parents=True)
    (runs / "seed-0.json").write_text(json.dumps({"method": "fedpeptao", "wall_s": 100.0, "summary": {}}))
    study.borrow_runs(pieces["ablations:mr"])
    assert (pieces["ablations:mr"].out / "runs" / "fedpeptao" / "seed-0.json").is_file()
    study.borrow_runs(pieces["sweep:steps-1"])  # overrides: nothing of main's fits
    assert not pieces["sweep:steps-1"].out.exists()
    write_csv(pieces["main:mr"].out, [
        {"method": "fedpeptao", "seeds": 3, "test_mean": 0.8, "test_ci_low": 0.75, "test_ci_high": 0.85, "mb_mean": 14.0},
        {"method": "fedavg", "seeds": 2, "test_mean": 0.7, "test_ci_low": 0.6, "test_ci_high": 0.8, "mb_mean": 22.0,
         "difference_mean": -0.1, "difference_ci_low": -0.2, "difference_ci_high": 0.0}])
    with (pieces["main:mr"].out / "compare_runs.csv").open("w", newline="") as f:
        f.write("method,seed,final,wall_s\nfedpeptao,0,0.79,100.0\n")
    sweep = pieces["sweep:steps-1"]
    write_csv(sweep.out, [{"method": "fedpeptao", "seeds": 1, "test_mean": 0.65}])
    (sweep.out / "compare_runs.csv").write_text("method,seed,final,wall_s\nfedpeptao,0,0.472,90.0\n")
    (sweep.out / "runs" / "fedpeptao").mkdir(parents=True)
    (sweep.out / "runs" / "fedpeptao" / "seed-0.json").write_text(json.dumps(
        {"method": "fedpeptao", "config": {"seed": 0},
         "summary": {"stability": {"local_steps": 1.0, "first_contact_ratio": -1.25, "correction": "published"}}}))
    study.write_stability(sweep)  # kept beside the tables: the run records need not travel
    text = study.report("2")
    assert "| 0.650 (0.472) | not run | not run | 1 | -1.25 |" in text
    assert "| fedpeptao | 0.800 ± 0.050 | not run | not run | not run |" in text
    assert "| fedavg | 0.700 ± 0.100 (2 seeds) |" in text and "| fedavg | -0.100 [-0.200, +0.000] |" in text
    assert "| main:mr | 1/15 | 100 |" in text and "OMP_NUM_THREADS=2" in text
    assert "2 runs, 190 s (0.1 h)" in text


def test_a_stable_piece_borrows_every_run_it_shares_and_reports_each_seeds_last_round(out):
    pieces = study.pieces()
    for piece, method, seed in [("main:mr", "fedavg", 1), ("sweep:base", "fedpeptao-previous", 0),
                                ("sweep:alpha-10", "fedpeptao-previous", 1)]:
        folder = pieces[piece].out / "runs" / method
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"seed-{seed}.json").write_text(json.dumps({"method": method}))
    stable = pieces["stable:mr"]
    study.borrow_runs(stable)
    assert sorted(p.relative_to(stable.out / "runs").as_posix() for p in (stable.out / "runs").rglob("*.json")) == [
        "fedavg/seed-1.json", "fedpeptao-previous/seed-0.json"]  # not alpha-10's: its config differs
    write_csv(stable.out, [{"method": "fedpeptao-previous", "seeds": 3, "test_mean": 0.77, "test_ci_low": 0.76,
                            "test_ci_high": 0.78, "difference_mean": 0.05, "difference_ci_low": 0.01,
                            "difference_ci_high": 0.09}])
    (stable.out / "compare_runs.csv").write_text(
        "method,seed,final,wall_s\nfedpeptao-previous,0,0.771,90.0\nfedpeptao-previous,2,0.765,90.0\n")
    assert "| fedpeptao-previous | 0.770 ± 0.010 | +0.050 [+0.010, +0.090] | 0.771 / — / 0.765 | not run |" \
        in study.report("2")

"""``fedpeptao compare --seeds`` and ``--target``: statistics over seeds, paired differences, cost
to target on validation, resume per (method, seed), and ``fedpeptao run --seeds``."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import write_task
from scipy import stats

from fedpeptao.cli import main
from fedpeptao.compare.runner import compare_main, parse_seeds, record_path, run_comparison
from fedpeptao.compare.seeds import cost_rows, resolve_goal, seed_rows
from fedpeptao.report.cost import Cost, Target, cost_to_target, parse_target
from fedpeptao.report.stats import paired_interval, t_interval
from fedpeptao.sim import simulator

T_975_3 = 3.182446305284263  # t_{0.975, 3}, from a table: the interval must not merely agree with itself


def same(a, b) -> bool:
    """Two intervals equal up to float rounding."""
    return a.n == b.n and pytest.approx((a.mean, a.std, a.low, a.high)) == (b.mean, b.std, b.low, b.high)


def tiny(task, rounds: int = 2) -> list[str]:
    return [f"data.task={task}", "model.name=tiny-bert", "federated.num_clients=4", "federated.clients_per_round=2",
            f"federated.rounds={rounds}", "client.epochs=1", "client.batch_size=4", "tuning.num_prompt_tokens=2",
            "model.max_length=16", "progress=false"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("seeds") / "task")


def test_t_interval_is_the_textbook_formula():
    values = [0.80, 0.82, 0.79, 0.85]
    mean = sum(values) / 4
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    iv = t_interval(values)
    assert iv.n == 4 and iv.mean == pytest.approx(mean) and iv.std == pytest.approx(s)
    assert stats.t.ppf(0.975, 3) == pytest.approx(T_975_3)
    assert (iv.low, iv.high) == pytest.approx((mean - T_975_3 * s / 2, mean + T_975_3 * s / 2))
    one = t_interval([0.7])
    assert (one.mean, one.std, one.low, one.high) == (0.7, None, None, None)
    assert t_interval([]) is None
    # paired: the interval of the per-seed differences, not of the two means
    assert same(paired_interval([0.8, 0.7, 0.9], [0.75, 0.68, 0.8]), t_interval([0.05, 0.02, 0.1]))
    with pytest.raises(ValueError):
        paired_interval([0.8], [0.7, 0.6])


def test_parse_target_and_seeds():
    assert parse_target("0.8") == Target(0.8) and parse_target(" 95% ") == Target(0.95, relative=True)
    assert Target(0.95, relative=True).goal(0.8) == pytest.approx(0.76) and Target(0.8).goal(None) == 0.8
    for bad in ("fast", "0%", "120%", "nan"):
        with pytest.raises(ValueError):
            parse_target(bad)
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,0", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)


def rows(vals, tests=None):
    """metrics.jsonl rows: 100 kB, 1.5 training s and 2 wall s a round; ``tests`` default to 1.0."""
    return [{"round": t + 1, "val_metric": v, "metric": 1.0 if tests is None else tests[t], "total_bytes": 100_000 * (t + 1),
             "train_time_s": 1.5 * (t + 1), "elapsed_s": 2.0 * (t + 1)} for t, v in enumerate(vals)]


def test_cost_to_target_is_judged_on_validation():
    history = rows([0.5, 0.7, 0.82, 0.9])  # the test metric is 1.0 from round 1: it must not decide
    assert cost_to_target(history, 0.8) == Cost(rounds=3, mb=0.3, train_s=4.5, wall_s=6.0)
    assert cost_to_target(history, 0.95) is None
    assert cost_to_target([{k: v for k, v in r.items() if k != "val_metric"} for r in history], 0.1) is None


def record(method, seed, vals, test):
    return {"method": method, "config": {"seed": seed}, "history": rows(vals), "wall_s": 1.0, "params_per_message": 10,
            "summary": {"metric": "accuracy", "validation_metric": max(vals), "test_metric_at_selected": test,
                        "best_metric": test, "best_round": vals.index(max(vals)) + 1, "total_mb": 0.1 * len(vals),
                        "trainable_parameters": 10}}


def test_seed_statistics_and_relative_cost_on_synthetic_records():
    records = [record("a", 0, [0.6, 0.8], 0.80), record("a", 1, [0.7, 0.9], 0.70),
               record("b", 1, [0.5, 0.9], 0.68), record("b", 0, [0.5, 0.4], 0.75)]  # b's seeds in another order
    a, b = seed_rows(records)
    assert a["seeds"] == [0, 1] and a["test"] == t_interval([0.80, 0.70]) and a["difference"] is None
    assert same(b["difference"], paired_interval([0.75, 0.68], [0.80, 0.70]))  # paired by seed, not by position
    assert b["validation"] == t_interval([0.9, 0.5]) and b["selected_round"].mean == pytest.approx(1.5)
    assert a["trained"] is None and a["untrained"] is None  # summaries without the split: no group, no number
    records[0]["summary"].update(trained_metric_at_selected=0.9, untrained_metric_at_selected=None)
    records[1]["summary"].update(trained_metric_at_selected=0.7, untrained_metric_at_selected=0.6)
    a = seed_rows(records)[0]
    assert a["trained"] == t_interval([0.9, 0.7]) and a["untrained"] == t_interval([0.6])  # only where it existed
    goal, source = resolve_goal(Target(0.9, relative=True), records)
    assert goal == pytest.approx(0.9 * 0.85) and "`a`" in source  # a's mean best validation 0.85 beats b's 0.7
    ca, cb = cost_rows(records, goal)
    assert (ca["reached"], ca["seeds"], cb["reached"]) == (2, 2, 1)
    assert ca["rounds"] == t_interval([2, 2]) and ca["mb"].mean == pytest.approx(0.2)
    assert cb["rounds"].mean == 2 and cb["rounds"].std is None and cb["wall_s"].mean == 4.0


def test_compare_seeds_writes_statistics_and_resumes_per_run(task, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    args = argparse.Namespace(config=None, overrides=tiny(task), methods="fedavg,fedprompt", out=str(out),
                              resume=False, seeds=[0, 1], target=Target(0.9, relative=True))
    assert compare_main(args) == 0
    assert "--seeds 0,1 --target 90%" in (out / "command.txt").read_text()
    table = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in table] == ["fedavg", "fedprompt"] and {r["seeds"] for r in table} == {"2"}
    assert table[0]["difference_mean"] == "" and table[1]["difference_ci_low"] != ""
    runs = list(csv.DictReader((out / "compare_runs.csv").open()))
    assert [(r["method"], r["seed"]) for r in runs] == [("fedavg", "0"), ("fedprompt", "0"), ("fedavg", "1"),
                                                        ("fedprompt", "1")]
    tests = {(r["method"], r["seed"]): float(r["test_at_selected"]) for r in runs}
    ci = t_interval([tests["fedprompt", s] - tests["fedavg", s] for s in "01"])
    assert float(table[1]["difference_mean"]) == pytest.approx(ci.mean)
    assert float(table[1]["difference_ci_high"]) == pytest.approx(ci.high)
    md = (out / "compare.md").read_text()
    assert "test, trained clients | test, never trained" in md and table[0]["trained_mean"] != ""
    assert "mean ± std | 95% CI | Δ vs fedavg" in md and "Student t over seeds" in md and "scipy.stats.t" in md
    assert "## Cost to target" in md and "judged on the validation split only" in md.lower()
    cost = list(csv.DictReader((out / "cost_to_target.csv").open()))
    assert [int(r["seeds"]) for r in cost] == [2, 2] and int(cost[0]["reached"]) >= 1
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "validation_vs_mb.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = {(m, s): record_path(out, m, s) for m in ("fedavg", "fedprompt") for s in (0, 1)}
    assert all(p.is_file() for p in paths.values()) and json.loads(paths["fedavg", 1].read_text())["config"]["seed"] == 1
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    built = []
    real = simulator.Simulation

    def counting(cfg, *a, **kw):
        built.append((cfg.describe(), cfg.seed))
        return real(cfg, *a, **kw)

    monkeypatch.setattr(simulator, "Simulation", counting)
    run_comparison(None, ["fedavg", "fedprompt"], tiny(task), out, resume=True, seeds=[0, 1, 2])
    assert built == [("fedavg", 2), ("fedavg-input_prompt", 2)]  # only the new seed ran
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes
    assert [r["seeds"] for r in csv.DictReader((out / "compare.csv").open())] == ["3", "3"]


def test_run_seeds_makes_one_run_directory_per_seed(task, tmp_path, capsys):
    assert main(["run", *tiny(task, rounds=1), f"output_dir={tmp_path}", "run_name=rep", "--seeds", "3,4"]) == 0
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["seed-3", "seed-4"]
    assert all((tmp_path / "rep" / f"seed-{s}" / "metrics.jsonl").is_file() for s in (3, 4))
    printed = capsys.readouterr().out
    assert "over seeds 3, 4" in printed and "95% CI" in printed and "Student t" in printed
    assert main(["run", *tiny(task, rounds=1), f"output_dir={tmp_path}", "run_name=rep", "--seeds", "5"]) == 2  # exists


def test_a_fixed_partition_holds_the_data_across_seeds_and_the_rest_varies(task_dir):
    """``data.partition_seed`` (what ``--fixed-partition`` sets) fixes what each client holds; the
    run's seed still changes the initial tensors."""
    from fedpeptao.config import load_config
    from fedpeptao.experiment import build_federation

    base = ["model.name=tiny-bert", f"data.task={task_dir}", "federated.num_clients=3",
            "federated.clients_per_round=2", "data.partition_seed=0"]
    one, two = (build_federation(load_config(None, [*base, f"seed={s}"])) for s in (0, 1))
    free = build_federation(load_config(None, [*base[:-1], "seed=1"]))
    same = all(np.array_equal(a, b) for a, b in zip(one.train_parts, two.train_parts))
    assert same and all(np.array_equal(a, b) for a, b in zip(one.val_parts, two.val_parts))
    assert not all(np.array_equal(a, b) for a, b in zip(one.train_parts, free.train_parts))
    assert not torch.equal(one.initial["head.weight"], two.initial["head.weight"])

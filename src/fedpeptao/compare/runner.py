"""``fedpeptao compare``: run several methods on one task, partition, seed and budget; table and plots.

Every method is a preset of :mod:`fedpeptao.compare.presets` (an algorithm x tuning), built from
the same config file and overrides, so backbone, data caps, partition, seed, client sampling, local
epochs, batch size, device optimiser and round budget are identical; the runner checks that the
client partitions really are identical under each seed and stops if not. Each method gets a
freshly loaded backbone (LoRA and adapters modify theirs).

``--seeds 0,1,2`` repeats the whole comparison once per seed (a seed changes what
:mod:`fedpeptao.compare.seeds` lists, for every method alike) and reports each method's mean, std
and Student-t interval over the seeds and its paired difference to the first method.
``--target`` adds the cost to reach a validation metric (:mod:`fedpeptao.report.cost`).

Outputs in ``out_dir``:

- ``compare.md`` / ``compare.csv``: with one seed, per method the validation and test metric at the
  round selected on validation, the final test metric, rounds and training seconds to the config's
  ``federated.target_accuracy`` (judged on test, as the run summary does), MB communicated (up +
  down, all rounds), trainable parameters, parameters per uplink message, wall and CPU seconds;
  with ``--seeds``, mean ± std and intervals over the seeds, and ``compare_runs.csv`` with every
  (method, seed) run's row;
- ``cost_to_target.csv`` and a section of ``compare.md`` (with ``--target``);
- ``accuracy_vs_round.png``, ``accuracy_vs_mb.png`` (bands over seeds with ``--seeds``), and
  ``validation_vs_mb.png`` with the target line (with ``--target``);
- ``runs/<method>.json`` (``runs/<method>/seed-<s>.json`` with ``--seeds``): a run's config,
  summary and per-round history; ``--resume`` reuses it when its config is the same;
- ``command.txt``: the command that made them.

"Seconds to target" is the simulator's training time: per round, the slowest sampled client's
local training time, summed (SPEC section 4), so it does not count evaluation.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpeptao.report.cost import Target

DEFAULT_OUT = "docs/results/compare"
COLUMNS = ["method", "validation", "test_at_selected", "trained_at_selected", "untrained_at_selected", "selected_round", "final", "rounds_to_target", "seconds_to_target", "mb_communicated",
           "trainable_params", "params_per_message", "wall_s", "cpu_s"]
RUN_COLUMNS = ["method", "seed", *COLUMNS[1:]]  # compare_runs.csv: one row per (method, seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` arguments; imports nothing heavy, so ``--help`` stays instant."""
    parser.add_argument("config", nargs="?", help="TOML or YAML config file shared by every method")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")
    parser.add_argument("--methods", default=None,
                        help="comma-separated presets (default: FedPepTAO and the paper's baselines: fedpeptao, fedavg, "
                             "fedprompt, lpt, lora, adapter, idpg, attempt, fedprox, scaffold, moon, fedadam, fedyogi, "
                             "fedadagrad; also fedpeptao-lora, fedpeptao-all-layers, fedpeptao-no-cv, "
                             "fedpeptao-no-momentum, fedpeptao-sgd, fedpeptao-previous)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs already in the output folder whose config is the same")
    parser.add_argument("--seeds", type=parse_seeds, default=None,
                        help="comma-separated seeds (0,1,2): every method runs once per seed, and the table shows "
                             "mean ± std, Student t 95%% intervals and paired differences to the first method. A seed "
                             "changes the data subsamples, the partition, the initial tensors, the client sampling and "
                             "the data order, alike for every method (default: the config's seed, one run per method)")
    parser.add_argument("--fixed-partition", action="store_true",
                        help="with --seeds: every seed trains on the first seed's data and partition "
                             "(data.partition_seed), so the seeds differ only in the initial tensors, the client "
                             "sampling, the data order, dropout and DP noise")
    parser.add_argument("--target", type=_parse_target, default=None,
                        help="cost to target, judged on the validation metric: rounds, MB and seconds until it "
                             "reaches an absolute value (0.8) or a share of the best method's mean best validation "
                             "metric (95%%)")


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` as distinct integers, in the given order (argparse reports the ValueError)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 0,1,2")
    return seeds


def _parse_target(text: str) -> Target:
    """:func:`~fedpeptao.report.cost.parse_target`, imported on use (the report package loads
    matplotlib), its message shown by argparse."""
    from fedpeptao.report.cost import parse_target  # noqa: PLC0415

    try:
        return parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def compare_main(args: argparse.Namespace) -> int:
    """Entry point for ``fedpeptao compare`` (argparse namespace from :func:`add_arguments`)."""
    if args.config and "=" in args.config:  # `fedpeptao compare rounds=3`: the first override is no file
        args.overrides.insert(0, args.config)
        args.config = None
    if args.methods is None:
        from fedpeptao.compare.presets import DEFAULT_PRESETS  # noqa: PLC0415

        methods = list(DEFAULT_PRESETS)
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds, target = getattr(args, "seeds", None), getattr(args, "target", None)
    command = shlex.join(["fedpeptao", "compare", *([args.config] if args.config else []), *args.overrides,
                          "--methods", ",".join(methods), "--out", str(args.out)]
                         + (["--seeds", ",".join(map(str, seeds))] if seeds else [])
                         + (["--fixed-partition"] if getattr(args, "fixed_partition", False) else [])
                         + (["--target", f"{target.value:.0%}" if target.relative else f"{target.value:g}"]
                            if target else [])
                         + (["--resume"] if args.resume else []))
    overrides = list(args.overrides)
    if getattr(args, "fixed_partition", False):
        if not seeds:
            raise ValueError("--fixed-partition needs --seeds")
        overrides.append(f"data.partition_seed={seeds[0]}")
    out = run_comparison(args.config, methods, overrides, args.out, command=command, resume=args.resume,
                         seeds=seeds, target=target)
    print((out / "compare.md").read_text())
    print(f"written to {out}")
    return 0


def _fingerprint(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"|" + ",".join(map(str, part.tolist())).encode())
    return digest.hexdigest()[:16]


def record_path(out: Path, method: str, seed: int | None) -> Path:
    """Where a run's record lives: ``runs/<method>.json`` without ``--seeds`` (the layout before
    seeds existed, so old comparisons still resume), ``runs/<method>/seed-<s>.json`` with them."""
    return out / "runs" / (f"{method}.json" if seed is None else f"{method}/seed-{seed}.json")


def run_comparison(config_path: str | Path | None, methods: Sequence[str], overrides: Sequence[str] = (),
                   out_dir: str | Path = DEFAULT_OUT, command: str | None = None, resume: bool = False,
                   seeds: Sequence[int] | None = None, target: Target | None = None) -> Path:
    """Run every method (once per seed of ``seeds``, seed by seed) and write the table, plots and
    per-run records; returns ``out_dir``. ``seeds=None`` runs the config's own seed once."""
    import torch  # noqa: PLC0415

    from fedpeptao.compare.presets import get_preset, preset_config  # noqa: PLC0415

    resolved = [get_preset(m) for m in methods]  # unknown names fail before any work
    if not resolved:
        raise ValueError("no methods to compare")
    runs = [(method, seed, preset_config(config_path, method, [*overrides, *([f"seed={seed}"] if seed is not None else [])]))
            for seed in (seeds or [None]) for method in resolved]  # and bad settings too
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    command = command or shlex.join(["fedpeptao", "compare", *([str(config_path)] if config_path else []),
                                     *overrides, "--methods", ",".join(methods), "--out", str(out_dir)])
    (out / "command.txt").write_text(command + "\n")
    environment = _environment(torch)
    records: list[dict[str, Any]] = []
    partitions: dict[int, str] = {}  # seed -> the client partition every method must share
    for method, seed, cfg in runs:
        path = record_path(out, method.name, seed)
        record = _reusable(path, cfg) if resume else None
        if record is None:
            record = _run_one(method, cfg, partitions.get(cfg.seed))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1, default=float))
        partitions.setdefault(cfg.seed, record["partition"])
        records.append(record)
        write_outputs(records, out, command, environment, plots=False, repeated=seeds is not None, target=target)
    write_outputs(records, out, command, environment, repeated=seeds is not None, target=target)
    return out


def _reusable(path: Path, cfg) -> dict[str, Any] | None:
    """The finished record at ``path`` when it was made with exactly ``cfg`` (``--resume``)."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("config") != cfg.model_dump(mode="json"):
        return None
    print(f"[compare] {old['method']} seed {cfg.seed}: reusing {path}", file=sys.stderr)
    return old


def _run_one(method, cfg, partition: str | None) -> dict[str, Any]:
    """Train one (method, seed) run and return its record; refuses a client partition that differs
    from ``partition`` (the other methods' under this seed): the comparison would not be fair."""
    from fedpeptao.sim.simulator import Simulation  # noqa: PLC0415

    print(f"[compare] {method.name} seed {cfg.seed}: {method.summary}", file=sys.stderr, flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    sim = Simulation(cfg)
    fingerprint = _fingerprint(list(sim.train_parts) + list(sim.eval_parts))
    if partition is not None and fingerprint != partition:
        raise RuntimeError(f"{method.name}: client partition differs from the other methods' ({fingerprint} != "
                           f"{partition}); the comparison would not be fair")
    history = sim.run()
    summary = sim.summary()
    summary["algorithm"] = method.name
    return {
        "method": method.name, "description": method.summary, "shared": method.shared,
        "parameters_formula": method.parameters, "config": cfg.model_dump(mode="json"), "partition": fingerprint,
        "summary": summary, "history": history, "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start, "params_per_message": summary["params_per_message"],
    }


def _environment(torch) -> dict:
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine()}


def table_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        s = r["summary"]
        rows.append({
            "method": r["method"], "validation": s.get("validation_metric"),
            "test_at_selected": s.get("test_metric_at_selected", s["best_metric"]),
            "trained_at_selected": s.get("trained_metric_at_selected"),
            "untrained_at_selected": s.get("untrained_metric_at_selected"),
            "selected_round": s["best_round"], "final": s["final_metric"],
            "rounds_to_target": s["rounds_to_target"], "seconds_to_target": s["seconds_to_target"],
            "mb_communicated": s["total_mb"], "trainable_params": s["trainable_parameters"],
            "params_per_message": r["params_per_message"], "wall_s": r["wall_s"], "cpu_s": r.get("cpu_s"),
        })
    return rows


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_outputs(records: list[dict], out: Path, command: str, environment: dict, plots: bool = True,
                  repeated: bool = False, target: Target | None = None) -> None:
    """``compare.md`` and its CSVs (a row per method, or with ``repeated`` seeds statistics over
    them and ``compare_runs.csv``), the cost-to-target section for a ``target``, and the plots."""
    from fedpeptao.compare.seeds import (COST_COLUMNS, SEED_COLUMNS, by_method, cost_csv_rows, cost_rows,  # noqa: PLC0415
                                         cost_table, resolve_goal, seed_csv_rows, seed_of, seed_rows, seed_table)

    metric = records[0]["summary"]["metric"]
    lines = _preamble(records, command, environment, repeated)
    if repeated:
        rows = seed_rows(records)
        _write_csv(out / "compare.csv", SEED_COLUMNS, seed_csv_rows(rows))
        _write_csv(out / "compare_runs.csv", RUN_COLUMNS,
                   [{**row, "seed": seed_of(r)} for row, r in zip(table_rows(records), records)])
        lines += seed_table(rows, metric)
    else:
        rows = table_rows(records)
        _write_csv(out / "compare.csv", COLUMNS, rows)
        lines += _single_seed_table(rows, metric)
    goal = None
    if target is not None:
        goal, source = resolve_goal(target, records)
        if goal is None:
            lines += ["", f"Cost to target: {source}."]
        else:
            costs = cost_rows(records, goal)
            _write_csv(out / "cost_to_target.csv", COST_COLUMNS, cost_csv_rows(costs))
            lines += ["", *cost_table(costs, metric, source)]
    lines += ["", "Methods:", ""]
    lines += [f"- `{r['method']}`: {r['description']}; shares {r['shared']} ({r['parameters_formula']})."
              for r in (next(iter(runs.values())) for runs in by_method(records).values())]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    if plots:
        plot_curves(records, out, repeated, goal)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _preamble(records: list[dict], command: str, environment: dict, repeated: bool) -> list[str]:
    """The setting every method shares, what the columns mean, and how the round is selected."""
    first = records[0]["config"]
    fed, data, model = first["federated"], first["data"], first["model"]
    summary = records[0]["summary"]
    metric, splits = summary["metric"], summary.get("splits", {})
    partitions = {r["config"]["seed"]: (r["partition"], r["summary"]["majority_rate"]) for r in records}
    if repeated:
        from fedpeptao.compare.seeds import SEED_CHANGES, SEED_CHANGES_FIXED  # noqa: PLC0415

        fixed = data.get("partition_seed")
        changes = SEED_CHANGES if fixed is None else SEED_CHANGES_FIXED.format(fixed)
        seeds = f"seeds {', '.join(map(str, partitions))} (a seed changes {changes}; alike for every method)"
        shared = "Same partition for every method under each seed (" + "; ".join(
            f"seed {s}: fingerprint `{p}`, majority-class rate {m:.4f}" for s, (p, m) in partitions.items()) + ")."
        columns = ""
    else:
        seeds = f"seed {first['seed']}"
        shared = (f"Same partition for every method (fingerprint `{records[0]['partition']}`). Majority-class rate "
                  f"{summary['majority_rate']:.4f}.")
        columns = (f"Target {summary['target']} (federated.target_accuracy, judged on the test metric as the run "
                   f"summary judges it); seconds to target = summed slowest-client training time. CPU s = the "
                   f"process's CPU time over the method's run (all threads). ")
    return [
        f"# Comparison on `{data['task']}` with `{model['name']}`", "",
        f"Command: `{command}`", "",
        f"{fed['num_clients']} clients ({data['partition']}, alpha={data['alpha']}), {fed['clients_per_round']} per round, "
        f"{fed['rounds']} rounds, {seeds}, {first['client']['epochs']} local epoch(s), batch "
        f"{first['client']['batch_size']}, device {first['client']['optimizer']} lr {first['client']['lr']} "
        f"(unless a method below names its own); "
        f"{first['tuning'].get('num_prompt_tokens', '-')} prompt tokens, max length {model['max_length']}; train/eval caps "
        f"{data['max_train_examples']}/{data['max_eval_examples']}. {shared} Environment: {json.dumps(environment)}.", "",
        f"Metric: {metric}. {columns}MB = all uplink + downlink bytes over all rounds. Wall s = the method's whole "
        f"run including evaluation every {fed['eval_every']} round(s). Params/message = parameters in one client's "
        f"uplink of model tensors (SCAFFOLD also sends the same number again as control-variate deltas).", "",
        f"Selection: the round is chosen on the validation split only ({splits.get('validation', 'none')}); the test "
        f"split ({splits.get('test', 'eval')}) is reported at that round and at the end.", "",
    ]


def _single_seed_table(rows: list[dict], metric: str) -> list[str]:
    lines = [f"| method | validation {metric} | test {metric} at selected | trained / never-trained clients "
             f"| selected round | test {metric} at end | rounds to target | s to target | MB communicated "
             f"| trainable params | params/message | wall s | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append("| " + " | ".join([row["method"], _fmt(row["validation"]), _fmt(row["test_at_selected"]),
                                         f"{_fmt(row['trained_at_selected'])} / {_fmt(row['untrained_at_selected'])}",
                                         _fmt(row["selected_round"]), _fmt(row["final"]),
                                         _fmt(row["rounds_to_target"]), _fmt(row["seconds_to_target"], 1),
                                         _fmt(row["mb_communicated"], 2), f"{row['trainable_params']:,}",
                                         f"{row['params_per_message']:,}", _fmt(row["wall_s"], 0),
                                         _fmt(row["cpu_s"], 0)]) + " |")
    return lines


def plot_curves(records: list[dict], out: Path, repeated: bool = False, goal: float | None = None) -> list[Path]:
    """Test metric per round and per MB, one curve per method (with ``repeated`` seeds: mean and a
    ± std band over them); with a ``goal``, the validation metric per MB and the target line."""
    from fedpeptao.compare.seeds import by_method  # noqa: PLC0415
    from fedpeptao.report.plots import metric_per_round, metric_vs_communication, seed_bands  # noqa: PLC0415
    from fedpeptao.report.runs import RunData  # noqa: PLC0415

    metric = records[0]["summary"]["metric"]
    groups = {method: [r["history"] for r in runs.values()] for method, runs in by_method(records).items()}
    if repeated:
        written = [seed_bands(groups, out / "accuracy_vs_round.png", ylabel=f"test {metric}", title="Test per round"),
                   seed_bands(groups, out / "accuracy_vs_mb.png", x="mb", ylabel=f"test {metric}",
                              title="Test vs communication")]
    else:
        runs = [RunData(path=out, label=r["method"], rows=r["history"], summary=r["summary"]) for r in records]
        written = [metric_per_round(runs, out / "accuracy_vs_round.png", records[0]["summary"]["target"]),
                   metric_vs_communication(runs, out / "accuracy_vs_mb.png")]
    if goal is not None:
        written.append(seed_bands(groups, out / "validation_vs_mb.png", key="val_metric", x="mb",
                                  ylabel=f"validation {metric}", title="Validation vs communication", target=goal))
    return [path for path in written if path is not None]


def main(argv: list[str] | None = None) -> int:
    """``python -m fedpeptao.compare.runner``: the same as ``fedpeptao compare``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="fedpeptao compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return compare_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

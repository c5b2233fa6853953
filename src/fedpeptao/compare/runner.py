"""``fedpeptao compare``: run several methods on one task, one partition, one seed; table and plots.

Every method is a preset of :mod:`fedpeptao.compare.presets` (an algorithm x tuning), built from
the same config file and overrides, so backbone, data caps, partition, seed, client sampling, local
epochs, batch size, device optimiser and round budget are identical; the runner checks that the
client partitions really are identical and stops if not. Each method gets a freshly loaded
backbone (LoRA and adapters modify theirs).

Outputs in ``out_dir``:

- ``compare.md`` / ``compare.csv``: best and final metric, best round, rounds and training seconds
  to the target, MB communicated (up + down, all rounds), trainable parameters, parameters per
  uplink message, wall seconds;
- ``accuracy_vs_round.png``, ``accuracy_vs_mb.png``;
- ``runs/<method>.json``: the method's config, summary and per-round history;
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

DEFAULT_OUT = "docs/results/compare"
COLUMNS = ["method", "validation", "test_at_selected", "selected_round", "final", "rounds_to_target", "seconds_to_target", "mb_communicated",
           "trainable_params", "params_per_message", "wall_s", "cpu_s"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` arguments; imports nothing heavy, so ``--help`` stays instant."""
    parser.add_argument("config", nargs="?", help="TOML or YAML config file shared by every method")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every method")
    parser.add_argument("--methods", default=None,
                        help="comma-separated presets (default: FedPepTAO and the paper's baselines: fedpeptao, fedavg, "
                             "fedprompt, lpt, lora, adapter, idpg, attempt, fedprox, scaffold, moon, fedadam, fedyogi, "
                             "fedadagrad; also fedpeptao-lora, fedpeptao-all-layers, fedpeptao-no-cv, "
                             "fedpeptao-no-momentum, fedpeptao-sgd)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs/<method>.json already in the output folder when its config is the same")


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
    command = shlex.join(["fedpeptao", "compare", *([args.config] if args.config else []), *args.overrides,
                          "--methods", ",".join(methods), "--out", str(args.out)] + (["--resume"] if args.resume else []))
    out = run_comparison(args.config, methods, args.overrides, args.out, command=command, resume=args.resume)
    print((out / "compare.md").read_text())
    print(f"written to {out}")
    return 0


def _fingerprint(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"|" + ",".join(map(str, part.tolist())).encode())
    return digest.hexdigest()[:16]


def run_comparison(config_path: str | Path | None, methods: Sequence[str], overrides: Sequence[str] = (),
                   out_dir: str | Path = DEFAULT_OUT, command: str | None = None, resume: bool = False) -> Path:
    """Run ``methods`` one after another and write the table, plots and per-run records; returns ``out_dir``."""
    import torch  # noqa: PLC0415

    from fedpeptao.compare.presets import get_preset, preset_config  # noqa: PLC0415
    from fedpeptao.sim.simulator import Simulation  # noqa: PLC0415

    resolved = [get_preset(m) for m in methods]  # unknown names fail before any work
    if not resolved:
        raise ValueError("no methods to compare")
    configs = {m.name: preset_config(config_path, m, overrides) for m in resolved}  # and bad settings too
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    command = command or shlex.join(["fedpeptao", "compare", *([str(config_path)] if config_path else []),
                                     *overrides, "--methods", ",".join(methods), "--out", str(out_dir)])
    (out / "command.txt").write_text(command + "\n")
    records, partition = [], None
    for method in resolved:
        cfg = configs[method.name]
        record_path = out / "runs" / f"{method.name}.json"
        cfg_json = cfg.model_dump(mode="json")
        if resume and record_path.is_file():
            old = json.loads(record_path.read_text())
            if old.get("config") == cfg_json:
                print(f"[compare] {method.name}: reusing {record_path}", file=sys.stderr)
                records.append(old)
                partition = partition or old["partition"]
                continue
        print(f"[compare] {method.name}: {method.summary}", file=sys.stderr, flush=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        sim = Simulation(cfg)
        fingerprint = _fingerprint(list(sim.train_parts) + list(sim.eval_parts))
        if partition is not None and fingerprint != partition:
            raise RuntimeError(f"{method.name}: client partition differs from the other methods' ({fingerprint} != "
                               f"{partition}); the comparison would not be fair")
        partition = fingerprint
        history = sim.run()
        summary = sim.summary()
        summary["algorithm"] = method.name
        record = {
            "method": method.name, "description": method.summary, "shared": method.shared,
            "parameters_formula": method.parameters, "config": cfg_json, "partition": fingerprint,
            "summary": summary, "history": history, "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start,
            "params_per_message": summary["params_per_message"],
        }
        record_path.write_text(json.dumps(record, indent=1, default=float))
        records.append(record)
        write_outputs(records, out, command, _environment(torch), plots=False)
        del sim
    write_outputs(records, out, command, _environment(torch))
    return out


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
            "selected_round": None if s["best_round"] is None else s["best_round"] + 1, "final": s["final_metric"],
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


def write_outputs(records: list[dict], out: Path, command: str, environment: dict, plots: bool = True) -> None:
    rows = table_rows(records)
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    first = records[0]["config"]
    fed, data, model = first["federated"], first["data"], first["model"]
    metric = records[0]["summary"]["metric"]
    target = records[0]["summary"]["target"]
    lines = [
        f"# Comparison on `{data['task']}` with `{model['name']}`", "",
        f"Command: `{command}`", "",
        f"{fed['num_clients']} clients ({data['partition']}, alpha={data['alpha']}), {fed['clients_per_round']} per round, "
        f"{fed['rounds']} rounds, seed {first['seed']}, {first['client']['epochs']} local epoch(s), batch "
        f"{first['client']['batch_size']}, device {first['client']['optimizer']} lr {first['client']['lr']} "
        f"(unless a method below names its own); "
        f"{first['tuning'].get('num_prompt_tokens', '-')} prompt tokens, max length {model['max_length']}; train/eval caps "
        f"{data['max_train_examples']}/{data['max_eval_examples']}. Same partition for every method "
        f"(fingerprint `{records[0]['partition']}`). Majority-class rate "
        f"{records[0]['summary']['majority_rate']:.4f}. Environment: {json.dumps(environment)}.", "",
        f"Metric: {metric}; target {target}. Seconds to target = summed slowest-client training time. MB = all "
        f"uplink + downlink bytes over all rounds. Wall s = the method's whole run including evaluation every "
        f"{fed['eval_every']} round(s); CPU s = the process's CPU time over it (all threads). Params/message = "
        f"parameters in one client's uplink of model tensors (SCAFFOLD also sends the same number again as "
        f"control-variate deltas).", "",
        f"Selection: the round is chosen on the validation split only ({records[0]['summary'].get('splits', {}).get('validation', 'none')}); "
        f"the test split ({records[0]['summary'].get('splits', {}).get('test', 'eval')}) is reported at that round and "
        f"at the end. Rounds to target count test evaluations.", "",
        f"| method | validation {metric} | test {metric} at selected | selected round | test {metric} at end "
        f"| rounds to target | s to target | MB communicated | trainable params | params/message | wall s | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append("| " + " | ".join([row["method"], _fmt(row["validation"]), _fmt(row["test_at_selected"]),
                                         _fmt(row["selected_round"]), _fmt(row["final"]),
                                         _fmt(row["rounds_to_target"]), _fmt(row["seconds_to_target"], 1),
                                         _fmt(row["mb_communicated"], 2), f"{row['trainable_params']:,}",
                                         f"{row['params_per_message']:,}", _fmt(row["wall_s"], 0),
                                         _fmt(row["cpu_s"], 0)]) + " |")
    lines += ["", "Methods:", ""]
    lines += [f"- `{r['method']}`: {r['description']}; shares {r['shared']} ({r['parameters_formula']})." for r in records]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    if plots:
        plot_curves(records, out)


def plot_curves(records: list[dict], out: Path) -> list[Path]:
    """The report's metric-per-round and metric-vs-MB plots, one curve per method."""
    from fedpeptao.report.plots import metric_per_round, metric_vs_communication  # noqa: PLC0415
    from fedpeptao.report.runs import RunData  # noqa: PLC0415

    runs = [RunData(path=out, label=r["method"], rows=r["history"], summary=r["summary"]) for r in records]
    written = [metric_per_round(runs, out / "accuracy_vs_round.png", records[0]["summary"]["target"]),
               metric_vs_communication(runs, out / "accuracy_vs_mb.png")]
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

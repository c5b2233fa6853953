"""``fedpeptao`` command line: run an experiment from a config file plus key=value overrides."""

from __future__ import annotations

import argparse
import os
import sys

from pathlib import Path

from fedpeptao.compare.runner import add_arguments as add_compare_arguments
from fedpeptao.config import ConfigError, load_config
from fedpeptao.utils.checkpoint import CheckpointError


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run directory's own config; give only overrides such as federated.rounds=N")
        from fedpeptao.sim.simulator import resume_experiment  # noqa: PLC0415

        sim, run_dir = resume_experiment(Path(args.resume), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)  # validated before anything heavy is imported
        from fedpeptao.sim.simulator import run_experiment  # noqa: PLC0415 - keep `--help` and config errors instant

        sim, run_dir = run_experiment(cfg)
    s = sim.summary()
    print(f"run directory: {run_dir}")
    print(f"final {s['metric']}: {s['final_metric']:.4f} (best {s['best_metric']:.4f} at round {s['best_round'] + 1}; "
          f"majority-class rate {s['majority_rate']:.4f}); {s['total_mb']:.2f} MB communicated in {s['elapsed_s']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeptao", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment in the embedded simulator")
    run.add_argument("config", nargs="?", help="TOML or YAML config file (defaults apply without one)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federated.rounds=5 method.name=fedavg")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    run.set_defaults(func=_run)
    compare = sub.add_parser("compare", help="run several methods on one shared partition, seed and budget")
    add_compare_arguments(compare)
    compare.set_defaults(func=_compare)
    report = sub.add_parser("report", help="Markdown report and PNG plots for one or more run directories")
    report.add_argument("run_dirs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report)")
    report.add_argument("--target", type=float, help="target metric for time-to-target columns")
    report.set_defaults(func=_report)
    return parser


def _compare(args: argparse.Namespace) -> int:
    from fedpeptao.compare.runner import compare_main  # noqa: PLC0415

    return compare_main(args)


def _report(args: argparse.Namespace) -> int:
    from fedpeptao.report import write_report  # noqa: PLC0415

    print(f"report: {write_report(args.run_dirs, args.out, args.target)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # A config path that looks like an override (key=value) is an override: `fedpeptao run rounds=3`.
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

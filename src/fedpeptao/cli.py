"""``fedpeptao`` command line: run an experiment from a config file plus key=value overrides."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pathlib import Path

from fedpeptao.compare.runner import add_arguments as add_compare_arguments, parse_seeds
from fedpeptao.config import ConfigError, load_config
from fedpeptao.utils.checkpoint import CheckpointError


def _run(args: argparse.Namespace) -> int:
    if args.seeds:
        return _run_seeds(args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run directory's own config; give only overrides such as federated.rounds=N")
        from fedpeptao.sim.simulator import resume_experiment  # noqa: PLC0415

        sim, run_dir = resume_experiment(Path(args.resume), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)  # validated before anything heavy is imported
        from fedpeptao.sim.simulator import run_experiment  # noqa: PLC0415 - keep `--help` and config errors instant

        sim, run_dir = run_experiment(cfg)
    _print_result(sim, run_dir)
    return 0


def _run_seeds(args: argparse.Namespace) -> int:
    """``run --seeds 0,1,2``: one run per seed in ``OUTPUT_DIR/<run name>/seed-<s>``, then the test
    metric's mean, std and Student-t interval over the seeds. Every run directory is checked before
    the first trains, so a clash does not surface after hours of the earlier seeds."""
    if args.resume:
        raise ConfigError("--seeds starts new runs; continue one seed's run with --resume RUN_DIR/seed-<s>")
    configs = [load_config(args.config, [*args.overrides, f"seed={seed}"]) for seed in args.seeds]
    from fedpeptao.report.stats import t_interval  # noqa: PLC0415
    from fedpeptao.sim.simulator import check_run_dir, run_experiment  # noqa: PLC0415

    group = check_run_dir(configs[0])  # run_name, or the method and a timestamp, as a single run's
    for cfg in configs:
        cfg.output_dir, cfg.run_name = str(group), f"seed-{cfg.seed}"
        check_run_dir(cfg)
    values, metric = [], None
    for cfg in configs:
        sim, run_dir = run_experiment(cfg)
        summary = _print_result(sim, run_dir)
        values.append(summary["test_metric_at_selected"])
        metric = summary["metric"]
    print(f"over seeds {', '.join(map(str, args.seeds))} ({group}): test {metric} at the round selected on validation "
          f"{t_interval(values).describe()}; mean ± sample std, Student t interval over seeds")
    return 0


def _print_result(sim, run_dir: Path) -> dict:
    """One finished run in four lines; returns its summary."""
    from fedpeptao.report.summary import describe_compute  # noqa: PLC0415

    s = sim.summary()
    selected = (f"round {s['selected_round']}, selected on validation ({s['validation_metric']:.4f})"
                if s["validation_metric"] is not None else "the last round (no validation examples)")
    print(f"run directory: {run_dir}")
    print(f"ran on {describe_compute(s['compute'])}")
    print(f"test {s['metric']}: {s['test_metric_at_selected']:.4f} at {selected}; {s['final_metric']:.4f} at the end "
          f"(majority-class rate {s['majority_rate']:.4f}); {s['total_mb']:.2f} MB communicated in {s['elapsed_s']:.0f} s")
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeptao", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment in the embedded simulator")
    run.add_argument("config", nargs="?", help="TOML or YAML config file (defaults apply without one)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federated.rounds=5 method.name=fedavg")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    run.add_argument("--seeds", type=parse_seeds,
                     help="one run per seed (0,1,2) in OUTPUT_DIR/<run name>/seed-<s>, then the test metric's mean ± "
                          "std and Student t 95%% interval over them; a seed changes the data subsamples, the "
                          "partition, the initial tensors, the client sampling and the data order")
    run.set_defaults(func=_run)
    compare = sub.add_parser("compare", help="run several methods on one shared partition, seed and budget")
    add_compare_arguments(compare)
    compare.set_defaults(func=_compare)
    report = sub.add_parser("report", help="Markdown report and PNG plots for one or more run directories")
    report.add_argument("run_dirs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report)")
    report.add_argument("--target", type=float, help="target metric for time-to-target columns")
    report.set_defaults(func=_report)
    evaluate = sub.add_parser("evaluate", help="metrics of a finished run's global or client model")
    _model_arguments(evaluate)
    evaluate.add_argument("--data", type=Path, help="task folder or labelled table; for a generative run an instruct "
                                                    "folder or file (default: the run's own test split)")
    evaluate.add_argument("--split", choices=["test"], default="test", help="which split of the run's data")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(func=_evaluate)
    predict = sub.add_parser("predict", help="label text with a finished run's model: one JSON line per input line")
    _model_arguments(predict)
    predict.add_argument("--input", required=True, help="text file, one example per line (TAB between a pair), or -")
    predict.add_argument("--output", type=Path, help="where to write the JSON lines (default: standard output)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.set_defaults(func=_predict)
    generate = sub.add_parser("generate", help="answer prompts with a finished generative run's model (greedy): one "
                                               "JSON line per prompt")
    _model_arguments(generate)
    generate.add_argument("--input", required=True,
                          help="JSON lines with a 'prompt' field (text, or a list of {role, content} messages), or - "
                               "for standard input; or any instruction file/folder the run could train on (its "
                               "prompts are answered)")
    generate.add_argument("--output", type=Path, help="where to write the JSON lines (default: standard output)")
    generate.add_argument("--max-new-tokens", type=int, help="answer tokens at most (default: the run's "
                                                             "generation.max_new_tokens)")
    generate.add_argument("--batch-size", type=int, help="prompts per pass (default: the run's generation.batch_size)")
    generate.set_defaults(func=_generate)
    export = sub.add_parser("export", help="write a finished run's model as a PEFT adapter or plain safetensors")
    _model_arguments(export)
    export.add_argument("--format", choices=["peft", "safetensors"], required=True)
    export.add_argument("out_dir", type=Path)
    export.set_defaults(func=_export)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--client", type=int, help="this client's personal model (default: the global model)")


def _load(args: argparse.Namespace):
    from fedpeptao.trained import load_run  # noqa: PLC0415

    return load_run(args.run_dir, args.client)


def _evaluate(args: argparse.Namespace) -> int:
    metrics = _load(args).evaluate(args.data)
    if args.json:
        print(json.dumps(metrics))
    else:
        print("| metric | value |\n|---|---:|")
        for key, value in metrics.items():
            if key != "metric":
                print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return 0


def _read_inputs(source: str) -> list:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--input {source}: no text to predict")
    return lines


def _predict(args: argparse.Namespace) -> int:
    lines = _read_inputs(args.input)  # before the model loads: an empty input costs nothing
    model = _load(args)
    inputs = [tuple(line.split("\t", 1)) if model.pair else line for line in lines]
    if model.pair and any(len(x) != 2 for x in inputs):
        raise ValueError(f"--input {args.input}: this model classifies pairs; separate them with a TAB")
    truncated = model.count_truncated(inputs)
    if truncated:
        print(f"warning: {truncated} of {len(inputs)} inputs are longer than model.max_length "
              f"({model.cfg.model.max_length} tokens) and were truncated", file=sys.stderr)
    probs = model.predict_proba(inputs, args.batch_size, progress=len(inputs) > 1000)
    rows = [json.dumps({"text": x if isinstance(x, str) else list(x), "label": model.labels[int(p.argmax())],
                        "probabilities": {name: float(v) for name, v in zip(model.labels, p)}})
            for x, p in zip(inputs, probs)]
    out = "\n".join(rows) + "\n"
    if args.output:
        args.output.write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return 0


def _read_prompts(source: str) -> list:
    """``--input`` of ``generate``: JSON lines with a ``prompt`` field (text, or a list of messages),
    or any instruction file or folder :func:`~fedpeptao.data.instruct.read_instruct` reads (its prompts)."""
    path = None if source == "-" else Path(source)
    if path is None or (path.is_file() and path.suffix.lower() == ".jsonl"):
        text = sys.stdin.read() if path is None else path.read_text(encoding="utf-8")
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--input {source}: line {number} is not JSON ({exc.msg})") from None
        if not rows:
            raise ValueError(f"--input {source}: no prompts")
        if all(isinstance(row, dict) and "prompt" in row for _, row in rows):
            for number, row in rows:
                prompt = row["prompt"]
                if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                    and all(isinstance(m, dict) for m in prompt))):
                    raise ValueError(f"--input {source}: line {number}: 'prompt' should be text or a list of "
                                     f"{{role, content}} messages")
            return [row["prompt"] for _, row in rows]
        if path is None:
            raise ValueError("--input -: every line needs a 'prompt' field (text or a list of {role, content} "
                             "messages)")
    from fedpeptao.data.instruct import load_instruct_dir, read_instruct  # noqa: PLC0415

    if path.is_dir() and not (path / "state.json").is_file():  # a task folder: its test split
        return load_instruct_dir(path)[2].prompts
    return read_instruct(path).prompts


def _generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args.input)  # before the model loads: bad input costs nothing
    model = _load(args)
    truncated = model.count_truncated_prompts(prompts, args.max_new_tokens)
    if truncated:
        new = args.max_new_tokens or model.cfg.generation.max_new_tokens
        print(f"warning: {truncated} of {len(prompts)} prompts do not fit model.max_length "
              f"({model.cfg.model.max_length} tokens) with {new} answer tokens; their beginnings were cut",
              file=sys.stderr)
    answers = model.generate(prompts, args.max_new_tokens, args.batch_size, progress=len(prompts) > 200)
    out = "".join(json.dumps({"prompt": p, "generated": a}) + "\n" for p, a in zip(prompts, answers))
    if args.output:
        args.output.write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedpeptao.export import export  # noqa: PLC0415

    print(f"exported to {export(_load(args), args.out_dir, args.format)}")
    return 0


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
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

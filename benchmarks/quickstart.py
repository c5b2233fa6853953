"""`make run` before and after: the quick-start experiment (``configs/default.toml``) with this
checkout's code and with an earlier revision's, side by side (two processes, one thread each, one
per core, so that both see the same machine).

The earlier revision is checked out into a temporary git worktree and put first on
``PYTHONPATH``; both runs use the same virtual environment, config file, data and seed. Prints the
wall time of each run (model load and data included, as `make run` has them), the ratio, and each
run's accuracy: the final round's test accuracy, and the test accuracy at the round chosen on
validation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quickstart.py [--before REV] [--repeats K] [--alone]

``--alone`` runs the two one after the other instead, each with every core (torch's default
threads), which is how `make run` runs; side by side is the fairer comparison on a noisy machine.

``--before`` defaults to 6e0b430, the last commit before the scale work (issue 11), whose
`make run` took about 7 minutes after install.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from common import ONE_THREAD, collect, start

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
start = time.perf_counter()
import fedpeptao
from fedpeptao.cli import main
code = main(["run", sys.argv[1], "progress=false", "checkpoint.every=0", "output_dir=" + sys.argv[2], "run_name=run"])
print("RESULT " + json.dumps({"code": code, "wall_s": time.perf_counter() - start, "source": fedpeptao.__file__}))
"""


def start_run(source: Path, config: Path, out: Path, alone: bool = False) -> subprocess.Popen:
    env = {**({} if alone else ONE_THREAD), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(source / "src")}
    return start(["-c", CHILD, str(config), str(out)], env, cwd=source)


def finish(proc: subprocess.Popen, out: Path, label: str) -> dict:
    result = collect(proc, f"{label} run")
    summary = json.loads((out / "run" / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {**result, "final": rows[-1]["accuracy"], "selected_round": summary["selected_round"],
            "selected_test": summary["test_metric_at_selected"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="6e0b430", help="the earlier revision (default: before issue 11)")
    parser.add_argument("--repeats", type=int, default=1, help="side-by-side pairs (noise)")
    parser.add_argument("--alone", action="store_true", help="one run after the other, each with every core")
    args = parser.parse_args()
    config = ROOT / "configs" / "default.toml"
    threads = (f"torch's default ({os.cpu_count()} cores), one run after the other" if args.alone
               else "1 per run (two runs side by side, one per core)")
    print(f"torch threads: {threads}; config: configs/default.toml")
    print(f"{'pair':>4} {'code':>12} {'wall s':>7} {'final test acc':>14} {'selected round':>14} {'test there':>10}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before],
                       check=True)
        try:
            for pair in range(args.repeats):
                outs = {label: Path(tmp) / f"out-{label}-{pair}" for label in ("before", "now")}
                sources = {"before": before, "now": ROOT}
                if args.alone:
                    results = {label: finish(start_run(source, config, outs[label], alone=True), outs[label], label)
                               for label, source in sources.items()}
                else:
                    procs = {label: start_run(source, config, outs[label]) for label, source in sources.items()}
                    results = {label: finish(proc, outs[label], label) for label, proc in procs.items()}
                for label, r in results.items():
                    if not Path(r["source"]).is_relative_to(before if label == "before" else ROOT):
                        raise RuntimeError(f"{label} imported {r['source']}")
                    code = args.before if label == "before" else "this checkout"
                    print(f"{pair:>4} {code:>12} {r['wall_s']:7.1f} {r['final']:14.4f} {str(r['selected_round']):>14} "
                          f"{r['selected_test'] if r['selected_test'] is not None else float('nan'):10.4f}")
                ratios.append(results["before"]["wall_s"] / results["now"]["wall_s"])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print("speed-up (before / now): " + ", ".join(f"{r:.2f}x" for r in ratios) + " (target >= 2x)")


if __name__ == "__main__":
    main()

"""The paper's protocol at CPU scale, over seeds, in resumable pieces: the evidence behind
``docs/results/paper-protocol/`` (what it supports: ``docs/results/paper-protocol/claims.md``).

Pieces (each one ``fedpeptao compare ... --seeds ... --resume`` into its own folder, so a piece
stopped half-way resumes at its first unfinished (method, seed) run):

* ``main:<task>``: MR, SST-2, RTE, MRPC (``configs/paper/<task>.toml``: 100 clients, 10 per
  round, Dirichlet alpha 1, 2 local epochs, FedAvg warm-up then the Hessian ratio), FedPepTAO
  against FedAvg, LoRA, FedPrompt and SCAFFOLD, seeds 0, 1, 2;
* ``ablations:<task>``: MR and RTE, FedPepTAO without layer selection, control variates or server
  momentum, seeds 0, 1, 2 (FedPepTAO's own runs are copied from ``main:<task>``, same config, as
  are the sweep's ``base`` runs from ``main:mr``);
* ``sweep:<regime>``: MR, seed 0, FedPepTAO (published correction and ``method.correction=previous``)
  against FedAvg, one setting changed at a time: Dirichlet alpha 0.1 / 10, participation 5% / 50%,
  local steps per client round about 1 / 3 / 10 (``base`` is the preset: alpha 1, 10%, about 6);
* ``stable:<task>``: MR and SST-2, the same three methods as the sweep at the preset over seeds 0, 1, 2
  (FedPepTAO's and FedAvg's runs are copied from ``main:<task>``, MR's seed-0 stable run from
  ``sweep:base``), so the stable correction is judged with intervals, not on one seed.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/paper_protocol.py --pieces main:mr,main:rte
    .venv/bin/python benchmarks/paper_protocol.py --list        # the pieces and how far each is
    .venv/bin/python benchmarks/paper_protocol.py --report      # rewrite the README from what is done

Run one CPU-heavy job at a time. Every piece's folder holds its ``compare.md`` (means ± std, Student
t 95% intervals, paired differences to FedPepTAO), plots and run records; ``--report`` writes
``docs/results/paper-protocol/README.md`` with the commands, the wall time, the thread count and
the tables across pieces.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from fedpeptao.algorithms.fedpeptao import STABLE_RATIO

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "paper-protocol"
SEEDS = (0, 1, 2)
TASKS = ("mr", "sst-2", "rte", "mrpc")
MAIN_METHODS = ("fedpeptao", "fedavg", "lora", "fedprompt", "scaffold")
ABLATIONS = ("fedpeptao", "fedpeptao-all-layers", "fedpeptao-no-cv", "fedpeptao-no-momentum")
#: the published correction, the stable one (``method.correction=previous``) and FedAvg
SWEEP_METHODS = ("fedpeptao", "fedpeptao-previous", "fedavg")
STABLE_TASKS = ("mr", "sst-2")
#: about 18 training examples per client (2,000 over 100 clients, 10% held out for validation):
#: local steps per client round = epochs * ceil(18 / batch)
REGIMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("the preset: alpha 1, 10 of 100 clients, 2 epochs of batch 8 (about 6 steps)", ()),
    "alpha-0.1": ("Dirichlet alpha 0.1", ("data.alpha=0.1",)),
    "alpha-10": ("Dirichlet alpha 10", ("data.alpha=10",)),
    "participation-5": ("5 of 100 clients per round", ("federated.clients_per_round=5",)),
    "participation-50": ("50 of 100 clients per round", ("federated.clients_per_round=50",)),
    "steps-1": ("about 1 local step (1 epoch, batch 64)", ("client.epochs=1", "client.batch_size=64")),
    "steps-3": ("about 3 local steps (1 epoch, batch 6)", ("client.epochs=1", "client.batch_size=6")),
    "steps-10": ("about 10 local steps (2 epochs, batch 4)", ("client.epochs=2", "client.batch_size=4")),
}


@dataclass(frozen=True)
class Piece:
    name: str
    config: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    about: str = ""

    @property
    def out(self) -> Path:
        kind, _, label = self.name.partition(":")
        return OUT / kind / label

    def command(self) -> list[str]:
        """The piece's compare: resumable, and with the cost to 95% of the best method's mean
        validation accuracy (rounds, MB, seconds; judged on validation)."""
        return ["fedpeptao", "compare", self.config, *self.overrides, "--methods", ",".join(self.methods),
                "--seeds", ",".join(map(str, self.seeds)), "--target", "95%", "--out", str(self.out.relative_to(REPO)),
                "--resume"]

    def records(self) -> list[dict]:
        """The finished (method, seed) runs of this piece, as compare stored them."""
        found = []
        for method in self.methods:
            for seed in self.seeds:
                path = self.out / "runs" / method / f"seed-{seed}.json"
                if path.is_file():
                    found.append(json.loads(path.read_text()))
        return found


def pieces() -> dict[str, Piece]:
    out = [Piece(f"main:{t}", f"configs/paper/{t}.toml", MAIN_METHODS, SEEDS, about=f"{t}, the paper's comparison")
           for t in TASKS]
    out += [Piece(f"ablations:{t}", f"configs/paper/{t}.toml", ABLATIONS, SEEDS, about=f"{t}, FedPepTAO's ablations")
            for t in ("mr", "rte")]
    out += [Piece(f"stable:{t}", f"configs/paper/{t}.toml", SWEEP_METHODS, SEEDS,
                  about=f"{t}, the published and the stable correction over seeds") for t in STABLE_TASKS]
    out += [Piece(f"sweep:{name}", "configs/paper/mr.toml", SWEEP_METHODS, (0,), overrides, about)
            for name, (about, overrides) in REGIMES.items()]
    return {p.name: p for p in out}


def borrow_runs(piece: Piece) -> None:
    """A piece on a preset without overrides (an ablation, the stable pieces, the sweep's base) starts
    with the runs it shares with the other pieces on that preset (compare's ``--resume`` reuses a
    record only when its config is exactly the run's, so a copy that does not fit is run again and
    overwritten)."""
    if piece.overrides or piece.name.startswith("main:"):
        return
    sources = [p for p in pieces().values() if p.config == piece.config and not p.overrides and p.name != piece.name]
    for source in sources:
        shared = product(set(piece.methods) & set(source.methods), set(piece.seeds) & set(source.seeds))
        for method, seed in shared:
            src = source.out / "runs" / method / f"seed-{seed}.json"
            dst = piece.out / "runs" / method / f"seed-{seed}.json"
            if src.is_file() and not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)


def run(piece: Piece) -> None:
    borrow_runs(piece)
    command = [str(REPO / ".venv" / "bin" / piece.command()[0]), *piece.command()[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print(f"== {piece.name}: {' '.join(piece.command())}", flush=True)
    began = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    print(f"== {piece.name}: {time.perf_counter() - began:.0f} s", flush=True)
    write_stability(piece)


def write_stability(piece: Piece) -> None:
    """``stability.json`` beside the piece's tables: each method's start-up stability figures
    (expected local steps, first-contact ratio, correction) of its seed-0 run, which compare's
    CSVs do not carry and the sweep's table shows."""
    found = {r["method"]: r["summary"].get("stability") for r in piece.records()
             if r.get("config", {}).get("seed", 0) == piece.seeds[0] and r.get("summary", {}).get("stability")}
    if found:
        (piece.out / "stability.json").write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")


# -- the README ---------------------------------------------------------------------------------

def _float(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)


def _csv_rows(piece: Piece, name: str) -> list[dict[str, str]]:
    """The rows of one of the piece's CSVs (written by compare; none before it has run)."""
    path = piece.out / name
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def seed_table(piece: Piece) -> dict[str, dict[str, str]]:
    """method -> the piece's compare.csv row (over seeds)."""
    return {row["method"]: row for row in _csv_rows(piece, "compare.csv")}


def run_rows(piece: Piece) -> list[dict[str, str]]:
    """The piece's compare_runs.csv: one row per finished (method, seed) run. The README reads
    these (committed) rows rather than the run records, so it can be rewritten from any checkout."""
    return _csv_rows(piece, "compare_runs.csv")


def stability_of(piece: Piece) -> dict[str, dict]:
    """method -> the start-up stability figures ``write_stability`` kept for the piece."""
    path = piece.out / "stability.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def cost_table(piece: Piece) -> dict[str, dict[str, str]]:
    """method -> the piece's cost_to_target.csv row."""
    return {row["method"]: row for row in _csv_rows(piece, "cost_to_target.csv")}


def cost_cell(row: dict[str, str] | None) -> str:
    """``3/3: 6.0 rounds, 4.1 MB, 9.8 s``."""
    if not row:
        return "not run"
    reached = f"{row['reached']}/{row['seeds']}"
    if _float(row.get("rounds_mean")) is None:
        return reached
    return (f"{reached}: {_float(row['rounds_mean']):.1f} rounds, {_float(row['mb_mean']):.1f} MB, "
            f"{_float(row['train_s_mean']):.1f} s")


def cell(row: dict[str, str] | None) -> str:
    """``0.812 ± 0.021 (n)``: the mean test metric and the half-width of its 95% interval."""
    if not row:
        return "not run"
    mean, low, high = _float(row["test_mean"]), _float(row["test_ci_low"]), _float(row["test_ci_high"])
    n = int(row["seeds"])
    if low is None:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {(high - low) / 2:.3f}" + ("" if n == len(SEEDS) else f" ({n} seeds)")


def sweep_cell(row: dict[str, str] | None, run: dict[str, str] | None) -> str:
    """One seed's test metric at the selected round, and (in brackets) at the last round."""
    if not row:
        return "not run"
    final = _float((run or {}).get("final"))
    return cell(row).replace(" (1 seed)", "") + ("" if final is None else f" ({final:.3f})")


def difference(row: dict[str, str] | None) -> str:
    if not row or _float(row.get("difference_ci_low")) is None:
        return "—"
    return f"{_float(row['difference_mean']):+.3f} [{_float(row['difference_ci_low']):+.3f}, " \
           f"{_float(row['difference_ci_high']):+.3f}]"


def report(threads: str) -> str:
    all_pieces = pieces()
    lines = ["# The paper's protocol at CPU scale, over seeds", "",
             "Written by `benchmarks/paper_protocol.py --report` from the finished runs; each piece's folder has "
             "its own `compare.md` (mean ± std, Student t 95% intervals, paired differences to FedPepTAO), plots "
             "and run records. What the study supports: [claims.md](claims.md).", "",
             f"Machine: 2-core CPU, `OMP_NUM_THREADS={threads}`, one run at a time. Protocol (`configs/paper/`): "
             "MiniLM, 100 clients, 10 sampled per round, paper Dirichlet split alpha = 1.0 (test split divided "
             "like the training data), 2 local epochs of batch 8, device AdamW lr 0.02 (LoRA 5e-3), 10 deep-prompt "
             "tokens, FedPepTAO's FedAvg warm-up for 3 rounds then the Hessian ratio; 12 rounds (the paper runs "
             "100+ on full data; here 2,000 training examples, about 18 per client and 6 local steps per round), "
             "evaluated every 3 rounds. The round is chosen on validation (10% of each client's training data); "
             "the test metric is reported at that round.", "",
             "## FedPepTAO against the baselines", "",
             "Test metric at the round chosen on validation: mean ± half-width of the Student t 95% interval over "
             "seeds 0, 1, 2 (a seed changes the data subsample, the partition, the initial tensors, the sampling "
             "and the data order, alike for every method). MRPC's metric is (accuracy + F1) / 2, the others' "
             "accuracy.", "",
             "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    tables = {t: seed_table(all_pieces[f"main:{t}"]) for t in TASKS}
    for method in MAIN_METHODS:
        lines.append(f"| {method} | " + " | ".join(cell(tables[t].get(method)) for t in TASKS) + " |")
    lines += ["", "Paired difference to FedPepTAO (method minus FedPepTAO, mean and 95% interval over seeds):", "",
              "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for method in MAIN_METHODS[1:]:
        lines.append(f"| {method} | " + " | ".join(difference(tables[t].get(method)) for t in TASKS) + " |")
    lines += ["", "MB communicated per run (mean over seeds):", "",
              "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for method in MAIN_METHODS:
        lines.append(f"| {method} | " + " | ".join(
            f"{_float(r['mb_mean']):.1f}" if (r := tables[t].get(method)) else "not run" for t in TASKS) + " |")
    lines += ["", "Cost to 95% of the best method's mean validation accuracy (judged on validation; seeds that "
              "reached it / seeds run, then mean rounds, MB and summed slowest-client training seconds over the seeds "
              "that reached it):", "", "| method | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    costs = {t: cost_table(all_pieces[f"main:{t}"]) for t in TASKS}
    for method in MAIN_METHODS:
        lines.append(f"| {method} | " + " | ".join(cost_cell(costs[t].get(method)) for t in TASKS) + " |")
    lines += ["", "## FedPepTAO's ablations", "", "| variant | mr | rte |", "|---|---:|---:|"]
    ablations = {t: seed_table(all_pieces[f"ablations:{t}"]) for t in ("mr", "rte")}
    for method in ABLATIONS:
        lines.append(f"| {method} | {cell(ablations['mr'].get(method))} | {cell(ablations['rte'].get(method))} |")
    lines += ["", "## The stable correction over seeds", "",
              "The preset, 3 seeds: the published correction, `method.correction=previous` and FedAvg (the first "
              "and last are `main:<task>`'s runs). Test metric at the round chosen on validation, the paired "
              "difference to the published form, and the test metric at the last round per seed (seeds 0 / 1 / 2).",
              "", "| method | " + " | ".join(f"{t} | {t}: difference | {t}: last round" for t in STABLE_TASKS) + " |",
              "|---|" + "---:|---:|---|" * len(STABLE_TASKS)]
    stable = {t: seed_table(all_pieces[f"stable:{t}"]) for t in STABLE_TASKS}
    finals = {(t, r["method"], r["seed"]): _float(r.get("final"))
              for t in STABLE_TASKS for r in run_rows(all_pieces[f"stable:{t}"])}
    for method in SWEEP_METHODS:
        cells = []
        for t in STABLE_TASKS:
            row = stable[t].get(method)
            last = " / ".join("—" if (final := finals.get((t, method, str(s)))) is None else f"{final:.3f}" for s in SEEDS)
            cells.append(f"{cell(row)} | {difference(row)} | {last}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Regime sweep on MR (seed 0)", "",
              "One setting changed from the preset at a time. Test accuracy at the round chosen on validation; "
              "in brackets the test accuracy at the last round (12), which shows a run that learns and then turns "
              "back; the first-contact ratio is FedPepTAO's server step over the clients' mean update in its first round "
              f"(`core.server.first_contact_ratio`; below {STABLE_RATIO} a run warns).", "",
              "| regime | " + " | ".join(SWEEP_METHODS) + " | FedPepTAO local steps | first-contact ratio (published) |",
              "|---|" + "---:|" * (len(SWEEP_METHODS) + 2)]
    for name, (about, _) in REGIMES.items():
        piece = all_pieces[f"sweep:{name}"]
        table, runs = seed_table(piece), {r["method"]: r for r in run_rows(piece)}
        stability = stability_of(piece).get("fedpeptao") or {}
        steps, ratio = stability.get("local_steps"), stability.get("first_contact_ratio")
        lines.append(f"| {about} | " + " | ".join(sweep_cell(table.get(m), runs.get(m)) for m in SWEEP_METHODS)
                     + f" | {'—' if steps is None else f'{steps:g}'} | {'—' if ratio is None else f'{ratio:+.2f}'} |")
    lines += ["", "## Pieces, commands and wall time", "",
              "| piece | runs done | wall s (sum of runs) | command |", "|---|---:|---:|---|"]
    unique: dict[tuple, float] = {}  # a run shared by pieces (borrowed) counts once in the total
    for piece in all_pieces.values():
        walls = {(piece.config, piece.overrides, r["method"], r["seed"]): _float(r.get("wall_s")) or 0.0
                 for r in run_rows(piece)}
        unique.update(walls)
        lines.append(f"| {piece.name} | {len(walls)}/{len(piece.methods) * len(piece.seeds)} | {sum(walls.values()):.0f} | "
                     f"`{' '.join(piece.command())}` |")
    total = sum(unique.values())
    lines += ["", f"The whole study, each run counted once (pieces share the runs they borrow): {len(unique)} runs, "
              f"{total:.0f} s ({total / 3600:.1f} h) of run wall time."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", default="", help="comma-separated piece names (see --list)")
    parser.add_argument("--list", action="store_true", help="the pieces and how many of their runs are done")
    parser.add_argument("--report", action="store_true", help="rewrite docs/results/paper-protocol/README.md")
    args = parser.parse_args()
    known = pieces()
    if args.list:
        for piece in known.values():
            print(f"{piece.name:>22}  {len(run_rows(piece))}/{len(piece.methods) * len(piece.seeds)} runs  "
                  f"{piece.about}")
        return
    chosen = [p.strip() for p in args.pieces.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in known]
    if unknown:
        sys.exit(f"unknown pieces {unknown}; choose from {', '.join(known)}")
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    for name in chosen:
        run(known[name])
    if chosen or args.report:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "README.md").write_text(report(threads))
        print(f"wrote {OUT / 'README.md'}")


if __name__ == "__main__":
    main()

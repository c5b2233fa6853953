"""Accuracy against epsilon: FedPepTAO and FedAvg under central client-level DP on MR with MiniLM.

Client-level DP needs many clients per round before the noise on the mean (std ``z C / m``) is
small, so this federation has 1,000 simulated clients (50 per round, ``q = 0.05``), 10 rounds,
delta = 1e-5. For each target epsilon the noise multiplier is solved before training
(``privacy.target_epsilon``); infinity is the same run without DP. FedPepTAO selects its layers on
public data (``privacy.selection=public``: 256 SST-2 training sentences, another corpus of the
same task), so its selection costs no budget. The round is chosen on MR's dev split and the test
accuracy reported there. Prints a table, writes ``privacy.png`` and ``privacy.md`` to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy.py [--out docs/results/privacy]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from common import TASKS, launch

METHODS = {
    "FedPepTAO": ["method.name=fedpeptao", "method.warmup_rounds=3", "method.lanczos_iters=30",
                  "privacy.selection=public", f"privacy.public_data={TASKS / 'sst-2'}", "privacy.public_examples=256"],
    "FedAvg": ["method.name=fedavg"],
}


def fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 3.0, 1.0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny random model and small data, for a smoke run")
    args = parser.parse_args()
    model = ["model.name=tiny-bert", "data.max_train_examples=400", "data.max_eval_examples=100"] if args.quick else \
            ["model.name=minilm", "data.max_train_examples=5000", "data.max_eval_examples=1000"]
    common = [f"data.task={TASKS / 'mr'}", "data.partition=paper-dirichlet", "data.alpha=1.0", "seed=0", *model,
              "tuning.num_prompt_tokens=4", "model.max_length=48", "client.lr=0.02", "client.epochs=1",
              f"federated.num_clients={args.clients}", f"federated.clients_per_round={args.per_round}",
              f"federated.rounds={args.rounds}", f"federated.eval_every={max(1, args.rounds // 2)}"]
    results: dict[tuple[str, float], dict] = {}
    start = time.perf_counter()
    for name, extra in METHODS.items():
        for eps in args.epsilons:
            dp = [] if math.isinf(eps) else ["privacy.mode=central", f"privacy.clip_norm={args.clip}",
                                             f"privacy.target_epsilon={eps}", "privacy.delta=1e-5"]
            results[name, eps] = launch(common + extra + dp)
    print(f"\n## MR, MiniLM, {args.clients} clients ({args.per_round} per round, q = {args.per_round / args.clients:g}), "
          f"{args.rounds} rounds, central DP, clip {args.clip}, delta 1e-5")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.get_num_threads()}; "
          f"{len(results)} runs in {time.perf_counter() - start:.0f} s")
    lines = ["| method | target epsilon | epsilon spent | noise multiplier | selected round | val acc | "
             "test acc there | final test acc | MB | shared layers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, eps), res in results.items():
        s, priv = res["summary"], res["summary"].get("privacy") or {}
        sel = res["selection"]
        layers = "all" if sel is None else str(sel["layers"])
        lines.append(f"| {name} | {'inf' if math.isinf(eps) else f'{eps:g}'} | {fmt(priv.get('epsilon'), '.3f')} | "
                     f"{fmt(priv.get('noise_multiplier'), '.3f')} | {s['selected_round']} | "
                     f"{fmt(s['validation_metric'])} | {fmt(s['test_metric_at_selected'])} | {fmt(s['final_metric'])} | "
                     f"{s['total_mb']:.2f} | {layers} |")
    majority = next(iter(results.values()))["summary"].get("majority_rate")
    table = "\n".join(lines) + f"\n\nmajority-class rate of the test split: {fmt(majority)}"
    print(table)
    if args.out is not None:
        plot(results, args, args.out)
        (args.out / "privacy.md").write_text(table + "\n")


def plot(results: dict, args, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    finite = sorted(e for e in args.epsilons if not math.isinf(e))
    positions = {e: i for i, e in enumerate(finite)} | {math.inf: len(finite)}
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in METHODS:
        eps = sorted(args.epsilons, key=lambda e: positions[e])
        ax.plot([positions[e] for e in eps], [results[name, e]["summary"]["test_metric_at_selected"] for e in eps],
                marker="o", label=name)
    ax.set_xticks(list(positions.values()), [f"{e:g}" if not math.isinf(e) else "no DP" for e in positions])
    ax.set_xlabel("client-level epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy (round chosen on dev)")
    ax.set_title(f"MR, MiniLM, {args.clients} clients, {args.per_round} per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy.png", dpi=120)


if __name__ == "__main__":
    main()

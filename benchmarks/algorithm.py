"""FedPepTAO against FedAvg (all layers shared) and each ablation, side by side in one run.

Same model (MiniLM), partition (paper Dirichlet, alpha=1.0), seed and budget for every method,
on MR and SST-2 from ../shared/data/tasks. Honest selection: the round is chosen on the validation
split (the task's dev file, or a held-out share of the training data) and the test accuracy is
reported at that round and at the end. Also prints test accuracy per round, rounds and seconds
(sum of the slowest sampled client's training time) to a target, and MB communicated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/algorithm.py [--rounds 10] [--target 0.7]
"""

from __future__ import annotations

import argparse

from common import TASKS, launch

FEDPEPTAO = ["method.name=fedpeptao", "method.lanczos_iters=30"]
METHODS = {
    "FedPepTAO": FEDPEPTAO,
    "FedAvg (P-tuning v2, all layers)": ["method.name=fedavg"],
    "- no layer selection": FEDPEPTAO + ["method.ratio=1.0"],
    "- no control variate": FEDPEPTAO + ["method.use_control_variates=false"],
    "- no server momentum": FEDPEPTAO + ["method.use_momentum=false"],
    "- device SGD": FEDPEPTAO + ["client.optimizer=sgd"],
    "FedPepTAO, reference variant": FEDPEPTAO + ["method.variant=reference"],
}


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--tasks", nargs="+", default=["mr", "sst-2"])
    parser.add_argument("--train", type=int, default=1200)
    args = parser.parse_args()
    for task in args.tasks:
        common = [f"data.task={TASKS / task}", "data.partition=paper-dirichlet", "data.alpha=1.0", "seed=0",
                  "model.name=minilm", "tuning.num_prompt_tokens=10", "model.max_length=48",
                  f"data.max_train_examples={args.train}", "data.max_eval_examples=400",
                  "federated.num_clients=20", "federated.clients_per_round=5", f"federated.rounds={args.rounds}",
                  f"federated.target_accuracy={args.target}", "client.lr=0.02"]
        warmup = [f"method.warmup_rounds={args.warmup}"]
        results = {name: launch(common + extra + (warmup if "method.name=fedpeptao" in extra else []))
                   for name, extra in METHODS.items()}
        print(f"\n## {task}: MiniLM, 20 clients (5 per round), paper Dirichlet alpha=1.0, {args.rounds} rounds, "
              f"target {args.target}")
        print("| method | selected round (1-based) | val acc | test acc there | final test acc | rounds to target | "
              "s to target | MB | shared layers (ratio) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, res in results.items():
            s, sel = res["summary"], res["selection"]
            layers = "all" if sel is None else f"{sel['layers']} ({sel['ratio']:.2f})"
            print(f"| {name} | {s['selected_round']} | {fmt(s['validation_metric'], '.4f')} | "
                  f"{s['test_metric_at_selected']:.4f} | {s['final_metric']:.4f} | {fmt(s['rounds_to_target'], 'd')} | "
                  f"{fmt(s['seconds_to_target'])} | {s['total_mb']:.2f} | {layers} |")
        print(f"\nsplits: {next(iter(results.values()))['summary'].get('splits')}")
        print("test accuracy per round:")
        for name, res in results.items():
            print(f"  {name:32s} " + " ".join(f"{r['accuracy']:.3f}" for r in res["history"] if "accuracy" in r))


if __name__ == "__main__":
    main()

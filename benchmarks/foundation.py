"""Foundation benchmark: FedAvg with deep prompts on real models and real data.

Runs each configuration in its own process (so peak memory is that run's alone) and prints
accuracy, bytes and seconds per round, and peak resident memory:

1. MiniLM on MR (../shared/data/tasks/mr), 20 clients, paper Dirichlet alpha=1.0;
2. SmolLM2-135M on MR (label-word scoring);
3. the same MiniLM run with 10 and with 100 clients: peak memory ratio (backbone shared).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/foundation.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse

from common import TASKS, launch

def per_round_table(title: str, result: dict) -> None:
    print(f"\n## {title}")
    print(f"{'round':>5} {'test acc':>9} {'val acc':>9} {'train loss':>10} {'KB up':>8} {'KB down':>8} {'s/round':>8}")
    prev = 0.0
    for row in result["history"]:
        acc = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
        val = f"{row['val_accuracy']:.4f}" if "val_accuracy" in row else "-"
        print(f"{row['round']:>5} {acc:>9} {val:>9} {row['train_loss']:>10.4f} {row['bytes_up'] / 1e3:>8.1f} "
              f"{row['bytes_down'] / 1e3:>8.1f} {row['elapsed_s'] - prev:>8.1f}")
        prev = row["elapsed_s"]
    s = result["summary"]
    val = "-" if s["validation_metric"] is None else f"{s['validation_metric']:.4f}"
    print(f"test {s['metric']} {s['test_metric_at_selected']:.4f} at round {s['selected_round']} (chosen on "
          f"validation: {val}), final {s['final_metric']:.4f}, majority rate {s['majority_rate']:.4f}, "
          f"{s['total_mb']:.2f} MB total, peak memory {result['peak_mb']:.0f} MB")
    print(f"splits: {s.get('splits')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smaller data, for a smoke run")
    args = parser.parse_args()
    mr = str(TASKS / "mr")
    cap = ["data.max_train_examples=600", "data.max_eval_examples=300"] if args.quick else \
          ["data.max_train_examples=2000", "data.max_eval_examples=600"]
    common = [f"data.task={mr}", "data.partition=paper-dirichlet", "data.alpha=1.0", "method.name=fedavg",
              f"federated.rounds={args.rounds}", "model.max_length=64", "client.lr=0.02", *cap]
    minilm = launch(common + ["model.name=minilm", "tuning.num_prompt_tokens=10", "federated.num_clients=20",
                              "federated.clients_per_round=5"])
    per_round_table("MiniLM (BERT, 22.7M) on MR, FedAvg, deep prompts, 20 clients, alpha=1.0", minilm)
    smol = launch(common + ["model.name=smollm2-135m", "tuning.num_prompt_tokens=5", "federated.num_clients=20",
                            "federated.clients_per_round=5", "data.max_train_examples=800",
                            "data.max_eval_examples=300", "client.epochs=1", "client.lr=0.01",
                            f"federated.rounds={max(3, args.rounds // 2)}"])
    per_round_table("SmolLM2-135M (LLaMA) on MR, FedAvg, deep prompts, label-word scoring, 20 clients", smol)

    memory = {n: launch(common + ["model.name=minilm", "tuning.num_prompt_tokens=10", f"federated.num_clients={n}",
                                  "federated.clients_per_round=10", "federated.rounds=3"]) for n in (10, 100)}
    ratio = memory[100]["peak_mb"] / memory[10]["peak_mb"]
    print("\n## Peak memory, one shared backbone (MiniLM, 3 rounds, 10 clients sampled per round)")
    print(f"{'clients':>8} {'peak MB':>8}")
    for n, res in memory.items():
        print(f"{n:>8} {res['peak_mb']:>8.0f}")
    print(f"ratio 100/10 clients: {ratio:.3f} (target <= 1.5)")


if __name__ == "__main__":
    main()

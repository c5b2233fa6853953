"""Generative instruction tuning with SmolLM2-135M-Instruct on real question sets: zero-shot against
federated FedAvg + LoRA, FedPepTAO (deep prompts) and FedPrompt (input prompts), and the FedPepTAO
run again on an nf4 and an int8 backbone (peak memory, metric).

Every run is its own process (so its peak memory is its own): 20 non-IID clients (Dirichlet over the
answer), a few per round, evaluated by greedy generation; the round is chosen on validation (a held-out
share of each client's training data) and its test exact match is reported. Results:
``docs/results/generative/``. ``../shared/data/instruct`` holds the sets (tomi, socialiqa, mmlu).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generative.py [--sets tomi] [--runs fedpeptao,lora,...]
        [--rounds 8] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import child, collect, start

INSTRUCT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct"
RUNS = {
    "fedpeptao": ["method.name=fedpeptao", "method.ratio=0.5", "tuning.name=deep_prompt", "tuning.num_prompt_tokens=10", "client.lr=0.02"],
    "fedpeptao-previous": ["method.name=fedpeptao", "method.ratio=0.5", "method.correction=previous",
                           "tuning.name=deep_prompt", "tuning.num_prompt_tokens=10", "client.lr=0.02"],
    "lora": ["method.name=fedavg", "tuning.name=lora", "client.lr=0.005"],
    "fedprompt": ["method.name=fedavg", "tuning.name=input_prompt", "tuning.num_prompt_tokens=10", "client.lr=0.02"],
    "fedpeptao-nf4": ["method.name=fedpeptao", "method.ratio=0.5", "tuning.name=deep_prompt", "tuning.num_prompt_tokens=10", "client.lr=0.02",
                      "model.quantization=nf4"],
    "fedpeptao-int8": ["method.name=fedpeptao", "method.ratio=0.5", "tuning.name=deep_prompt", "tuning.num_prompt_tokens=10", "client.lr=0.02",
                       "model.quantization=int8"],
}
LABELS = {"fedpeptao": "FedPepTAO (deep prompts, ratio 0.5)",
          "fedpeptao-previous": "FedPepTAO, correction with the previous round's c_k (method.correction=previous)", "lora": "FedAvg + LoRA", "fedprompt": "FedPrompt",
          "fedpeptao-nf4": "FedPepTAO, nf4 backbone", "fedpeptao-int8": "FedPepTAO, int8 backbone"}


def base(task: Path, rounds: int) -> list[str]:
    return ["model.name=smollm2-135m", "model.head=generate", f"data.task={task}", "model.max_length=160",
            "data.max_train_examples=400", "data.max_eval_examples=100", "federated.num_clients=20",
            "federated.clients_per_round=4", f"federated.rounds={rounds}", "federated.eval_every=2",
            "client.epochs=1", "client.batch_size=8", "generation.max_new_tokens=8"]


def zero_shot(overrides: list[str]) -> None:
    """The bare backbone's test exact match (LoRA starts as the frozen model: B = 0), one process."""
    import resource

    import numpy as np

    from fedpeptao.config import load_config
    from fedpeptao.experiment import build_federation
    from fedpeptao.generation import evaluate_generation

    cfg = load_config(None, overrides + ["method.name=fedavg", "tuning.name=lora", "progress=false"])
    fed = build_federation(cfg)
    start_s = time.perf_counter()
    parts = [np.concatenate(fed.eval_parts)]
    score = evaluate_generation(fed.model, fed.backbone.tokenizer, fed.eval_data, parts,
                                max_new_tokens=cfg.generation.max_new_tokens, max_length=cfg.model.max_length)[0]
    print("RESULT " + json.dumps({"metrics": score.metrics(), "seconds": time.perf_counter() - start_s,
                                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def row(name: str, result: dict) -> str:
    s = result["summary"]
    selected = next((r for r in result["history"] if r["round"] == s["selected_round"]), result["history"][-1])
    choice = selected.get("choice_accuracy")
    return (f"| {LABELS[name]} | {s['test_metric_at_selected']:.3f} | {s['selected_round']} | "
            f"{'-' if choice is None else f'{choice:.3f}'} | {s['total_mb']:.2f} | {s['elapsed_s']:.0f} | "
            f"{result['peak_mb']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="tomi")
    parser.add_argument("--runs", default="fedpeptao,lora,fedprompt,fedpeptao-nf4,fedpeptao-int8")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--child", choices=["run", "zero-shot"], default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child == "run":
        return child(args.overrides)
    if args.child == "zero-shot":
        return zero_shot(args.overrides)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"OMP_NUM_THREADS={threads}; SmolLM2-135M-Instruct; 20 clients, 4 per round, {args.rounds} rounds, "
          f"1 local epoch, batch 8; 400 training / 100 test examples; greedy, 8 new tokens\n")
    for name in args.sets.split(","):
        task = INSTRUCT / name
        overrides = base(task, args.rounds) + args.overrides
        began = time.perf_counter()
        zero = collect(start([__file__, "--child", "zero-shot", *overrides]), "zero-shot")
        print(f"## {name}\n")
        print("| run | test exact match at round chosen on validation | round | test choice accuracy | MB "
              "communicated | wall s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        choice = zero["metrics"].get("choice_accuracy")
        print(f"| zero-shot (the bare backbone) | {zero['metrics']['exact_match']:.3f} | - | "
              f"{'-' if choice is None else f'{choice:.3f}'} | 0 | {zero['seconds']:.0f} | {zero['peak_mb']:.0f} |",
              flush=True)
        for run in filter(None, args.runs.split(",")):  # --runs "": the zero-shot row alone
            result = collect(start([__file__, "--child", "run", *overrides, *RUNS[run]]), run)
            print(row(run, result), flush=True)
        print(f"\n{name}: {time.perf_counter() - began:.0f} s\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Scale benchmark: memory against the number of clients, a round's useful FLOP/s against the
machine's matmul rate, and batched against sequential rounds, all on the default config
(MiniLM, rotten_tomatoes, FedPepTAO with deep prompts).

1. peak resident memory with 10, 100 and 1,000 clients of which 10 train per round (2 rounds,
   each run in its own process);
2. one round, sequential and batched side by side in this process: training and evaluation
   seconds, real and padded tokens, and useful FLOP/s (real tokens only: forward 2N per token,
   backward 2N for the activation gradients through the frozen backbone, N its matmul
   parameters) as a share of the fp32 matmul rate measured here at the same thread count.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import count_tokens, launch, synchronize

DEFAULT = ["seed=0", "model.name=minilm", "model.max_length=64", "data.task=rotten_tomatoes",
           "data.max_train_examples=2000", "data.max_eval_examples=1000", "client.lr=0.02",
           "method.name=fedpeptao", "method.ratio=0.5", "tuning.name=deep_prompt", "tuning.num_prompt_tokens=10",
           "checkpoint.every=0"]


def matmul_rate(size: int = 1024, repeats: int = 20) -> float:
    """fp32 FLOP/s of a square matmul on the device the runs use (``device=auto``), at this thread count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def matmul_params(model) -> int:
    """Parameters of the backbone's transformer matmuls (not embeddings, norms or biases)."""
    return sum(m.weight.numel() for name, m in model.model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(part in name for part in ("embeddings", "cls", "pooler")))


def one_round(execution: str, quick: bool) -> dict:
    from fedpeptao.config import load_config
    from fedpeptao.sim.simulator import Simulation

    cfg = load_config(None, DEFAULT + [f"execution={execution}", "progress=false", "federated.num_clients=20",
                                       f"federated.clients_per_round={3 if quick else 5}"])
    sim = Simulation(cfg)
    tokens = count_tokens(sim.model)
    sim.algorithm.prepare_round(0, sim.run_task)  # selection phases are not part of this measure
    tokens.update(real=0, padded=0)
    synchronize()
    start = time.perf_counter()
    sim.train_round(0)
    synchronize()
    train_s = time.perf_counter() - start
    train_tokens = dict(tokens)
    tokens.update(real=0, padded=0)
    start = time.perf_counter()
    sim.evaluate()
    synchronize()
    eval_s = time.perf_counter() - start
    n = matmul_params(sim.model)
    train_real, eval_real = int(train_tokens["real"]), int(tokens["real"])
    useful = 4 * n * train_real + 2 * n * eval_real
    return {"execution": execution, "batched": sim.batched, "train_s": train_s, "eval_s": eval_s,
            "train_fill": train_real / train_tokens["padded"], "eval_fill": eval_real / tokens["padded"],
            "flops": useful / (train_s + eval_s)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="alternating sequential/batched round pairs")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; device: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    if not args.no_memory:
        memory_table(args.quick)
    round_table(args.quick, args.repeats)


def memory_table(quick: bool) -> None:
    gpu = torch.cuda.is_available()
    print("\n## Peak memory, one shared backbone (10 clients train per round, 2 rounds)")
    print(f"{'clients':>8} {'peak MB':>8}" + (f" {'peak GPU MB':>11}" if gpu else ""))
    peaks = {}
    for clients in (10, 100) if quick else (10, 100, 1000):
        result = launch(DEFAULT + [f"federated.num_clients={clients}", "federated.clients_per_round=10",
                                   "federated.rounds=2", "data.max_train_examples=" + ("400" if quick else "3000")])
        peaks[clients] = result["peak_mb"]
        print(f"{clients:>8} {peaks[clients]:>8.0f}" + (f" {result['peak_gpu_mb']:>11.0f}" if gpu else ""))
    largest = max(peaks)
    print(f"ratio {largest}/10 clients: {peaks[largest] / peaks[10]:.3f} (target <= 1.5)")


def round_table(quick: bool, repeats: int) -> None:
    """Round 0 of the default config, sequential and batched alternately ``repeats`` times (so that
    a slow spell of the machine hits both), each row one try; the ratio of the medians."""
    rate = matmul_rate()
    print(f"\n## One default round, alternating (fp32 matmul rate here: {rate / 1e9:.1f} GFLOP/s)")
    print(f"{'execution':>10} {'batched':>7} {'train s':>8} {'eval s':>7} {'round s':>8} {'train fill':>10} "
          f"{'eval fill':>9} {'useful GFLOP/s':>14} {'share':>6}")
    rows = [one_round(execution, quick) for _ in range(repeats) for execution in ("sequential", "batched")]
    for r in rows:
        print(f"{r['execution']:>10} {str(r['batched']):>7} {r['train_s']:>8.1f} {r['eval_s']:>7.1f} "
              f"{r['train_s'] + r['eval_s']:>8.1f} {r['train_fill']:>10.2f} {r['eval_fill']:>9.2f} "
              f"{r['flops'] / 1e9:>14.1f} {r['flops'] / rate:>6.2f}")
    times = {e: [r["train_s"] + r["eval_s"] for r in rows if r["execution"] == e] for e in ("sequential", "batched")}
    median = {e: statistics.median(t) for e, t in times.items()}
    spread = {e: max(t) / min(t) - 1 for e, t in times.items()}
    print(f"batched / sequential round time (medians of {repeats}): {median['batched'] / median['sequential']:.3f} "
          f"(max/min - 1 within a mode: sequential {spread['sequential']:.1%}, batched {spread['batched']:.1%}); "
          "fill: real tokens / padded tokens")


if __name__ == "__main__":
    main()

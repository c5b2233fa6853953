"""The embedded simulator against Flower's simulation engine on the same study.

The same experiment (MiniLM, rotten_tomatoes, FedPepTAO with deep prompts, the same partition,
seed and rounds) runs once through ``flwr.simulation.run_simulation`` (Ray, one virtual SuperNode
per client, our ServerApp and ClientApp) and once through the embedded simulator, in this process.
Prints the wall time of each, their ratio, and whether their metrics, bytes and global tensors agree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_flower.py [--rounds N] [--clients N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from flower_helpers import StateDirClientApp, configured_server_app, write_toml  # noqa: E402


def experiment(rounds: int, clients: int) -> dict:
    return {"seed": 0, "progress": False,
            "model": {"name": "minilm", "max_length": 64},
            "data": {"task": "rotten_tomatoes", "partition": "paper-dirichlet", "alpha": 1.0,
                     "max_train_examples": 2000, "max_eval_examples": 1000},
            "federated": {"num_clients": clients, "clients_per_round": min(5, clients), "rounds": rounds},
            "client": {"epochs": 2, "batch_size": 8, "lr": 0.02},
            "method": {"name": "fedpeptao", "ratio": 0.5},
            "tuning": {"name": "deep_prompt", "num_prompt_tokens": 10},
            "checkpoint": {"every": 0}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    from flwr.simulation import run_simulation

    from fedpeptao.config import ExperimentConfig
    from fedpeptao.sim.simulator import Simulation

    print(f"torch threads: {torch.get_num_threads()}; {args.clients} clients, 5 per round, {args.rounds} rounds")
    exp = experiment(args.rounds, args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FLWR_HOME"] = str(root / "flwr-home")
        config = write_toml(root / "experiment.toml", exp)
        run_config = {"config": str(config), "output-dir": str(root / "out"), "round-timeout": 600.0,
                      "min-nodes": args.clients, "node-wait-timeout": 120.0}
        backend = {"init_args": {"num_cpus": 1, "include_dashboard": False},
                   "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
        start = time.perf_counter()
        run_simulation(configured_server_app(run_config), StateDirClientApp(root / "state"),
                       num_supernodes=args.clients, backend_name="ray", backend_config=backend)
        flower_s = time.perf_counter() - start
        rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
        flower_params = load_file(root / "out" / "global.safetensors")

        start = time.perf_counter()
        sim = Simulation(ExperimentConfig.model_validate(exp))
        sim.run()
        sim_s = time.perf_counter() - start

    same_bytes = [(r["bytes_up"], r["bytes_down"]) for r in rows] == [(h["bytes_up"], h["bytes_down"])
                                                                    for h in sim.history]
    same_clients = [r["clients"] for r in rows] == [h["clients"] for h in sim.history]
    acc_diff = max(abs(r["accuracy"] - h["accuracy"]) for r, h in zip(rows, sim.history))
    tensor_diff = max(float((flower_params[n] - t).abs().max()) for n, t in sim.algorithm.params.items())
    print(f"\n{'runtime':>28} {'wall s':>8} {'final acc':>9}")
    print(f"{'Flower simulation engine':>28} {flower_s:>8.1f} {rows[-1]['accuracy']:>9.4f}")
    print(f"{'embedded simulator':>28} {sim_s:>8.1f} {sim.history[-1]['accuracy']:>9.4f}")
    print(f"speed-up {flower_s / sim_s:.2f}x (target >= 2.5x); same clients {same_clients}, same bytes {same_bytes}, "
          f"max accuracy difference {acc_diff:.4f}, max global tensor difference {tensor_diff:.2e}")


if __name__ == "__main__":
    main()

"""What secure aggregation costs: time and bytes per round with and without Flower's SecAgg+.

Each configuration runs on Flower's simulation engine (Ray, one virtual SuperNode per client, our
ServerApp and ClientApp, every client sampled every round: ``clients_per_round = num_clients``),
FedAvg with deep prompts on a small generated sentiment task, in its own process. Measured on the
server side: the seconds from sending a round's training messages to its aggregated tensors (the
training and, with SecAgg+, the protocol's four exchanges and the unmasking), and the bytes of
every message of the training exchanges as Flower serializes them (down: server to nodes; up:
nodes to server), averaged over the rounds after the first (which also builds the model on every
node). The evaluation exchange is left out (the same with or without SecAgg+).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secure_aggregation.py [--clients 5 10 20] [--rounds 3]
        [--model tiny-bert|minilm] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def experiment(task: Path, clients: int, rounds: int, model: str, secure: bool) -> dict:
    return {"seed": 0, "progress": False, "execution": "sequential",
            "model": {"name": model, "max_length": 32},
            "data": {"task": str(task), "partition": "iid"},
            "federated": {"num_clients": clients, "clients_per_round": clients, "rounds": rounds,
                          "eval_every": rounds},
            "client": {"epochs": 1, "batch_size": 8},
            "method": {"name": "fedavg"},
            "tuning": {"name": "deep_prompt", "num_prompt_tokens": 4},
            "checkpoint": {"every": 0},
            "privacy": {"secure_aggregation": secure}}


class MeasuringGrid:
    """The engine's grid, counting the serialized bytes of training messages each way."""

    def __init__(self, grid, counts: dict) -> None:
        self._grid, self.counts = grid, counts

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.serde import message_to_proto  # noqa: PLC0415

        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if any(m.metadata.message_type == "train" for m in messages):
            self.counts["down"] += sum(message_to_proto(m).ByteSize() for m in messages)
            self.counts["up"] += sum(message_to_proto(m).ByteSize() for m in replies)
            self.counts["exchanges"] += 1
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def child(clients: int, rounds: int, model: str, secure: bool) -> None:
    """One configuration; prints a ``RESULT`` line."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation
    from flower_helpers import StateDirClientApp, write_task, write_toml

    from fedpeptao.flower.server_app import app as server_app
    from fedpeptao.flower.settings import RUN_CONFIG_DEFAULTS
    from fedpeptao.flower.strategy import FederatedStrategy

    rounds_seen: list[dict] = []
    counts = {"down": 0, "up": 0, "exchanges": 0}
    configure, aggregate = FederatedStrategy.configure_train, FederatedStrategy.aggregate_train

    def timed_configure(self, server_round, *args, **kwargs):
        rounds_seen.append({"start": time.perf_counter(), **counts})
        return configure(self, server_round, *args, **kwargs)

    def timed_aggregate(self, server_round, *args, **kwargs):
        out = aggregate(self, server_round, *args, **kwargs)
        rounds_seen[-1].update(seconds=time.perf_counter() - rounds_seen[-1]["start"],
                               down=counts["down"] - rounds_seen[-1]["down"], up=counts["up"] - rounds_seen[-1]["up"],
                               exchanges=counts["exchanges"] - rounds_seen[-1]["exchanges"])
        return out

    FederatedStrategy.configure_train, FederatedStrategy.aggregate_train = timed_configure, timed_aggregate
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FLWR_HOME"] = str(root / "flwr-home")
        task = write_task(root / "task", train=12 * clients, test=16)
        config = write_toml(root / "experiment.toml", experiment(task, clients, rounds, model, secure))
        settings = {**RUN_CONFIG_DEFAULTS, "config": str(config), "output-dir": str(root / "out"),
                    "round-timeout": 600.0, "min-nodes": clients, "node-wait-timeout": 120.0}
        wrapper = ServerApp()

        @wrapper.main()
        def main(grid: Grid, context: Context) -> None:
            context.run_config = dict(settings)
            server_app(MeasuringGrid(grid, counts), context)

        backend = {"init_args": {"num_cpus": 1, "include_dashboard": False},
                   "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
        run_simulation(wrapper, StateDirClientApp(root / "state"), num_supernodes=clients, backend_name="ray",
                       backend_config=backend)
        rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    later = rounds_seen[1:] or rounds_seen
    print("RESULT " + json.dumps({
        "clients": clients, "secure": secure, "model": model, "rounds": len(rounds_seen),
        "s_per_round": sum(r["seconds"] for r in later) / len(later),
        "first_round_s": rounds_seen[0]["seconds"],
        "down_bytes": sum(r["down"] for r in later) / len(later), "up_bytes": sum(r["up"] for r in later) / len(later),
        "exchanges": later[0]["exchanges"], "contributors": [r.get("contributors", len(r["clients"])) for r in rows],
        "engine_bytes_up": rows[-1]["bytes_up"], "engine_bytes_down": rows[-1]["bytes_down"]}), flush=True)


def run_child(clients: int, rounds: int, model: str, secure: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}
    args = [sys.executable, __file__, "--child", "--clients", str(clients), "--rounds", str(rounds), "--model", model]
    proc = subprocess.run(args + (["--secure"] if secure else []), env=env, text=True, capture_output=True,
                          timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{clients} clients, secure={secure} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--secure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round, which builds the model, is not timed)")
    if args.child:
        child(args.clients[0], args.rounds, args.model, args.secure)
        return
    print(f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
          f"{args.model}, FedAvg, deep prompts, Flower simulation engine (Ray, 1 CPU), every client every round, "
          f"{args.rounds} rounds (the first not timed)")
    results = []
    for clients in args.clients:
        for secure in (False, True):
            results.append(run_child(clients, args.rounds, args.model, secure))
    header = (f"{'clients':>7} {'SecAgg+':>7} {'s/round':>8} {'x plain':>7} {'down KB':>9} {'up KB':>9} "
              f"{'x plain up':>10} {'exchanges':>9}")
    print("\n" + header)
    plain: dict[int, dict] = {}
    for r in results:
        base = plain.setdefault(r["clients"], r) if not r["secure"] else plain[r["clients"]]
        print(f"{r['clients']:>7} {'yes' if r['secure'] else 'no':>7} {r['s_per_round']:>8.2f} "
              f"{r['s_per_round'] / base['s_per_round']:>7.2f} {r['down_bytes'] / 1e3:>9.1f} "
              f"{r['up_bytes'] / 1e3:>9.1f} {r['up_bytes'] / base['up_bytes']:>10.2f} {r['exchanges']:>9}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

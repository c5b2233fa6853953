"""Does FedPepTAO's selection pay for itself? Its cost against FedAvg's on the default config, and
which Hessian-vector product is fastest for the Hessian ratio.

1. ``configs/default.toml`` run with FedPepTAO and with FedAvg side by side (two processes, one
   thread each, one per core, so both see the same machine): wall time of each run, the
   selection's wall time (``phase_seconds``: layer scoring, and the Hessian ratio when
   ``method.ratio=auto``) and its share, the ratio of the two runs, and the accuracy each reports;
2. the HVP of one client's batch loss w.r.t. every deep-prompt layer (what the Hessian ratio's
   Lanczos iterations call 50 times per client) by double backward through a kept graph (what
   :func:`fedpeptao.core.selection.client_hvp` does) and by forward-over-reverse with
   ``torch.func.jvp(torch.func.grad(...))``: milliseconds per product and their difference;
3. FedPepTAO's Hessian-ratio task for 3 clients one at a time and with every Lanczos step's
   products from one shared double-backward pass (what ``execution=batched`` does): seconds and
   the ratios, which must agree.

Trailing ``key=value`` overrides apply to every config here (say ``model.random_init=true
model.name=FOLDER data.task=FOLDER`` on a machine without the bundled model and data). On a GPU the
timings synchronise the device.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/selection.py [--rounds N] [--repeats K] [--no-runs] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import ONE_THREAD, collect, start, synchronize

ROOT = Path(__file__).resolve().parents[1]


def default_config(overrides: list[str]):
    """``configs/default.toml`` with the given overrides, quiet."""
    from fedpeptao.config import load_config

    return load_config(ROOT / "configs" / "default.toml", ["progress=false", *overrides])



def run_child(method: str, rounds: int | None, overrides: list[str]) -> None:
    """One run of the default config (in its own process); prints its RESULT line."""
    from fedpeptao.sim.simulator import Simulation

    cfg = default_config([f"method.name={method}", "checkpoint.every=0",
                          *([f"federated.rounds={rounds}"] if rounds else []), *overrides])
    start = time.perf_counter()
    sim = Simulation(cfg)
    history = sim.run()
    summary = sim.summary()
    print("RESULT " + json.dumps({"wall_s": time.perf_counter() - start, "run_s": history[-1]["elapsed_s"],
                                  "phase_s": summary["phase_seconds"], "final": history[-1]["accuracy"],
                                  "best": summary.get("best_round"), "bytes": history[-1]["total_bytes"]}))


def side_by_side(rounds: int | None, overrides: list[str]) -> dict[str, dict]:
    """FedPepTAO and FedAvg at the same time, one thread each."""
    extra = ["--rounds", str(rounds)] if rounds else []
    procs = {m: start([__file__, "--child", m, *extra, *overrides], ONE_THREAD) for m in ("fedpeptao", "fedavg")}
    return {method: collect(proc, f"{method} run") for method, proc in procs.items()}


def hvp_table(overrides: list[str], repeats: int = 10) -> list[tuple[str, float, float]]:
    """(method, ms per HVP, max abs difference to double backward) on one default-config client batch."""
    from torch.func import functional_call, grad, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fedpeptao.core.selection import _first_batch, client_hvp
    from fedpeptao.sim.simulator import Simulation

    sim = Simulation(default_config(overrides))
    model, part = sim.model, sim.train_parts[0]
    names = [f"prompt.layers.{i}" for i in model.prompt.active_layers]
    start = time.perf_counter()
    lockstep, dim = client_hvp(model, sim.train_data, [part], sim.cfg.client.batch_size, [0], names)
    double_backward = lambda v: lockstep([v])[0]  # noqa: E731 - one client's products
    build_ms = (time.perf_counter() - start) * 1000

    named = dict(model.named_parameters())
    primals = tuple(named[n].detach() for n in names)
    sizes = [p.numel() for p in primals]
    batch = {k: v.to(model.device) for k, v in _first_batch(sim.train_data, part, sim.cfg.client.batch_size, 0).items()}

    def loss(*tensors):
        return functional_call(model, dict(zip(names, tensors)), args=(), kwargs=batch, strict=False).loss

    gradient = grad(loss, argnums=tuple(range(len(primals))))

    def forward_over_reverse(v: torch.Tensor) -> torch.Tensor:
        tangents = tuple(c.view_as(p) for c, p in zip(v.split(sizes), primals))
        with sdpa_kernel(SDPBackend.MATH):
            return torch.cat([t.reshape(-1) for t in jvp(gradient, primals, tangents)[1]])

    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(dim, generator=generator).to(model.device) for _ in range(repeats)]
    timings, products = {}, {}
    for name, fn in (("double backward (kept graph)", double_backward),
                     ("forward-over-reverse (torch.func)", forward_over_reverse)):
        with torch.no_grad():
            fn(vectors[0])
        synchronize()
        start = time.perf_counter()
        products[name] = [fn(v).detach() for v in vectors]
        synchronize()
        timings[name] = (time.perf_counter() - start) * 1000 / repeats
    reference = products["double backward (kept graph)"]
    print(f"HVP dimension {dim} (every deep-prompt layer); double backward builds its graph once in {build_ms:.0f} ms")
    return [(name, timings[name], max(float((a - b).abs().max()) for a, b in zip(products[name], reference)))
            for name in timings]


def hessian_table(overrides: list[str], clients: int = 3) -> list[tuple[str, float, list[float]]]:
    """FedPepTAO's Hessian-ratio task for ``clients`` clients at the default config's tensors, one
    client at a time and in one shared pass per Lanczos step: (mode, seconds, ratios)."""
    from fedpeptao.algorithms.base import ClientTask, ClientWork
    from fedpeptao.algorithms.fedpeptao.selection import HESSIAN_TASK
    from fedpeptao.core.federation import HESSIAN_STREAM, round_seed
    from fedpeptao.sim.simulator import Simulation

    sim = Simulation(default_config(overrides))
    chosen = list(range(clients))
    task = ClientTask(HESSIAN_TASK, chosen, sim.model.trainable_state(), 0, HESSIAN_STREAM,
                      {k: {"probe_seed": k} for k in chosen})
    works = [ClientWork(k, sim.model, sim.train_data, sim.train_parts[k], round_seed(0, 0, k, HESSIAN_STREAM),
                        sim.cfg.client.batch_size) for k in chosen]
    rows = []
    for mode, run in (("one client at a time", lambda: [sim.algorithm.run_tasks(task, [w])[0] for w in works]),
                      ("one pass per Lanczos step", lambda: sim.algorithm.run_tasks(task, works))):
        sim.model.load_trainable(task.params)
        synchronize()
        start = time.perf_counter()
        results = run()
        rows.append((mode, time.perf_counter() - start, [r["ratio"] for r in results]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the config's 10)")
    parser.add_argument("--repeats", type=int, default=1, help="side-by-side pairs to run (noise)")
    parser.add_argument("--no-runs", action="store_true", help="skip the side-by-side runs (Hessian tables only)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.rounds, args.overrides)
        return
    print(f"torch threads: 1 per run (two runs side by side); Hessian tables: {torch.get_num_threads()}")
    if not args.no_runs:
        run_table(args.rounds, args.repeats, args.overrides)
    print("\n## Hessian-vector products, one client batch")
    print(f"{'method':>34} {'ms / HVP':>9} {'max diff':>9}")
    for name, ms, diff in hvp_table(args.overrides):
        print(f"{name:>34} {ms:9.1f} {diff:9.2e}")
    print("\n## Hessian ratio of 3 clients (50 Lanczos steps each, every deep-prompt layer)")
    print(f"{'mode':>26} {'seconds':>8}  ratios")
    rows = hessian_table(args.overrides)
    for mode, seconds, ratios in rows:
        print(f"{mode:>26} {seconds:8.1f}  " + ", ".join(f"{r:.6f}" for r in ratios))
    print(f"max ratio difference {max(abs(a - b) for a, b in zip(rows[0][2], rows[1][2])):.2e}; "
          f"pooled / one at a time: {rows[1][1] / rows[0][1]:.2f}")


def run_table(rounds: int | None, repeats: int, overrides: list[str]) -> None:
    print("\n## configs/default.toml, FedPepTAO vs FedAvg side by side")
    print(f"{'pair':>4} {'method':>10} {'run s':>7} {'selection s':>11} {'share':>6} {'final acc':>9} {'MB':>6}")
    ratios = []
    for pair in range(repeats):
        results = side_by_side(rounds, overrides)
        for method, r in results.items():
            print(f"{pair:>4} {method:>10} {r['run_s']:7.1f} {r['phase_s']:11.2f} {r['phase_s'] / r['run_s']:6.3f} "
                  f"{r['final']:9.4f} {r['bytes'] / 1e6:6.2f}")
        ratios.append(results["fedpeptao"]["run_s"] / results["fedavg"]["run_s"])
    print("FedPepTAO / FedAvg run time: " + ", ".join(f"{r:.3f}" for r in ratios) + " (target <= 1.1)")


if __name__ == "__main__":
    main()

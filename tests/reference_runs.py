"""Reference runs: tiny-model experiments whose outputs are committed as fixtures, so a change of
structure can prove it computes exactly what the code computed before (global and per-client
tensors within 5e-5, every metrics row equal to 1e-4 relative: library releases move them by about 1e-5).

``python tests/reference_runs.py`` (re)records ``tests/fixtures/reference/``; do that only when a
change of numbers is intended, and say which and why in the commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "reference"

BASE = ["model.name=tiny-bert", "model.max_length=24", "federated.num_clients=4", "federated.clients_per_round=3",
        "federated.rounds=3", "client.epochs=1", "client.batch_size=4", "progress=false", "seed=3",
        "data.partition=paper-dirichlet", "execution=sequential", "tuning.num_prompt_tokens=4"]
LORA = ["tuning.name=lora"]

#: name -> config overrides on top of ``BASE`` (and the task folder)
RUNS: dict[str, list[str]] = {
    "fedpeptao_auto_warmup": ["method.name=fedpeptao", "method.ratio=auto", "method.warmup_rounds=1",
                              "method.lanczos_iters=6", "method.hessian_clients=2"],
    "fedpeptao_lora": [*LORA, "method.name=fedpeptao", "method.ratio=0.5"],
    "scaffold_lora": [*LORA, "method.name=scaffold"],
    "fedprox": ["method.name=fedprox"],
    "moon": ["method.name=moon"],
    "fedadam": ["method.name=fedadam"],
    "fedpeptao_central_dp": ["method.name=fedpeptao", "method.ratio=0.5", "privacy.mode=central",
                             "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.3"],
    "fedavg_local_dp": ["method.name=fedavg", "privacy.mode=local", "privacy.clip_norm=0.5",
                        "privacy.noise_multiplier=0.3"],
    "fedpeptao_batched": ["method.name=fedpeptao", "method.ratio=0.5", "execution=batched", "clients_per_pass=3"],
}
#: runs with every dropout off (batched passes draw dropout per pass, not per client)
NO_DROPOUT = {"fedpeptao_batched"}


def overrides(name: str, task: Path) -> list[str]:
    extra = RUNS[name]
    base = [o for o in BASE if not (o.startswith("tuning.num_prompt_tokens") and "tuning.name=lora" in extra)]
    return [*base, f"data.task={task}", *extra]


def simulate(name: str, task: Path):
    """Run reference ``name`` in the embedded simulator; returns the finished simulation."""
    from fedpeptao.config import load_config
    from fedpeptao.sim.simulator import Simulation

    sim = Simulation(load_config(None, overrides(name, task)))
    if name in NO_DROPOUT:
        for module in sim.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    sim.run()
    return sim


def outputs(sim) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(global tensors, every contacted client's tensors as ``<k>/<name>``, rows without timing)."""
    from fedpeptao.utils.round_log import TIMING

    clients = {f"{k}/{n}": t for k, c in sorted(sim.clients.items()) for n, t in c.params.items()}
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in sim.history]
    return dict(sim.algorithm.params), clients, rows


def write(name: str, tensors: dict[str, torch.Tensor], clients: dict[str, torch.Tensor], rows: list[dict]) -> None:
    folder = FIXTURES / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "global.safetensors")
    if clients:
        save_file({k: v.contiguous() for k, v in clients.items()}, folder / "clients.safetensors")
    (folder / "rows.json").write_text(json.dumps(rows, indent=1, sort_keys=True))


def read(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
    folder = FIXTURES / name
    clients = folder / "clients.safetensors"
    return (load_file(folder / "global.safetensors"), load_file(clients) if clients.exists() else {},
            json.loads((folder / "rows.json").read_text()))


FLOWER_RUN = "flower_simulation_engine"


def flower_simulation(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
    """FedPepTAO (2 clients, 3 rounds) under Flower's simulation engine (Ray): its outputs as
    :func:`outputs` gives them, the clients' tensors read back from each node's state folder."""
    from flower_helpers import rows_without_timing, run_with_simulation_engine, tiny_experiment, write_task
    from flwr.app import RecordDict

    from fedpeptao.flower.node_state import ClientStore

    out = run_with_simulation_engine(root, tiny_experiment(write_task(root / "task"), federated={"rounds": 3}))
    clients = {}
    for k in (0, 1):
        (folder,) = (root / "state" / f"node-{k}").glob(f"run-*/client-{k}")
        stored = ClientStore(RecordDict(), folder).load(10**6)
        clients.update({f"{k}/{n}": t for n, t in stored.state.params.items()})
    return load_file(out / "global.safetensors"), clients, rows_without_timing(out)


def record(names: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    from conftest import write_task

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        task = write_task(Path(tmp) / "task")
        for name in names:
            if name == FLOWER_RUN:
                tensors, clients, rows = flower_simulation(Path(tmp) / "flower")
            else:
                tensors, clients, rows = outputs(simulate(name, task))
            write(name, tensors, clients, json.loads(json.dumps(rows)))
            print("recorded", name)


if __name__ == "__main__":
    record(sys.argv[1:] or [*RUNS, FLOWER_RUN])

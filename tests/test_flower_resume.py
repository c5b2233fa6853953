"""A ServerApp that dies mid-run and is started again with the same run config continues exactly.

The ServerApp checkpoints every round (``checkpoint.every = 1``) and dies at its first train
exchange after a checkpoint, once the nodes have trained that round (``crash_server_after``): the
restarted ServerApp replays a round the nodes already trained, so each node must start it from the
state it had before (node state is kept per run key and versioned by round). The final global
tensors must equal an uninterrupted run's to 1e-6 and ``metrics.jsonl`` must hold the same rows.

In-process (``InProcessGrid``, seconds) for FedPepTAO with warm-up and Hessian ratio (the crash
falls on the switch round), SCAFFOLD (server ``c``, node ``c_k``) and MOON (the node's previous
model); then once under Flower's own simulation engine (``flwr.simulation.run_simulation``, Ray).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_helpers import (InProcessGrid, ServerCrash, StateDirClientApp, configured_server_app,  # noqa: E402
                            crash_server_after, keep_process_settings, max_abs_diff, metrics,  # noqa: F401
                            node_configs, rows_without_timing, run_in_process, run_server_app, tiny_experiment,
                            write_task, write_toml)

from fedpeptao.config import ConfigError, ExperimentConfig  # noqa: E402
from fedpeptao.flower.client_app import app as client_app  # noqa: E402
from fedpeptao.sim.simulator import Simulation  # noqa: E402
from fedpeptao.utils.checkpoint import list_checkpoints  # noqa: E402

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="Flower's simulation engine and /proc"),
              pytest.mark.usefixtures("keep_process_settings")]
EXACT = 1e-6

METHODS = {
    # round 2 is the last warm-up round: the crash falls on round 3, the switch round, after its
    # Hessian task ran and the nodes adopted the warmed-up base; all of it is redone on restart
    "fedpeptao": {"name": "fedpeptao", "ratio": "auto", "warmup_rounds": 2, "lanczos_iters": 6,
                  "hessian_clients": 2},
    "scaffold": {"name": "scaffold"},
    "moon": {"name": "moon"},
}


def experiment_for(task: Path, method: dict, rounds: int, **sections) -> dict:
    return tiny_experiment(task, method=method, checkpoint={"every": 1, "keep": 10},
                           federated={"num_clients": 3, "clients_per_round": 2, "rounds": rounds}, **sections)


@contextmanager
def console_lines():
    """What Flower's logger prints (the package's records reach it through ``route_to_flower``)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    logging.getLogger("flwr").addHandler(handler)
    try:
        yield lines
    finally:
        for name in ("flwr", "fedpeptao"):
            logging.getLogger(name).removeHandler(handler)


def trained_rounds(root: Path, client: int) -> list[int]:
    """The rounds (from 1) client ``client``'s node kept a copy of its state for."""
    folders = list((root / f"state-{client}").glob(f"run-*/client-{client}"))
    return [r for folder in folders for r, _ in list_checkpoints(folder)]


@pytest.mark.parametrize("name", list(METHODS))
def test_restarted_server_app_continues_exactly(tmp_path, name):
    task = write_task(tmp_path / "task")
    experiment = experiment_for(task, METHODS[name], rounds=4)
    # the checkpoints in their own folder for one method, in the output folder for the others
    run_config = {"checkpoint-dir": str(tmp_path / "cut" / "ckpt")} if name == "scaffold" else {}
    full, _ = run_in_process(tmp_path / "full", experiment)

    root = tmp_path / "cut"
    root.mkdir()
    config = write_toml(root / "experiment.toml", experiment)
    out, checkpoints = root / "out", Path(run_config.get("checkpoint-dir", root / "out"))
    grid = InProcessGrid(client_app, node_configs(root, 3))
    crash_server_after(grid, checkpoints, round_number=2)
    with pytest.raises(ServerCrash), console_lines() as first_start:
        run_server_app(grid, config, out, **run_config)
    assert [r for r, _ in list_checkpoints(checkpoints)] == [1, 2]
    assert [r["round"] for r in metrics(out)] == [1, 2] and not (out / "global.safetensors").exists()
    replayed = [m.metadata.dst_node_id - 1000 for m in grid.sent
                if m.metadata.message_type == "train" and m.metadata.group_id == "3"]
    assert replayed and all(3 in trained_rounds(root, k) for k in replayed), "the nodes trained round 3 already"

    # a restart with another config is refused, naming what changed
    with pytest.raises(ConfigError, match=r"another config \(client.lr: "):
        run_server_app(grid, config, out, overrides="client.lr=0.03", **run_config)

    # the same run config, the same nodes (their contexts and state folders): it continues
    sent_before = len(grid.sent)
    with console_lines() as restart:
        run_server_app(grid, config, out, **run_config)
    assert min(int(m.metadata.group_id) for m in grid.sent[sent_before:]
               if m.metadata.message_type == "train") == 3, "continued from round 3, not from the start"
    # one numbering, from 1 and global, in the rows, the checkpoints, the nodes' copies and the console
    assert [r["round"] for r in metrics(out)] == [1, 2, 3, 4]
    assert [r for r, _ in list_checkpoints(checkpoints)] == [1, 2, 3, 4]
    assert max(trained_rounds(root, replayed[0])) <= 4
    rounds = [line for line in first_start + restart if line.startswith("[ROUND")]
    assert rounds == ["[ROUND 1/4]", "[ROUND 2/4]", "[ROUND 3/4]", "[ROUND 3/4]", "[ROUND 4/4]"]
    assert any("continuing after round 2" in line for line in restart)
    assert 1 <= json.loads((out / "summary.json").read_text())["selected_round"] <= 4
    diff = max_abs_diff(load_file(full / "global.safetensors"), load_file(out / "global.safetensors"))
    assert diff <= EXACT, f"{name}: the resumed run differs from the uninterrupted one by {diff:.3g}"
    assert rows_without_timing(out) == rows_without_timing(full)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert summary.get("selection") == expected.get("selection")


# -- Flower's simulation engine ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_available() -> None:
    """Skip when Ray cannot start here (no ray package, no shared memory, a sandbox refusing it)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Flower's simulation engine needs ray (pip install 'flwr[simulation]')")
    import ray  # noqa: PLC0415

    try:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except Exception as exc:  # noqa: BLE001 - any failure to start means: cannot test here
        pytest.skip(f"Ray cannot start in this environment: {type(exc).__name__}: {exc}")
    finally:
        if ray.is_initialized():
            ray.shutdown()


@pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")
def test_restart_under_flowers_simulation_engine(tmp_path, ray_available, monkeypatch):
    """2 virtual SuperNodes, 3 rounds, one Ray actor; the ServerApp dies after round 2's checkpoint
    and ``run_simulation`` is called again: equal to the embedded simulator.

    The engine passes the ServerApp no run config and each node only ``partition-id`` and
    ``num-partitions``, so ``configured_server_app`` supplies the run config and
    ``StateDirClientApp`` the node's ``state-dir``. A new ``run_simulation`` is a new Flower run
    (new run id, new node ids, empty node contexts): what carries over is the server checkpoint (with
    the run key) and each node's state folder.
    """
    from flwr.simulation import run_simulation  # noqa: PLC0415

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # whatever Flower writes stays here
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # Flower's ray start-up extends it
    experiment = tiny_experiment(write_task(tmp_path / "task"), federated={"rounds": 3}, checkpoint={"every": 1})
    config = write_toml(tmp_path / "experiment.toml", experiment)
    # the engine registers its nodes after starting the ServerApp: wait for both
    run_config = {"config": str(config), "output-dir": str(tmp_path / "out"), "round-timeout": 120.0,
                  "min-nodes": 2, "node-wait-timeout": 60.0}
    backend = {"init_args": {"num_cpus": 1, "include_dashboard": False},
               "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    nodes = StateDirClientApp(tmp_path / "state")

    with pytest.raises(ServerCrash):
        run_simulation(configured_server_app(run_config, crash_after=2), nodes, num_supernodes=2,
                       backend_name="ray", backend_config=backend)
    out = tmp_path / "out"
    assert [r for r, _ in list_checkpoints(out)] == [1, 2]
    assert [r["round"] for r in metrics(out)] == [1, 2]
    for k in (0, 1):  # the nodes trained round 3 before the server died
        (folder,) = (tmp_path / "state" / f"node-{k}").glob(f"run-*/client-{k}")
        assert [r for r, _ in list_checkpoints(folder)][-1] == 3

    run_simulation(configured_server_app(run_config), nodes, num_supernodes=2, backend_name="ray",
                   backend_config=backend)
    sim = Simulation(ExperimentConfig.model_validate(experiment))
    sim.run()
    diff = max_abs_diff(sim.algorithm.params, load_file(out / "global.safetensors"))
    assert diff <= EXACT, f"the restarted simulation-engine run differs from the simulator by {diff:.3g}"
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [(r["sampled"], r["clients"], r["bytes_up"], r["bytes_down"]) for r in rows] == \
        [(h["clients"], h["clients"], h["bytes_up"], h["bytes_down"]) for h in sim.history]
    assert [r["accuracy"] for r in rows] == pytest.approx([h["accuracy"] for h in sim.history])

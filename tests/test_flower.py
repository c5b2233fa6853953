"""The Flower app runs the embedded simulator's algorithm: same numbers, failures tolerated, nodes authenticated.

Fast tests drive the ServerApp and ClientApp in-process (``InProcessGrid``); the deployment tests
start a real SuperLink and SuperNodes as separate processes on 127.0.0.1 over TLS with SuperNode
authentication, and submit the app with ``flwr run``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_helpers import (REPO, FlowerDeployment, InProcessGrid, keep_process_settings,  # noqa: E402,F401
                            metrics, run_in_process, stop_process, tiny_experiment, write_task,
                            write_toml)

from fedpeptao.compare.presets import DEFAULT_PRESETS, PRESETS, preset_config  # noqa: E402
from fedpeptao.config import ConfigError, ExperimentConfig  # noqa: E402
from fedpeptao.core.payload import Message  # noqa: E402
from fedpeptao.experiment import build_federation  # noqa: E402
from fedpeptao.flower import records as R  # noqa: E402
from fedpeptao.flower.node_state import ClientStore  # noqa: E402
from fedpeptao.flower.settings import RUN_CONFIG_DEFAULTS, NodeSettings, ServerSettings  # noqa: E402
from fedpeptao.sim.simulator import Simulation  # noqa: E402

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="process handling uses /proc"),
              pytest.mark.usefixtures("keep_process_settings")]
TOL = 1e-5


def simulate(experiment: dict | ExperimentConfig) -> Simulation:
    cfg = experiment if isinstance(experiment, ExperimentConfig) else ExperimentConfig.model_validate(experiment)
    sim = Simulation(cfg)
    sim.run()
    return sim


def initial_tensors(experiment: dict) -> dict[str, torch.Tensor]:
    return Simulation(ExperimentConfig.model_validate(experiment)).algorithm.params


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        diff = (tensor - actual[name]).abs().max().item()
        assert diff <= TOL, f"{name}: differs from the simulator by {diff:.3g}"


def drift(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    return max((expected[k] - v).abs().max().item() for k, v in actual.items())


class ForgetfulGrid(InProcessGrid):
    """Every node forgets its context.state after each message, as if its SuperNode restarted."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for context in self.contexts.values():
            context.state = RecordDict()
        return replies


def forgetful(grid: InProcessGrid) -> None:
    grid.__class__ = ForgetfulGrid


# -- in-process: the app logic --------------------------------------------------------------------

def test_a_message_and_its_extras_travel_as_records():
    message = Message({"w": torch.arange(3.0)}, {"scaffold.control": {"w": torch.ones(3)},
                                                  "fedpeptao.switch": {"round": torch.tensor(2)}})
    content = RecordDict({**R.message_records(R.UPDATE, message), R.INIT: R.to_record({"w": torch.zeros(3)})})
    back = R.read_message(R.UPDATE, content)
    assert back.model.keys() == {"w"} and torch.equal(back.model["w"], message.model["w"])
    assert back.extras.keys() == message.extras.keys()
    assert torch.equal(back.extras["scaffold.control"]["w"], torch.ones(3))
    assert int(back.extras["fedpeptao.switch"]["round"]) == 2


def test_app_matches_simulator_with_sampling_warmup_and_hessian_ratio(tmp_path):
    """4 clients, 2 per round, FedAvg warm-up, Hessian-estimated ratio, then FedPepTAO: same as the simulator."""
    experiment = tiny_experiment(write_task(tmp_path / "task"),
                                 federated={"num_clients": 4, "clients_per_round": 2, "rounds": 4},
                                 client={"epochs": 2},
                                 method={"ratio": "auto", "warmup_rounds": 2, "lanczos_iters": 8,
                                         "hessian_clients": 2})
    out, grid = run_in_process(tmp_path, experiment)
    sim = simulate(experiment)
    assert_same_tensors(sim.algorithm.params, load_file(out / "global.safetensors"))
    selection, expected = json.loads((out / "summary.json").read_text())["selection"], sim.algorithm.selection
    assert selection["layers"] == expected["layers"] and selection["ranking"] == expected["ranking"]
    assert selection["ratio"] == pytest.approx(expected["ratio"])
    assert not (out / "selection.json").exists()
    rows = metrics(out)
    assert [r["sampled"] for r in rows] == [h["clients"] for h in sim.history]
    assert [r["accuracy"] for r in rows] == pytest.approx([h["accuracy"] for h in sim.history])
    # the warmed-up personal layers travel once, after the switch: counted in bytes_down by both runtimes
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows] == [(h["bytes_up"], h["bytes_down"]) for h in sim.history]
    # the Hessian clients are the last warm-up round's (no draw of their own)
    hessian = sorted(m.metadata.dst_node_id - 1000 for m in grid.sent if m.metadata.group_id == "hessian_ratio")
    assert hessian == rows[1]["sampled"]


def test_method_settings_come_from_the_run_config_overrides(tmp_path):
    """``overrides`` apply on top of the experiment file, as on the command line."""
    task = write_task(tmp_path / "task")
    experiment = tiny_experiment(task, federated={"rounds": 3})
    out, _ = run_in_process(tmp_path, experiment, overrides="method.variant=reference; method.server_lr=0.2")
    cfg = ExperimentConfig.model_validate(tiny_experiment(task, federated={"rounds": 3},
                                                          method={"variant": "reference", "server_lr": 0.2}))
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    assert_same_tensors(simulate(cfg).algorithm.params, load_file(out / "global.safetensors"))


# Every method of the paper's comparison and FedPepTAO on LoRA: own models (PEFT weights,
# instance-dependent prompts, late prompts), client hooks with per-device state (SCAFFOLD's c_k,
# MOON's previous model, FedProx's anchor), server state (FedAdam, FedYogi, FedAdagrad) and
# FedPepTAO's phases on deep prompts and on LoRA's per-layer matrices.
PRESET_CASES = DEFAULT_PRESETS + ["fedpeptao-lora"]


@pytest.mark.parametrize("name", PRESET_CASES)
def test_every_preset_is_selectable_and_matches_the_simulator(tmp_path, name):
    """The Flower run selects the preset through ``overrides``; the simulator's config is the one
    ``fedpeptao compare`` builds (``preset_config``) from the same file."""
    experiment = tiny_experiment(write_task(tmp_path / "task"), federated={"rounds": 2})
    del experiment["method"], experiment["tuning"]  # the defaults: each preset replaces them
    out, _ = run_in_process(tmp_path, experiment, overrides="; ".join(PRESETS[name].overrides()))
    cfg = preset_config(tmp_path / "experiment.toml", name)
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    sim = simulate(cfg)
    assert_same_tensors(sim.algorithm.params, load_file(out / "global.safetensors"))
    summary, expected = json.loads((out / "summary.json").read_text()), sim.summary()
    assert (summary["method"], summary["tuning"]) == (PRESETS[name].method, PRESETS[name].tuning)
    assert summary["algorithm"] == expected["algorithm"] and summary.get("selection") == expected.get("selection")
    rows = metrics(out)
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows] == [(h["bytes_up"], h["bytes_down"]) for h in sim.history]
    assert [r["accuracy"] for r in rows] == pytest.approx([h["accuracy"] for h in sim.history])


def test_scaffold_client_control_variates_survive_a_node_restart(tmp_path):
    """SCAFFOLD's c_k lives on the node: after restarts it comes back from disk. With a fresh optimiser
    each round and every tensor shared, c_k is the only thing a device carries between rounds."""
    experiment = tiny_experiment(write_task(tmp_path / "task"), method={"name": "scaffold"},
                                 federated={"rounds": 3}, client={"reset_optimizer": True})
    out, _ = run_in_process(tmp_path / "with-disk", experiment, forgetful)
    sim = simulate(experiment)
    assert_same_tensors(sim.algorithm.params, load_file(out / "global.safetensors"))
    for k in range(2):
        (folder,) = (tmp_path / "with-disk" / f"state-{k}").glob(f"run-*/client-{k}")
        stored = ClientStore(RecordDict(), folder).load(before=experiment["federated"]["rounds"])
        assert stored.state.algo_state, "the node kept no c_k"
        assert_same_tensors(sim.clients[k].algo_state, stored.state.algo_state)
    # Without the disk copy the restarts lose c_k: the test can fail.
    out, _ = run_in_process(tmp_path / "no-disk", experiment, forgetful, node_extra={"state-dir": "none"})
    assert drift(sim.algorithm.params, load_file(out / "global.safetensors")) > TOL


def test_restarted_node_continues_from_its_disk_state(tmp_path):
    """Every node forgets its context.state after each message (a restart): personal prompts and AdamW
    moments must come back from disk, or the result drifts from the simulator."""
    experiment = tiny_experiment(write_task(tmp_path / "task"), client={"epochs": 2}, federated={"rounds": 3},
                                 method={"ratio": 0.34})
    sim = simulate(experiment)
    out, _ = run_in_process(tmp_path / "with-disk", experiment, forgetful)
    assert_same_tensors(sim.algorithm.params, load_file(out / "global.safetensors"))
    # Without the disk copy the same restarts lose the personal state: the test can fail.
    out, _ = run_in_process(tmp_path / "no-disk", experiment, forgetful, node_extra={"state-dir": "none"})
    assert drift(sim.algorithm.params, load_file(out / "global.safetensors")) > TOL


def test_node_back_under_a_new_id_is_recognised_by_its_client_id(tmp_path):
    """Client 1's SuperNode restarts without node authentication: Flower gives it a new node id and a
    fresh context; the server re-identifies it and it continues from its state on disk."""
    experiment = tiny_experiment(write_task(tmp_path / "task"), client={"epochs": 2}, federated={"rounds": 3})

    def restart_after_first_round(grid):
        original = grid.send_and_receive
        trains = []

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            replies = original(messages, timeout=timeout)
            trains.extend(m for m in messages if m.metadata.message_type == "train")
            if len(trains) == 2 and 1001 in grid.contexts:
                config = grid.contexts.pop(1001).node_config
                grid.contexts[1077] = Context(1, 1077, dict(config), RecordDict(), {})
            return replies
        grid.send_and_receive = send_and_receive

    out, grid = run_in_process(tmp_path, experiment, restart_after_first_round)
    assert_same_tensors(simulate(experiment).algorithm.params, load_file(out / "global.safetensors"))
    last_round = [m.metadata.dst_node_id for m in grid.sent
                  if m.metadata.message_type == "train" and m.metadata.group_id == "3"]
    assert 1077 in last_round and 1001 not in last_round


def test_failed_and_silent_clients_are_left_out(tmp_path):
    experiment = tiny_experiment(write_task(tmp_path / "task"),
                                 federated={"num_clients": 3, "clients_per_round": 3, "rounds": 2})

    def break_two(grid):
        original = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            if any(m.metadata.message_type == "train" for m in messages):
                grid.raising, grid.silent = {1000}, {1001}  # client 0 crashes, client 1 never answers
            return original(messages, timeout=timeout)
        grid.send_and_receive = send_and_receive

    out, grid = run_in_process(tmp_path, experiment, break_two)
    rows = metrics(out)
    assert [r["clients"] for r in rows] == [[2], [2]]
    assert [r["failed"] for r in rows] == [[0, 1], [0, 1]]
    evaluated = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "evaluate"}
    assert evaluated == {1002}, "a client that just failed is not asked to evaluate in the same round"
    initial, final = initial_tensors(experiment), load_file(out / "global.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in final)


def test_round_below_min_replies_leaves_global_unchanged(tmp_path):
    experiment = tiny_experiment(write_task(tmp_path / "task"), federated={"rounds": 2})

    def one_silent(grid):
        original = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            grid.silent = {1001} if any(m.metadata.message_type == "train" for m in messages) else set()
            return original(messages, timeout=timeout)
        grid.send_and_receive = send_and_receive

    out, _ = run_in_process(tmp_path, experiment, one_silent, **{"min-replies": 2})
    assert all(r.get("skipped") for r in metrics(out))
    assert_same_tensors(initial_tensors(experiment), load_file(out / "global.safetensors"))


def test_node_with_another_model_is_refused(tmp_path):
    experiment = tiny_experiment(write_task(tmp_path / "task"),
                                 federated={"num_clients": 3, "clients_per_round": 3, "rounds": 1})

    def odd_node(grid):
        grid.contexts[1002].node_config["model-path"] = "tiny-llama"

    out, _ = run_in_process(tmp_path, experiment, odd_node)
    assert json.loads((out / "summary.json").read_text())["clients"] == [0, 1]
    assert metrics(out)[0]["clients"] == [0, 1]


def test_nodes_with_their_own_data_folders(tmp_path):
    """``data-path``: each node trains on a local task folder instead of a partition of a shared one."""
    folders = [write_task(tmp_path / "node-a", train=24, test=8), write_task(tmp_path / "node-b", train=16, test=6)]
    experiment = tiny_experiment(tmp_path / "not-on-the-server", federated={"rounds": 1})

    def own_data(grid):
        for (node, context), folder, cid in zip(sorted(grid.contexts.items()), folders, (5, 9)):
            context.node_config.clear()
            context.node_config.update({"data-path": str(folder), "client-id": cid, "state-dir": "none"})

    out, _ = run_in_process(tmp_path, experiment, own_data)
    row = metrics(out)[0]
    # each trains on what the experiment's rules take from its own folder (all of it, or all but a held-out share)
    own = {str(cid): len(build_federation(ExperimentConfig.model_validate({**experiment, "data": {"task": str(f)}}),
                                          own_data=True).train_parts[0]) for f, cid in zip(folders, (5, 9))}
    assert row["client_examples"] == own and 20 <= own["5"] <= 24 and 13 <= own["9"] <= 16
    assert row["eval_examples"] == 14 and set(row["client_accuracy"]) == {"5", "9"}


def refused(run_config: dict) -> str:
    """The one-line error a run config is refused with."""
    with pytest.raises(ConfigError) as caught:
        ServerSettings.from_run_config(run_config, run_id=1)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_settings_are_validated(tmp_path):
    cfg = ExperimentConfig.model_validate(tiny_experiment(tmp_path))
    with pytest.raises(ConfigError, match="num-partitions"):
        NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 5}, cfg)
    with pytest.raises(ConfigError, match="client-id"):
        NodeSettings.from_node_config({"data-path": str(tmp_path)}, cfg)
    # run config keys: an unknown one, and the removed 'method' (choose it in overrides)
    assert refused({"roundtimeout": 3}).startswith("run config 'roundtimeout': unknown key")
    assert refused({"method": "scaffold"}).startswith("run config 'method': unknown key")
    # experiment settings in overrides, each refused in one line naming the key
    assert refused({"overrides": "seed=2; federated.rounds=0"}).startswith("federated.rounds: ")
    assert refused({"overrides": "federated.roundz=3"}) == "federated.roundz: unknown key"
    assert refused({"overrides": "method.name=fedprox; method.mu=-1"}).startswith("method.mu: ")
    assert refused({"overrides": "method.name=fedprox; method.tau=0.5"}) == "method.tau: not a setting of fedprox"
    assert refused({"overrides": "method.name=fedsgd"}).startswith("method.name: unknown method 'fedsgd'")
    assert refused({"overrides": "method.ratio=1.5"}).startswith("method.ratio: ")
    assert refused({"overrides": "algorithm=fedavg"}) == "algorithm: moved to method.name"
    assert refused({"overrides": "tuning.name=lora; tuning.num_prompt_tokens=4"}) == \
        "tuning.num_prompt_tokens: not a setting of lora"
    settings = ServerSettings.from_run_config({"overrides": "method.name=scaffold; tuning.name=lora",
                                               "output-dir": str(tmp_path / "out")}, run_id=1)
    assert (settings.experiment.method.name, settings.experiment.tuning.name) == ("scaffold", "lora")
    assert settings.checkpoint_dir == settings.output_dir == tmp_path / "out"
    settings = ServerSettings.from_run_config({"checkpoint-dir": str(tmp_path / "ckpt")}, run_id=4)
    assert settings.checkpoint_dir == tmp_path / "ckpt" and settings.output_dir.name == "flower-4"
    node = NodeSettings.from_node_config({"data-path": str(tmp_path), "client-id": 9, "state-dir": "none"}, cfg)
    assert (node.client_id, node.partition, node.state_dir) == (9, None, None)


def test_flower_app_declares_every_run_config_key():
    app = tomllib.loads((REPO / "flower_app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["config"] == RUN_CONFIG_DEFAULTS
    assert "method" not in app["config"] and "checkpoint-dir" in app["config"]
    assert app["components"] == {"serverapp": "fedpeptao.flower.server_app:app",
                                 "clientapp": "fedpeptao.flower.client_app:app"}


# -- real processes: SuperLink + SuperNodes over TLS with node authentication --------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("scripts/make_certs.sh needs openssl")
    folder = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(folder), "--nodes", "3"], check=True,
                   capture_output=True, env={**os.environ, "PYTHON": sys.executable})
    return folder


def start_federation(root: Path, certs: Path, experiment: dict, **run_config) -> tuple[FlowerDeployment, Path]:
    """SuperLink, two registered SuperNodes (partitions 0 and 1) and the run config file for `flwr run`."""
    deployment = FlowerDeployment(root, certs)
    try:
        deployment.start_superlink()
        deployment.register(certs / "node-1.pub", certs / "node-2.pub")
        for k in (1, 2):
            deployment.start_supernode(f"node-{k}", certs / f"node-{k}",
                                       f"partition-id={k - 1} num-partitions=2 state-dir='{root / f'state-{k}'}'")
    except BaseException:
        deployment.close()
        raise
    config = write_toml(root / "experiment.toml", experiment)
    run_toml = write_toml(root / "run.toml", {"config": str(config), "output-dir": str(root / "out"), **run_config})
    return deployment, run_toml


def test_deployment_over_tls_matches_simulator(tmp_path, certs):
    experiment = tiny_experiment(write_task(tmp_path / "task"), federated={"rounds": 2, "eval_every": 2})
    deployment, run_toml = start_federation(tmp_path, certs, experiment, **{"round-timeout": 120.0})
    with deployment:
        run_id = deployment.run_app(run_toml)
        status = deployment.wait_for_run(run_id, timeout=150, done_file=tmp_path / "out" / "summary.json")
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    out = tmp_path / "out"
    sim = simulate(experiment)
    assert_same_tensors(sim.algorithm.params, load_file(out / "global.safetensors"))
    assert json.loads((out / "summary.json").read_text())["selection"]["layers"] == sim.algorithm.selection["layers"]
    rows = metrics(out)
    assert [r["clients"] for r in rows] == [[0, 1], [0, 1]]
    assert rows[-1]["accuracy"] == pytest.approx(sim.history[-1]["accuracy"])
    # personal state was kept on each node's disk, per run and client
    assert list((tmp_path / "state-2").glob("run-*/client-1/checkpoints/round-*"))


def test_killed_supernode_is_left_out_and_run_completes(tmp_path, certs):
    experiment = tiny_experiment(write_task(tmp_path / "task"), federated={"rounds": 1})
    deployment, run_toml = start_federation(tmp_path, certs, experiment,
                                            **{"round-timeout": 40.0, "min-replies": 1})
    victim = deployment.procs["node-2"]

    def kill_node_two_in_round_one():
        """Kill node 2 once its SuperNode has received its round-1 training message.

        The SuperNode logs each message it receives by type, so this is exact; counting ClientApp
        processes was not (the setup and scoring queries are short enough to be missed by a poll on
        a loaded machine, and the node was then killed before round 1 sampled it).
        """
        if victim.poll() is None and "Receiving: train message" in deployment.log("node-2"):
            stop_process(victim, hard=True)

    with deployment:
        run_id = deployment.run_app(run_toml)
        status = deployment.wait_for_run(run_id, timeout=170, done_file=tmp_path / "out" / "summary.json",
                                         during=kill_node_two_in_round_one)
    assert victim.poll() is not None, "node 2 never received its round-1 training message"
    assert status == "finished:completed", deployment.log("superlink")[-3000:]
    rows = metrics(tmp_path / "out")
    assert [(r["sampled"], r["clients"], r["failed"]) for r in rows] == [([0, 1], [0], [1])]
    assert "accuracy" in rows[0] and list(rows[0]["client_accuracy"]) == ["0"], "the survivor still evaluated"
    assert not list((tmp_path / "state-2").glob("run-*/client-1/checkpoints/round-*")), "node 2 never finished"


def test_supernode_with_unknown_key_is_refused(tmp_path, certs):
    with FlowerDeployment(tmp_path, certs) as deployment:
        deployment.start_superlink()
        deployment.register(certs / "node-1.pub")  # node-3's key is never registered
        known = deployment.start_supernode("known", certs / "node-1", "partition-id=0 num-partitions=2")
        stranger = deployment.start_supernode("stranger", certs / "node-3", "partition-id=1 num-partitions=2")
        try:
            code = stranger.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode with an unregistered key kept running")
        assert code != 0
        assert "Failed to initialize the connection" in deployment.log("stranger")
        deadline, statuses = time.monotonic() + 30, []
        while time.monotonic() < deadline:  # the registered node, started alongside, is let in
            listed = deployment.flwr("supernode", "list", "test", "--format", "json")
            assert listed.returncode == 0, listed.stderr
            statuses = [node["status"] for node in json.loads(listed.stdout)["nodes"]]
            if statuses == ["online"]:
                break
            time.sleep(0.5)
        assert statuses == ["online"], f"expected only the registered node, online; got {statuses}"
        assert known.poll() is None

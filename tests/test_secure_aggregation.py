"""Secure aggregation (``privacy.secure_aggregation``): the server learns only each round's sum.

Under Flower the sum comes from Flower's own SecAgg+ (``fedpeptao.flower.secagg``); the simulator
runs the same arithmetic without the cryptography (``fedpeptao.privacy.secure.sum_of``). Checked:
a secure FedAvg run ends within the quantization bound of the plain run, and nothing the server
side receives (the strategy's replies, the engine's input, the algorithm's step) holds one client's
tensors; a client that drops after the key exchange leaves a round over the others, counted in
the row; distributed DP's noise has the configured std and the epsilon is the library's for the
noise actually present; refused combinations are one line before any work; the two runtimes agree.

The bound (``privacy.secure``): every contributed value carries an unbiased rounding error below
one quantum ``q = 2c / T``, an entry of a sum over ``m`` contributors below ``m q``, so an entry of
the weighted mean change below ``m q (1 + |mean change|) / W`` (``W`` the released weight sum), or
``m q / n`` under DP; the tensors are float32, so one float32 rounding of the value is added.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
import yaml
from dp_accounting.rdp import RdpAccountant
from flwr.app import Error, Message
from flwr.common.secure_aggregation.quantization import quantize as flower_quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.serde import message_to_proto
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_helpers import (InProcessGrid, keep_process_settings, metrics, node_configs,  # noqa: E402,F401
                            run_server_app, secagg_stage, tiny_experiment, write_task)

import fedpeptao.flower.client_app as client_module  # noqa: E402
from fedpeptao.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from fedpeptao.core.aggregation import PopulationUpdate  # noqa: E402
from fedpeptao.engine.rounds import RoundEngine  # noqa: E402
from fedpeptao.flower.client_app import app as client_app  # noqa: E402
from fedpeptao.flower.strategy import FederatedStrategy  # noqa: E402
from fedpeptao.privacy.engine import ClientPrivacy  # noqa: E402
from fedpeptao.privacy.secure import (device_contribution, mean_error_bound, quantize,  # noqa: E402
                                      sum_of)
from fedpeptao.privacy.settings import PrivacySettings, SecAggConfig  # noqa: E402
from fedpeptao.sim.simulator import Simulation  # noqa: E402

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="process handling uses /proc"),
              pytest.mark.usefixtures("keep_process_settings")]

#: weights num_examples / 16 (each client holds about 12 examples): near 1, so the bound is tight
SECURE = {"secure_aggregation": True, "secagg": {"max_examples": 16}}
FEDAVG3 = {"method": {"name": "fedavg"}, "federated": {"num_clients": 3, "clients_per_round": 3, "rounds": 1}}


# -- an in-process grid through Flower's serde, and what the server side receives ------------------

class WireGrid(InProcessGrid):
    """The project's in-process grid, each message and reply through Flower's protobuf serde, every
    reply the server code receives kept in ``received``; a node in ``drop_at`` fails at that SecAgg+
    stage (its ClientApp errors, as a crashed or disconnected node's does), in every round, or only
    the first time with ``once``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, wire=True, **kwargs)
        self.drop_at: dict[int, str] = {}
        self.once = False

    def answer(self, node: int, message: Message) -> Message | None:
        stage = secagg_stage(message)
        if stage is None or self.drop_at.get(node) != stage:
            return super().answer(node, message)
        if self.once:
            del self.drop_at[node]
        return Message(Error(code=0, reason=f"node {node} lost at {stage}"), reply_to=message)


def write_yaml(path: Path, experiment: dict) -> Path:
    """The experiment file (YAML: ``privacy.secagg`` is a table inside a table)."""
    path.write_text(yaml.safe_dump(experiment))
    return path


def run_flower(root: Path, experiment: dict, drop_at: dict[int, str] | None = None, once: bool = False
               ) -> tuple[Path, WireGrid]:
    root.mkdir(parents=True, exist_ok=True)
    config = write_yaml(root / "experiment.yaml", experiment)
    grid = WireGrid(client_app, node_configs(root, experiment["federated"]["num_clients"]))
    grid.drop_at, grid.once = dict(drop_at or {}), once
    return run_server_app(grid, config, root / "out"), grid


@pytest.fixture
def observed(monkeypatch):
    """What each device contributed (recorded on the device) and what the server side received: the
    strategy's train replies, the engine's input, the algorithm's step."""
    seen: dict[str, list] = {"contributions": [], "strategy_replies": [], "plain_replies": [], "sums": [],
                             "steps": []}
    real_contribution = client_module.device_contribution

    def contribution(*args, **kwargs):
        given = real_contribution(*args, **kwargs)
        seen["contributions"].append(given)
        return given

    monkeypatch.setattr(client_module, "device_contribution", contribution)
    real_aggregate_train = FederatedStrategy.aggregate_train

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        seen["strategy_replies"].extend(replies)
        return real_aggregate_train(self, server_round, replies)

    monkeypatch.setattr(FederatedStrategy, "aggregate_train", aggregate_train)
    real_training = RoundEngine.receive_training

    def receive_training(self, replies):
        seen["plain_replies"].extend(replies)
        return real_training(self, replies)

    monkeypatch.setattr(RoundEngine, "receive_training", receive_training)
    real_secure = RoundEngine.receive_secure

    def receive_secure(self, summed, halted=""):
        seen["sums"].append(summed)
        algo = self.algorithm
        inner = algo.aggregate

        def aggregate(t, sampled, updates):
            seen["steps"].append(updates)
            return inner(t, sampled, updates)

        algo.aggregate = aggregate
        try:
            return real_secure(self, summed, halted)
        finally:
            del algo.aggregate

    monkeypatch.setattr(RoundEngine, "receive_secure", receive_secure)
    return seen


def assert_server_held_no_update(seen: dict, grid: WireGrid) -> None:
    """Nothing the server side received holds one client's contributed tensors."""
    assert seen["contributions"] and seen["sums"]
    assert seen["plain_replies"] == [] and seen["strategy_replies"] == []  # no train reply reached the strategy
    assert seen["steps"] and all(isinstance(u, PopulationUpdate) for u in seen["steps"])
    secrets = np.concatenate([np.concatenate([a.reshape(-1) for a in c.arrays.values()] + [[c.weight]])
                              for c in seen["contributions"]])
    patterns = {v.tobytes() for v in secrets.astype(np.float64) if v != 0}
    stages = 0
    for reply in grid.received:
        if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
            continue
        stages += 1
        # secaggplus_mod cleared every array of the train handler's reply; only masked integers travel
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        wire = message_to_proto(reply).SerializeToString()
        assert not any(pattern in wire for pattern in patterns)
    assert stages > 0
    # the sums the engine received are sums, not one client's arrays
    for summed in seen["sums"]:
        for c in seen["contributions"]:
            for name, value in c.arrays.items():
                if name in summed.arrays and np.abs(value).max() > 0:
                    assert not np.allclose(summed.arrays[name], value, atol=1e-6)


def secagg_bound(sim: Simulation, contributors: int) -> float:
    return sim.cfg.privacy.secagg.error_bound(contributors)


def simulate(experiment: dict) -> Simulation:
    sim = Simulation(ExperimentConfig.model_validate(experiment))
    sim.run()
    return sim


def within_bound(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                 secagg: SecAggConfig, contributors: int, weight_sum: float, factor: float = 1.0) -> float:
    """The largest |actual - expected| relative to the bound (<= 1: within it), per entry: the mean's
    quantization bound times ``factor`` plus one float32 rounding of the value."""
    worst = 0.0
    for name, value in expected.items():
        change = (value.double() - initial[name].double()).abs()
        bound = factor * mean_error_bound(secagg, contributors, weight_sum, 0.0) * (1 + change)
        bound = bound + 2 * torch.finfo(torch.float32).eps * value.double().abs() + 1e-12
        worst = max(worst, float(((actual[name].double() - value.double()).abs() / bound).max()))
    return worst


# -- (a) a secure FedAvg run equals the plain one within the bound; the server holds no update -----

def test_secure_fedavg_under_flower_equals_the_plain_run_within_the_quantization_bound(tmp_path, observed):
    task = write_task(tmp_path / "task")
    plain = tiny_experiment(task, **FEDAVG3)
    secure = tiny_experiment(task, **FEDAVG3, privacy=SECURE)
    plain_out, _ = run_flower(tmp_path / "plain", plain)
    observed["plain_replies"].clear()
    observed["strategy_replies"].clear()  # the plain run's, by design
    secure_out, grid = run_flower(tmp_path / "secure", secure)
    initial = Simulation(ExperimentConfig.model_validate(plain)).algorithm.params
    expected, actual = load_file(plain_out / "global.safetensors"), load_file(secure_out / "global.safetensors")
    (summed,) = observed["sums"]
    assert summed.contributors == [0, 1, 2] and summed.dropped == []
    secagg = ExperimentConfig.model_validate(secure).privacy.secagg
    assert within_bound(expected, actual, initial, secagg, 3, summed.weight_sum) <= 1.0
    assert max(float((expected[n] - actual[n]).abs().max()) for n in expected) > 0  # it was quantized
    # the weight sum is the clients' examples / max_examples, within 3 quanta
    examples = metrics(plain_out)[0]["client_examples"]
    assert summed.weight_sum == pytest.approx(sum(examples.values()) / 16, abs=3 * secagg.quantum)
    assert_server_held_no_update(observed, grid)
    (row,) = metrics(secure_out)
    assert row["contributors"] == 3 and row["dropped"] == 0 and "client_examples" not in row  # sizes stay private
    assert row["bytes_up"] == 3 * 8 * (sum(t.numel() for t in initial.values()) + 2)  # int64 masked vectors
    summary = json.loads((secure_out / "summary.json").read_text())["secure_aggregation"]
    assert summary["contributions"] == 3 and summary["quantum"] == pytest.approx(secagg.quantum)
    assert summary["protocol"].startswith("SecAgg+ (Flower")


def test_secure_scaffold_sums_its_control_variate_deltas_in_the_masked_vector(tmp_path, observed):
    """SCAFFOLD's step needs the weighted mean and the sum of the clients' ``dc_k``: both travel in
    one masked vector, so a secure run matches the plain one within the bound (global tensors and
    the server's control variate c), and under Flower no reply holds one client's ``dc_k``."""
    task = write_task(tmp_path / "task")
    scaffold3 = {**FEDAVG3, "method": {"name": "scaffold"}}
    plain = simulate(tiny_experiment(task, **scaffold3))
    observed["plain_replies"].clear()  # the plain run's, by design
    experiment = tiny_experiment(task, **scaffold3, privacy=SECURE)
    secure = simulate(experiment)
    (summed,) = observed["sums"]
    assert list(summed.extras()) == ["scaffold.delta_control"] and summed.contributors == [0, 1, 2]
    secagg = secure.cfg.privacy.secagg
    assert within_bound(plain.algorithm.params, secure.algorithm.params, secure.fed.initial, secagg, 3,
                        summed.weight_sum) <= 1.0
    # c = sum_k dc_k / N: an entry's error below m q / N, plus one float32 rounding
    for name, c in plain.algorithm.control.items():
        bound = secagg.error_bound(3) / 3 + 2 * torch.finfo(torch.float32).eps * c.double().abs() + 1e-12
        assert float(((secure.algorithm.control[name].double() - c.double()).abs() / bound).max()) <= 1.0
    assert any(float(c.abs().max()) > 0 for c in plain.algorithm.control.values())  # c moved: a real check
    (row,) = secure.history
    assert row["bytes_up"] == 3 * 8 * (2 * sum(t.numel() for t in secure.fed.initial.values()) + 2)  # x and dc_k
    observed["sums"].clear()
    out, grid = run_flower(tmp_path / "flower", experiment)
    assert_server_held_no_update(observed, grid)
    assert within_bound(secure.algorithm.params, load_file(out / "global.safetensors"), secure.fed.initial, secagg, 3,
                        summed.weight_sum - 3 * secagg.quantum, factor=2.0) <= 1.0


def test_secure_fedavg_on_flowers_simulation_engine(tmp_path, observed):
    """The same on 2 virtual SuperNodes of Flower's simulation engine (Ray): within the bound of the
    plain simulator run, and the strategy and engine received only the sum."""
    from flower_helpers import run_with_simulation_engine  # noqa: PLC0415

    task = write_task(tmp_path / "task")
    fedavg2 = {"method": {"name": "fedavg"}, "federated": {"num_clients": 2, "clients_per_round": 2, "rounds": 1}}
    secure = tiny_experiment(task, **fedavg2, privacy={"secure_aggregation": True})  # flat: the helper writes TOML
    out = run_with_simulation_engine(tmp_path, secure)
    (summed,) = observed["sums"]
    assert summed.contributors == [0, 1]
    assert observed["plain_replies"] == [] and observed["strategy_replies"] == []
    assert len(observed["steps"]) == 1 and isinstance(observed["steps"][0], PopulationUpdate)
    assert metrics(out)[0]["contributors"] == 2
    plain = simulate(tiny_experiment(task, **fedavg2))
    secagg = ExperimentConfig.model_validate(secure).privacy.secagg
    assert within_bound(plain.algorithm.params, load_file(out / "global.safetensors"), plain.fed.initial, secagg, 2,
                        summed.weight_sum) <= 1.0


# -- (b) a client that drops after the key exchange ------------------------------------------------

def test_a_client_dropping_after_the_key_exchange_leaves_a_round_over_the_others(tmp_path, observed):
    task = write_task(tmp_path / "task")
    experiment = tiny_experiment(task, **{**FEDAVG3, "federated": {**FEDAVG3["federated"], "rounds": 2}},
                                 privacy=SECURE)
    # client 1 (node 1001) is lost in round 1's 'collect masked vectors' stage, after sharing its keys
    drop = {1001: Stage.COLLECT_MASKED_VECTORS}
    out, grid = run_flower(tmp_path / "flower", experiment, drop)
    rows = metrics(out)
    assert [r["contributors"] for r in rows] == [2, 2] and [r["dropped"] for r in rows] == [1, 1]
    assert rows[0]["clients"] == [0, 2] and rows[0]["failed"] == [1] and not rows[0].get("skipped")
    first = observed["sums"][0]
    assert first.contributors == [0, 2] and first.dropped == [1]
    # the round's mean is the two survivors' (their contributions, recorded on the devices), within the bound
    survivors = observed["contributions"][:2]  # round 1's (client 1 never got to contribute)
    assert [c.client_id for c in survivors] == [0, 2]
    secagg = ExperimentConfig.model_validate(experiment).privacy.secagg
    weight = sum(c.weight for c in survivors)
    for name, value in first.arrays.items():
        exact = sum(c.arrays[name] for c in survivors)
        assert np.abs(value - exact).max() <= secagg.error_bound(2)
    assert abs(first.weight_sum - weight) <= secagg.error_bound(2)
    assert isinstance(observed["steps"][0], PopulationUpdate) and observed["steps"][0].num_clients == 2
    # the node that failed (in both rounds) is not asked to evaluate in the same round
    evaluated = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "evaluate"}
    assert evaluated == {1000, 1002}
    summary = json.loads((out / "summary.json").read_text())["secure_aggregation"]
    assert summary["contributions"] == 4 and summary["dropped"] == 2


def test_too_few_survivors_skip_the_round_as_no_replies_would(tmp_path, observed):
    task = write_task(tmp_path / "task")
    experiment = tiny_experiment(task, **FEDAVG3, privacy=SECURE)
    drop = {1000: Stage.COLLECT_MASKED_VECTORS, 1002: Stage.COLLECT_MASKED_VECTORS}  # threshold 2 of 3
    out, _ = run_flower(tmp_path / "flower", experiment, drop)
    (row,) = metrics(out)
    assert row["skipped"] and row["contributors"] == 0 and row["dropped"] == 3
    assert observed["sums"] == [None] and observed["steps"] == []
    initial = Simulation(ExperimentConfig.model_validate(experiment)).algorithm.params
    final = load_file(out / "global.safetensors")
    assert all(torch.equal(initial[n], final[n]) for n in initial)


# -- (c) distributed DP: the noise and its epsilon ----------------------------------------------------

def test_quantize_is_flowers_for_the_same_random_numbers():
    values = np.random.default_rng(0).uniform(-3, 3, 10_000)
    np.random.seed(11)
    (theirs,) = flower_quantize([values], 4.0, 2 ** 20)
    ours = quantize(values, 4.0, 2 ** 20, np.random.RandomState(11))
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.parametrize("survivors", [5, 3])
def test_distributed_noise_in_the_sum_has_the_configured_std(survivors):
    """Zero updates: the secure sum of ``m`` of ``n = 5`` devices' shares is ``N(0, (z C)^2 m / n)``
    per entry (``z C`` when all survive); each device's share is its own seeded draw."""
    z, clip_norm, n, size = 1.3, 0.5, 5, 100_000
    settings = PrivacySettings(mode="distributed", secure_aggregation=True, clip_norm=clip_norm,
                               noise_multiplier=z, secagg=SecAggConfig(clipping_range=16.0))
    privacy = ClientPrivacy(settings, num_clients=50, per_round=n, seed=3, noise_multiplier=z)
    zero = {"x": torch.zeros(size, dtype=torch.float32)}
    given = [device_contribution(settings, privacy, k, 0, zero, zero, num_examples=10, num_steps=1, loss=0.0)
             for k in range(survivors)]
    shares = np.stack([c.arrays["x"] for c in given])
    assert np.std(shares, axis=1) == pytest.approx([z * clip_norm / math.sqrt(n)] * survivors, rel=0.02)
    assert abs(np.corrcoef(shares[0], shares[1])[0, 1]) < 0.02  # independent draws
    summed = sum_of(given, settings.secagg, np.random.default_rng(0))
    assert summed.weight_sum == pytest.approx(survivors, abs=survivors * settings.secagg.quantum)
    assert float(np.std(summed.arrays["x"])) == pytest.approx(z * clip_norm * math.sqrt(survivors / n), rel=0.02)
    assert abs(float(np.mean(summed.arrays["x"]))) < 0.02 * z * clip_norm
    # the engine's mean: the sum over the expected count, the ledger at the noise actually present
    update = privacy.aggregate_sum(0, {"x": torch.from_numpy(summed.arrays["x"])}, survivors, zero, 50, n, 1)
    assert float(update.params["x"].std()) == pytest.approx(z * clip_norm * math.sqrt(survivors / n) / n, rel=0.02)
    assert privacy.accountant.events == [("round", 50, n, pytest.approx(z * math.sqrt(survivors / n)))]


def library_epsilon(events: list[tuple[int, int, float]], delta: float) -> float:
    """Straight from dp-accounting: sampled Gaussian rounds (replace-one, sensitivity 2C)."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for population, sample, z in events:
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            population, sample, dp_accounting.GaussianDpEvent(z / 2)))
    return accountant.get_epsilon(delta)


def test_distributed_dp_under_flower_accounts_the_noise_actually_present(tmp_path, observed):
    """4 clients, 3 per round, z = 1.1: round 1 loses one device after the key exchange, so its sum
    carries z C sqrt(2/3); the run's epsilon is dp-accounting's for exactly that."""
    task = write_task(tmp_path / "task")
    z = 1.1
    privacy = {**SECURE, "mode": "distributed", "clip_norm": 0.1, "noise_multiplier": z}
    experiment = tiny_experiment(task, method={"name": "fedavg"}, privacy=privacy,
                                 federated={"num_clients": 4, "clients_per_round": 3, "rounds": 2})
    sampled_first = Simulation(ExperimentConfig.model_validate(experiment)).engine.sample(range(4))
    out, _ = run_flower(tmp_path / "flower", experiment, {1000 + sampled_first[0]: Stage.COLLECT_MASKED_VECTORS},
                        once=True)
    rows = metrics(out)
    assert [r["contributors"] for r in rows] == [2, 3]
    expected = [library_epsilon([(4, 3, z * math.sqrt(2 / 3))], 0.025),
                library_epsilon([(4, 3, z * math.sqrt(2 / 3)), (4, 3, z)], 0.025)]
    assert [r["epsilon"] for r in rows] == pytest.approx(expected, rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(expected[-1], rel=1e-9)
    assert summary["secure_aggregation"]["dp_noise"].startswith("each device")
    # every device clipped its change and added a share: uniform weights, values within C + noise
    assert {c.weight for c in observed["contributions"]} == {1.0}
    assert all(isinstance(u, PopulationUpdate) and u.num_clients == 3 for u in observed["steps"])


# -- (d) refused combinations --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (["method.name=fedavg", "server.aggregation=median"], "server.aggregation"),
    (["method.name=fedavg", "server.aggregation=trimmed_mean"], "server.aggregation"),
    (["method.name=scaffold", "privacy.mode=central", "privacy.noise_multiplier=1"], "privacy.mode"),
    (["method.name=fedavg", "server.max_update_norm=1.0"], "server.max_update_norm"),
    (["method.name=fedavg", "federated.clients_per_round=1"], "federated.clients_per_round"),
    (["method.name=fedavg", "federated.clients_per_round=20", "privacy.secagg.quantization_range=1073741824",
      "privacy.secagg.modulus_range=17179869184"], "privacy.secagg.modulus_range"),
    (["method.name=fedavg", "privacy.secagg.modulus_range=1000"], "privacy.secagg.modulus_range"),
    (["method.name=fedavg", "privacy.secagg.quantization_range=4294967296"], "privacy.secagg.quantization_range"),
    (["method.name=fedavg", "privacy.secagg.reconstruction_threshold=1.5"], "privacy.secagg.reconstruction_threshold"),
    (["method.name=fedavg", "privacy.secagg.num_shares=12"], "privacy.secagg.num_shares"),
    (["method.name=fedavg", "privacy.secagg.clipping_range=0"], "privacy.secagg.clipping_range"),
    (["method.name=fedavg", "privacy.mode=central", "privacy.clip_norm=adaptive", "privacy.noise_multiplier=1"],
     "privacy.clip_norm"),
    (["method.name=fedavg", "privacy.mode=distributed", "privacy.noise_multiplier=1", "privacy.clip_norm=2",
      "privacy.secagg.clipping_range=4"], "privacy.secagg.clipping_range"),
    (["privacy.mode=distributed", "privacy.noise_multiplier=1"], "privacy.selection"),
    (["method.name=fedavg", "privacy.secure_aggregation=false", "privacy.mode=distributed",
      "privacy.noise_multiplier=1"], "privacy.secure_aggregation"),
])
def test_refused_combinations_are_one_line_naming_the_key(overrides, key):
    base = ["federated.num_clients=20", "federated.clients_per_round=10", "privacy.secure_aggregation=true"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message, message


def test_an_algorithm_that_needs_individual_updates_is_refused_in_one_line(monkeypatch):
    """The protocol's hook: an algorithm states why it cannot run on a sum, and the config refuses it."""
    from fedpeptao.algorithms.fedavg import FedAvgSettings  # noqa: PLC0415

    monkeypatch.setattr(FedAvgSettings, "secure_aggregation_refusal", "fedavg reads every update here", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federated.num_clients=20", "federated.clients_per_round=10",
                           "privacy.secure_aggregation=true", "method.name=fedavg"])
    assert str(err.value) == "privacy.secure_aggregation: fedavg reads every update here"


def test_a_refused_combination_stops_the_server_app_before_any_message(tmp_path):
    task = write_task(tmp_path / "task")
    experiment = tiny_experiment(task, method={"name": "fedavg"}, server={"aggregation": "median"}, privacy=SECURE)
    config = write_yaml(tmp_path / "experiment.yaml", experiment)
    grid = WireGrid(client_app, node_configs(tmp_path, 2))
    run_server_app(grid, config, tmp_path / "out")
    assert grid.sent == [] and not (tmp_path / "out").exists()


# -- (e) the simulator and Flower agree within the bound ----------------------------------------------

def test_the_simulator_and_flower_agree_within_the_bound(tmp_path, observed):
    task = write_task(tmp_path / "task")
    experiment = tiny_experiment(task, **FEDAVG3, privacy=SECURE)
    out, _ = run_flower(tmp_path / "flower", experiment)
    sim = simulate(experiment)
    summed, sim_summed = observed["sums"]  # Flower's engine, then the simulator's: sums only, both
    assert observed["plain_replies"] == [] and sim_summed.contributors == summed.contributors
    assert sim_summed.weight_sum == pytest.approx(summed.weight_sum, abs=2 * secagg_bound(sim, 3))
    secagg = sim.cfg.privacy.secagg
    # each within the bound of the exact mean, so within twice the bound of each other
    assert within_bound(sim.algorithm.params, load_file(out / "global.safetensors"), sim.fed.initial, secagg, 3,
                        summed.weight_sum - 3 * secagg.quantum, factor=2.0) <= 1.0
    (row,), (sim_row,) = metrics(out), sim.history
    for key in ("sampled", "clients", "failed", "contributors", "dropped", "bytes_up", "bytes_down"):
        assert row[key] == sim_row[key], key
    assert row["train_loss"] == pytest.approx(sim_row["train_loss"], rel=1e-6)
    assert sim.summary()["secure_aggregation"]["contributions"] == 3


def test_fedpeptao_runs_in_its_population_form_alike_in_both_runtimes(tmp_path, observed):
    """FedPepTAO (warm-up, layer selection, then its step on the population's mean): both runtimes
    end within a small distance of each other after 3 rounds, and say which form ran."""
    task = write_task(tmp_path / "task")
    experiment = tiny_experiment(task, privacy=SECURE, method={"name": "fedpeptao", "ratio": 0.5, "warmup_rounds": 1},
                                 federated={"num_clients": 3, "clients_per_round": 3, "rounds": 3})
    out, _ = run_flower(tmp_path / "flower", experiment)
    sim = simulate(experiment)
    flower = load_file(out / "global.safetensors")
    assert max(float((flower[n] - t).abs().max()) for n, t in sim.algorithm.params.items()) < 1e-6
    # both engines' steps (3 rounds each) received the population's mean only
    assert all(isinstance(u, PopulationUpdate) for u in observed["steps"]) and len(observed["steps"]) == 6
    assert observed["plain_replies"] == [] and observed["strategy_replies"] == []
    assert json.loads((out / "summary.json").read_text())["secure_aggregation"]["fedpeptao_form"] == "population"
    assert sim.summary()["secure_aggregation"]["fedpeptao_form"] == "population"
    assert [r["contributors"] for r in metrics(out)] == [h["contributors"] for h in sim.history] == [3, 3, 3]


@pytest.mark.parametrize("mode", ["central", "distributed", "local"])
def test_the_runtimes_agree_under_dp_with_secure_aggregation(tmp_path, observed, mode):
    """The devices clip (and noise, by their seeded streams), the sum is secure, the noise of
    ``central`` is the server's on the sum: both runtimes within ``2 m q / n`` (plus float32) and the
    same epsilon each round."""
    task = write_task(tmp_path / "task")
    privacy = {**SECURE, "mode": mode, "clip_norm": 0.05, "noise_multiplier": 0.8}
    if mode == "local":
        privacy["secagg"] = {"clipping_range": 1.0}  # c >= C (1 + 6 z): the locally noised values fit
    experiment = tiny_experiment(task, method={"name": "fedavg"}, privacy=privacy,
                                 federated={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    out, _ = run_flower(tmp_path / "flower", experiment)
    sim = simulate(experiment)
    secagg = sim.cfg.privacy.secagg
    flower = load_file(out / "global.safetensors")
    for name, tensor in sim.algorithm.params.items():
        bound = 2 * 2 * mean_error_bound(secagg, 3, expected=3) + 4 * torch.finfo(torch.float32).eps * tensor.abs()
        assert bool(((flower[name] - tensor).abs() <= bound + 1e-12).all()), name
    rows = metrics(out)
    assert [r["epsilon"] for r in rows] == pytest.approx([h["epsilon"] for h in sim.history], rel=1e-12)
    assert [r["contributors"] for r in rows] == [h["contributors"] for h in sim.history] == [3, 3]
    assert all(isinstance(u, PopulationUpdate) for u in observed["steps"]) and observed["plain_replies"] == []


def test_in_the_simulator_a_refused_contribution_leaves_the_round(tmp_path):
    """A device whose weighted change falls outside the clipping range leaves (as a Flower node whose
    contribution raises); below the reconstruction threshold nothing is revealed and the round is
    skipped with the global tensors unchanged."""
    task = write_task(tmp_path / "task")
    sim = Simulation(ExperimentConfig.model_validate(tiny_experiment(
        task, **FEDAVG3, privacy={"secure_aggregation": True, "secagg": {"clipping_range": 1e-4}})))
    initial = dict(sim.algorithm.params)
    sim.run()
    (row,) = sim.history
    assert row["skipped"] and row["contributors"] == 0 and row["dropped"] == 3 and row["failed"] == [0, 1, 2]
    assert all(torch.equal(initial[n], t) for n, t in sim.algorithm.params.items())
    assert sim.summary()["secure_aggregation"]["skipped_rounds"] == [1]


def test_distributed_dp_stops_before_a_round_whose_worst_case_would_pass_the_target():
    """The stop check assumes only the reconstruction threshold's shares survive (t = 2 of n = 3):
    the noise multiplier z sqrt(2/3)."""
    from fedpeptao.privacy.accountant import epsilon_of  # noqa: PLC0415

    z, n = 1.0, 3
    full = epsilon_of([("round", 10, n, z)], 1e-3)
    worst = epsilon_of([("round", 10, n, z * math.sqrt(2 / 3))], 1e-3)
    assert worst > full
    target = (full + worst) / 2  # a full round fits, the worst case does not
    settings = PrivacySettings(mode="distributed", secure_aggregation=True, noise_multiplier=z, delta=1e-3)
    privacy = ClientPrivacy(settings, num_clients=10, per_round=n, seed=0, noise_multiplier=z)
    assert privacy.stop_reason(0) is None  # no target: no stop
    settings = settings.model_copy(update={"noise_multiplier": None, "target_epsilon": target})
    privacy = ClientPrivacy(settings, num_clients=10, per_round=n, seed=0, noise_multiplier=z)
    assert privacy.would_exceed(10, n) == pytest.approx(worst)
    assert privacy.stop_reason(0) is not None

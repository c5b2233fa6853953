"""Client-level differential privacy: the mechanism, the accountant, the settings, both runtimes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from safetensors.torch import load_file

from fedpeptao.config import ConfigError, load_config
from fedpeptao.core.aggregation import ClientUpdate, PopulationUpdate
from fedpeptao.core.payload import Message
from fedpeptao.privacy.accountant import epsilon_of
from fedpeptao.privacy.engine import ClientPrivacy
from fedpeptao.privacy.mechanism import clip, gaussian_noise, l2_norm
from fedpeptao.privacy.settings import PrivacySettings
from fedpeptao.report.writer import write_report
from fedpeptao.sim.simulator import Simulation, resume_experiment, run_experiment

sys.path.insert(0, str(Path(__file__).parent))
from flower_helpers import keep_process_settings, run_in_process, tiny_experiment, write_task  # noqa: E402, F401


def tiny(task_dir: Path, *extra: str):
    return load_config(None, ["model.name=tiny-bert", f"data.task={task_dir}", "tuning.num_prompt_tokens=3",
                              "model.max_length=24", "federated.num_clients=4", "federated.clients_per_round=2",
                              "federated.rounds=3", "progress=false", "client.epochs=1", "federated.eval_every=1",
                              *extra])


DP = ["privacy.mode=central", "privacy.clip_norm=0.1", "privacy.noise_multiplier=1.0"]


def library_epsilon(population: int, sample: int, z: float, rounds: int, releases: int, delta: float) -> float:
    """The same run's epsilon computed straight from dp-accounting (replace-one, sensitivity 2C)."""
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(population, sample,
                                                               dp_accounting.GaussianDpEvent(z / 2)), rounds)
    if releases:
        acc.compose(dp_accounting.GaussianDpEvent(z / 2), releases)
    return acc.get_epsilon(delta)


def updates_around(reference: dict[str, torch.Tensor], scales: list[float], seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(k, {n: t + s * torch.randn(t.shape, generator=g) for n, t in reference.items()}, 10 + k, 3)
            for k, s in enumerate(scales)]


REF = {"a": torch.zeros(40, 5), "b": torch.ones(7)}


# -- the mechanism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-3, 0.05, 3.0])
def test_a_clipped_update_is_within_the_clip_norm(scale):
    delta = {n: scale * torch.randn(t.shape) for n, t in REF.items()}
    clipped, norm = clip(delta, 0.1)
    assert l2_norm(clipped) <= 0.1 + 1e-6
    assert norm == pytest.approx(l2_norm(delta))
    if norm <= 0.1:  # a small update passes unchanged
        assert all(torch.equal(clipped[n], delta[n]) for n in delta)


def test_without_noise_central_dp_is_the_mean_of_clipped_updates():
    settings = PrivacySettings(mode="central", clip_norm=0.5, noise_multiplier=0.0)
    privacy = ClientPrivacy(settings, num_clients=10, per_round=3, seed=0, noise_multiplier=0.0)
    updates = updates_around(REF, [0.01, 0.2, 5.0])
    result = privacy.aggregate(0, updates, REF, population=10, sample=3)
    for name, ref in REF.items():
        clipped = [clip({n: u.params[n] - REF[n] for n in REF}, 0.5)[0][name] for u in updates]
        assert torch.allclose(result.params[name], ref + sum(clipped) / 3, atol=1e-6)
    assert isinstance(result, PopulationUpdate)  # the population's mean, no client's update
    assert result.num_clients == 3 and result.num_steps == 3


def test_the_noise_has_the_configured_standard_deviation():
    noise = gaussian_noise({"x": torch.zeros(200_000)}, 0.7, seed=3)["x"]
    assert float(noise.std()) == pytest.approx(0.7, rel=0.01) and abs(float(noise.mean())) < 0.01
    assert torch.equal(noise, gaussian_noise({"x": torch.zeros(200_000)}, 0.7, seed=3)["x"])  # seeded
    # central DP: a round's mean change is N(0, (z C / m)^2) when every client sent nothing new
    settings = PrivacySettings(mode="central", clip_norm=0.2, noise_multiplier=1.5)
    privacy = ClientPrivacy(settings, num_clients=50, per_round=4, seed=1, noise_multiplier=1.5)
    zero = {"x": torch.zeros(100_000)}
    out = privacy.aggregate(0, [ClientUpdate(k, {"x": torch.zeros(100_000)}, 5, 1) for k in range(4)], zero, 50, 4)
    assert float(out.params["x"].std()) == pytest.approx(1.5 * 0.2 / 4, rel=0.02)


def test_local_dp_noises_on_the_device_and_the_server_only_averages():
    settings = PrivacySettings(mode="local", clip_norm=0.1, noise_multiplier=0.0, selection="public",
                               public_data="x")
    privacy = ClientPrivacy(settings, num_clients=4, per_round=2, seed=0, noise_multiplier=0.0)
    (update,) = updates_around(REF, [2.0])
    reply = Message(update.params, {"algorithm.own": {"c": torch.ones(2)}})
    sent = privacy.device_reply(reply, REF, client_id=0, round_index=0)
    assert l2_norm({n: sent.model[n] - REF[n] for n in REF}) == pytest.approx(0.1, rel=1e-5)
    assert sent.extras == reply.extras  # only the model tensors are privatised
    noisy = ClientPrivacy(settings.model_copy(update={"noise_multiplier": 2.0}), 4, 2, 0, 2.0)
    a = noisy.device_reply(reply, REF, 0, 0).model
    assert not torch.allclose(a["a"], sent.model["a"])
    assert torch.equal(a["a"], noisy.device_reply(reply, REF, 0, 0).model["a"])
    assert not torch.equal(a["a"], noisy.device_reply(reply, REF, 1, 0).model["a"])  # each device its own noise


def test_adaptive_clipping_follows_the_target_quantile():
    settings = PrivacySettings(mode="central", clip_norm="adaptive", noise_multiplier=0.0, initial_clip_norm=1.0,
                               target_quantile=0.5, clipped_count_stddev=1e-9)
    privacy = ClientPrivacy(settings, num_clients=20, per_round=10, seed=0, noise_multiplier=0.0)
    small = updates_around(REF, [1e-4] * 10)  # every norm far below the clip: it must shrink
    for t in range(5):
        privacy.aggregate(t, small, REF, 20, 10)
    assert privacy.clip_norm == pytest.approx(math.exp(-0.2 * 0.5 * 5), rel=1e-6)


# -- the accountant ----------------------------------------------------------------------------------
@pytest.mark.parametrize("population,sample,z,rounds", [(100, 10, 1.0, 20), (20, 5, 0.8, 3), (1000, 40, 2.0, 50)])
def test_epsilon_equals_the_library_accountant(population, sample, z, rounds):
    ours = epsilon_of([("round", population, sample, z)] * rounds, 1e-5)
    assert ours == pytest.approx(library_epsilon(population, sample, z, rounds, 0, 1e-5), rel=1e-9)


def test_target_epsilon_is_met_by_the_solved_noise(task_dir):
    cfg = tiny(task_dir, "method.name=fedavg", "privacy.mode=central", "privacy.target_epsilon=5",
               "privacy.delta=1e-3")
    z = cfg.noise_multiplier()
    assert 0 < z < 100
    spent = library_epsilon(4, 2, z, 3, 0, 1e-3)
    assert spent <= 5.0 and spent > 4.9  # the smallest noise that fits, not a loose one


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key", [
    (["privacy.clip_norm=-1"], "privacy.clip_norm"),
    (["privacy.mode=central", "privacy.clip_norm=0", "privacy.noise_multiplier=1"], "privacy.clip_norm"),
    (["privacy.mode=central", "privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.target_epsilon=3"], "privacy.target_epsilon"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.delta=1.5"], "privacy.delta"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.delta=0"], "privacy.delta"),
    (["privacy.mode=central", "privacy.target_epsilon=1e-4"], "privacy.target_epsilon"),
    (["privacy.mode=central"], "privacy.noise_multiplier"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "method.name=scaffold"], "privacy.mode"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "method.name=fedavg", "server.aggregation=median"],
     "server.aggregation"),
    (["privacy.mode=local", "privacy.noise_multiplier=1"], "privacy.selection"),
    (["privacy.mode=local", "privacy.noise_multiplier=1", "privacy.clip_norm=adaptive", "method.name=fedavg"],
     "privacy.clip_norm"),
])
def test_bad_privacy_settings_are_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message


# -- runs -------------------------------------------------------------------------------------------
def test_a_private_fedpeptao_run_reports_epsilon_every_round(task_dir, tmp_path):
    cfg = tiny(task_dir, "method.warmup_rounds=1", "method.lanczos_iters=5", f"output_dir={tmp_path}",
               "run_name=dp", *DP)
    sim, run_dir = run_experiment(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows]
    assert len(eps) == 3 and all(b > a > 0 for a, b in zip(eps, eps[1:]))
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == pytest.approx(eps[-1]) and summary["delta"] == pytest.approx(0.1 / 4)
    # scores and the Hessian ratio were released privately and are in the budget
    assert summary["selection_releases"] == 2
    assert eps[-1] == pytest.approx(library_epsilon(4, 2, 1.0, 3, 2, 0.1 / 4), rel=1e-9)
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "global.safetensors").values())
    report = write_report([run_dir]).read_text()
    assert f"{eps[-1]:.3f}" in report and "client-level DP (central)" in report


def test_a_run_stops_before_the_round_that_would_exceed_the_target(task_dir, tmp_path):
    cfg = tiny(task_dir, "method.name=fedavg", "privacy.mode=central", "privacy.clip_norm=0.1",
               "privacy.target_epsilon=4", f"output_dir={tmp_path}", "run_name=budget", "checkpoint.every=1")
    _, run_dir = run_experiment(cfg)
    sim, _ = resume_experiment(run_dir, ["federated.rounds=8"])  # the same noise cannot pay for 5 more rounds
    eps = [r["epsilon"] for r in sim.history]
    assert 3 <= len(eps) < 8 and eps[-1] <= 4.0
    assert sim.privacy.would_exceed(4, 2) is not None
    assert sim.privacy.noise_multiplier == pytest.approx(cfg.noise_multiplier())  # solved for the planned run


def test_public_selection_costs_no_privacy(task_dir, tmp_path):
    public = write_task(tmp_path / "public")
    sim = Simulation(tiny(task_dir, "method.warmup_rounds=1", "method.lanczos_iters=5", *DP,
                          "privacy.selection=public", f"privacy.public_data={public}"))
    sim.run()
    assert sim.privacy.releases == 0 and sim.algorithm.selection["layers"]
    assert sim.history[-1]["epsilon"] == pytest.approx(library_epsilon(4, 2, 1.0, 3, 0, 0.025), rel=1e-9)


def test_a_nan_update_under_dp_does_not_reach_the_global_state(task_dir):
    sim = Simulation(tiny(task_dir, "method.name=fedavg", *DP))
    real = sim.worker.train

    def poisoned(round_index, jobs):
        replies = real(round_index, jobs)
        if round_index == 0:  # the first client sends NaN
            replies[0].sent = Message({n: torch.full_like(t, float("nan")) for n, t in replies[0].sent.model.items()})
        return replies

    sim.worker.train = poisoned
    sim.run()
    assert all(torch.isfinite(t).all() for t in sim.algorithm.params.values())
    assert sim.history[0]["rejected"]


@pytest.mark.usefixtures("keep_process_settings")  # the in-process ClientApps set torch's thread count
@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_simulator_and_flower_agree_under_dp(tmp_path, mode):
    task = write_task(tmp_path / "task")
    privacy = {"mode": mode, "clip_norm": 0.05, "noise_multiplier": 0.8}
    method = {"name": "fedpeptao", "ratio": 0.5} if mode == "central" else {"name": "fedavg"}
    experiment = tiny_experiment(task, privacy=privacy, method=method,
                                 federated={"num_clients": 3, "clients_per_round": 2, "rounds": 3})
    out, _ = run_in_process(tmp_path / "flower", experiment)
    sim = Simulation(load_config(None, []).model_validate(experiment))
    sim.run()
    flower = load_file(out / "global.safetensors")
    for name, tensor in sim.algorithm.params.items():
        assert torch.allclose(flower[name], tensor, atol=1e-6), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rows] == pytest.approx([h["epsilon"] for h in sim.history], rel=1e-12)
    assert json.loads((out / "summary.json").read_text())["privacy"]["epsilon"] == pytest.approx(
        sim.privacy.epsilon(), rel=1e-12)

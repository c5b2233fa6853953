"""Recipes from docs/architecture.md, each a test: a new algorithm in under 30 lines, run in the
simulator and under Flower's simulation engine with equal results."""

from __future__ import annotations

import importlib.util
from typing import Literal

import pytest
import torch
from flower_helpers import StateDirClientApp, run_with_simulation_engine, tiny_experiment, write_task
from pydantic import Field
from safetensors.torch import load_file

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, register
from fedpeptao.config import ExperimentConfig, load_config
from fedpeptao.sim.simulator import Simulation
from fedpeptao.utils.state import add_prefix, take_prefix


# -- recipe: a new algorithm (FedAvgM, Hsu et al., 2019: server momentum on the averaged change) --
class FedAvgMSettings(AlgorithmSettings):
    name: Literal["fedavgm"] = "fedavgm"
    server_lr: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


@register
class FedAvgM(Algorithm):
    name, settings_class = "fedavgm", FedAvgMSettings

    def __init__(self, settings, ctx, initial) -> None:
        super().__init__(settings, ctx, initial)
        self.velocity: dict[str, torch.Tensor] = {}

    def aggregate(self, round_index, sampled, updates) -> None:
        mean, s = self.ctx.average(updates), self.settings
        for name in self.shared:
            change = self.params[name] - mean[name]
            self.velocity[name] = s.momentum * self.velocity.get(name, torch.zeros_like(change)) + change
        self._set_shared({n: self.params[n] - s.server_lr * self.velocity[n] for n in self.shared})

    def state(self):  # named tensors plus JSON: add the velocity as its own group of tensors
        tensors, meta = super().state()
        return {**tensors, **add_prefix("velocity", self.velocity)}, meta

    def load_state(self, tensors, meta) -> None:
        super().load_state(tensors, meta)
        self.velocity = take_prefix(tensors, "velocity")
# -- end of recipe ---------------------------------------------------------------------------------


class RecipeClientApp(StateDirClientApp):
    """Defined here so that a simulation-engine worker imports this module (and registers FedAvgM)."""


def test_a_new_algorithm_is_selectable_and_differs_from_fedavg(task_dir):
    base = ["model.name=tiny-bert", f"data.task={task_dir}", "model.max_length=24", "federated.num_clients=3",
            "federated.clients_per_round=2", "federated.rounds=3", "progress=false", "execution=sequential"]
    runs = {}
    for method in ("fedavgm", "fedavg"):
        sim = Simulation(load_config(None, [*base, f"method.name={method}"]))
        sim.run()
        runs[method] = sim
    assert isinstance(runs["fedavgm"].algorithm, FedAvgM)
    assert runs["fedavgm"].algorithm.velocity
    first = next(iter(runs["fedavg"].algorithm.shared))
    assert not torch.equal(runs["fedavgm"].algorithm.params[first], runs["fedavg"].algorithm.params[first])


@pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")
def test_a_new_algorithm_runs_under_flowers_simulation_engine_as_in_the_simulator(tmp_path, monkeypatch):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Flower's simulation engine needs ray")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    experiment = tiny_experiment(write_task(tmp_path / "task"), method={"name": "fedavgm", "momentum": 0.5})
    out = run_with_simulation_engine(tmp_path, experiment, RecipeClientApp)
    sim = Simulation(ExperimentConfig.model_validate(experiment))
    sim.run()
    flower = load_file(out / "global.safetensors")
    assert flower.keys() == sim.algorithm.params.keys()
    for name, tensor in sim.algorithm.params.items():
        assert float((tensor - flower[name]).abs().max()) <= 1e-6, name

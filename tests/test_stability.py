"""Where FedPepTAO's published server step turns against its clients, the stable correction, and
the one-line warning (the check of ``benchmarks/stability.py``, float64, no model)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from fedpeptao.algorithms.fedpeptao import STABLE_RATIO
from fedpeptao.config import load_config
from fedpeptao.core.aggregation import ClientUpdate
from fedpeptao.core.server import ServerState, ServerStepConfig, fedpeptao_step, first_contact_ratio
from fedpeptao.sim.simulator import Simulation

_spec = importlib.util.spec_from_file_location("stability", Path(__file__).parents[1] / "benchmarks" / "stability.py")
stability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stability)


def test_with_one_local_step_the_published_step_turns_against_every_client_and_previous_does_not():
    published = stability.step_ratios(1000, 50, 4, 1, "published", local_lr=0.02, server_lr=0.05)
    previous = stability.step_ratios(1000, 50, 4, 1, "previous", local_lr=0.02, server_lr=0.05)
    assert published[0] == pytest.approx(1.0) and previous[0] == pytest.approx(1.0)  # the first round takes the mean
    assert all(r < 0 for r in published[1:]) and published[3] < published[1]  # reversed, and growing
    assert all(0.5 < r < 2.0 for r in previous)
    many = stability.step_ratios(1000, 50, 4, 100, "published", local_lr=0.02, server_lr=0.05)
    assert all(r > 0.9 for r in many)  # the paper's regime (hundreds of local steps) is mild


def test_first_contact_ratio_is_the_formula_and_the_first_contact_step():
    assert first_contact_ratio(1, 0.02, 0.05, 0.9, 0.05) == pytest.approx(1 + 0.005 - 0.05 * 0.95 / 0.02)
    # one client, met first in the second round of a run whose first round trained another client: c and v are ~0
    cfg = ServerStepConfig(num_clients=1000, local_lr=0.02, server_lr=0.05, server_lr_decay=1.0)
    state, theta = ServerState(server_lr=0.05), torch.zeros(4, dtype=torch.float64)
    far = torch.full((4,), 1e-9, dtype=torch.float64)  # the first round's client barely moved: c stays ~0
    theta = fedpeptao_step({"x": theta}, [ClientUpdate(0, {"x": theta - far}, 1, 1)], state, cfg)["x"]
    update = torch.ones(4, dtype=torch.float64) * 0.02  # K = 1 step of 0.02 along the common direction
    new = fedpeptao_step({"x": theta}, [ClientUpdate(1, {"x": theta - update}, 1, 1)], state, cfg)["x"]
    ratio = float(((theta - new) / update).mean())
    assert ratio == pytest.approx(first_contact_ratio(1, 0.02, 0.05, 0.9, 1 / 1000), abs=1e-3)


def _run(task_dir, *extra):
    sim = Simulation(load_config(None, [
        "model.name=tiny-bert", f"data.task={task_dir}", "model.max_length=24", "federated.num_clients=6",
        "federated.clients_per_round=3", "federated.rounds=1", "method.ratio=0.5", "progress=false",
        "data.validation_fraction=0", *extra]))
    sim.run()
    return sim


def test_a_run_with_one_local_step_per_round_warns_in_one_line_and_a_longer_one_does_not(task_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="fedpeptao"):
        sim = _run(task_dir, "client.epochs=1", "client.batch_size=64")
    lines = [r.getMessage() for r in caplog.records if "unstable range" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert all(key in lines[0] for key in ("client.epochs", "client.batch_size", "client.lr", "method.server_lr",
                                           "method.correction=previous"))
    assert sim.algorithm.summary()["stability"]["local_steps"] == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedpeptao"):
        _run(task_dir, "client.epochs=3", "client.batch_size=2")  # 10 examples a client: 15 steps
    assert not [r for r in caplog.records if "unstable range" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="fedpeptao"):
        _run(task_dir, "client.epochs=1", "client.batch_size=64", "method.correction=previous")
    assert not [r for r in caplog.records if "unstable range" in r.getMessage()]


def test_the_default_config_is_outside_the_unstable_range():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "default.toml")
    per_client = cfg.data.max_train_examples * (1 - cfg.data.validation_fraction) / cfg.federated.num_clients
    steps = cfg.client.epochs * -(-per_client // cfg.client.batch_size)
    ratio = first_contact_ratio(steps, cfg.client.lr, cfg.method.server_lr, cfg.method.momentum,
                                cfg.federated.clients_per_round / cfg.federated.num_clients)
    assert ratio > STABLE_RATIO

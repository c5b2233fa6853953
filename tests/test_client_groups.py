"""Every evaluation also reports clients that have trained at least once and those that never did
(cross-device users need both), pooled the same way as the whole."""

from __future__ import annotations

import pytest

from fedpeptao.config import load_config
from fedpeptao.sim.simulator import Simulation


def test_trained_and_untrained_groups_add_up_to_the_pooled_figure(task_dir):
    sim = Simulation(load_config(None, [
        "model.name=tiny-bert", f"data.task={task_dir}", "model.max_length=24", "federated.num_clients=6",
        "federated.clients_per_round=2", "federated.rounds=2", "method.name=fedavg", "progress=false"]))
    sim.run()
    trained: set[int] = set()
    for row in sim.history:
        trained |= set(row["clients"])
        evaluated = {int(k) for k in row["client_accuracy"]}
        assert row["trained_clients"] == len(evaluated & trained) and row["untrained_clients"] == len(evaluated - trained)
        assert 0 < row["trained_clients"] < len(evaluated)  # 2 and then 4 of 6 clients have trained
        counts = row["trained_examples"] + row["untrained_examples"]
        assert counts == row["eval_examples"]
        pooled = (row["trained_accuracy"] * row["trained_examples"]
                  + row["untrained_accuracy"] * row["untrained_examples"]) / counts
        assert pooled == pytest.approx(row["accuracy"], abs=1e-12)
    summary = sim.summary()
    selected = next(r for r in sim.history if r["round"] == summary["best_round"])
    assert summary["trained_metric_at_selected"] == selected["trained_metric"]
    assert summary["untrained_metric_at_selected"] == selected["untrained_metric"]

"""The embedded simulator running FedAvg and FedPepTAO end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeptao.config import load_config
from fedpeptao.core import payload
from fedpeptao.sim import simulator
from fedpeptao.sim.simulator import Simulation

from fedpeptao.utils.round_log import TIMING  # noqa: E402


def tiny(task_dir: Path, *extra: str, arch: str = "bert"):
    return load_config(None, [f"model.name=tiny-{arch}", f"data.task={task_dir}", "tuning.num_prompt_tokens=3",
                              "model.max_length=24", "federated.num_clients=4", "federated.clients_per_round=2",
                              "federated.rounds=3", "progress=false", "client.epochs=1", *extra])


def test_unselected_layers_never_leave_the_device(task_dir, monkeypatch):
    cfg = tiny(task_dir, "method.ratio=0.34")
    sim = Simulation(cfg)
    sent = []
    real = payload.num_bytes
    monkeypatch.setattr("fedpeptao.core.payload.num_bytes", lambda tensors: sent.append(sorted(tensors)) or real(tensors))
    initial = {k: v.clone() for k, v in sim.algorithm.params.items()}
    sim.run()

    layers = sim.algorithm.selection["layers"]
    groups = sim.model.layer_groups()
    shared = sorted([n for i in layers for n in groups[i]] + sim.model.head_names())
    unselected = [n for n in sim.model.trainable_names() if n not in shared]
    assert len(layers) == 2 and unselected, "ratio 0.34 of 3 layers shares ceil(1.02) = 2"
    assert sent and all(keys == shared for keys in sent), "a payload carried something other than the selected layers"
    for name in unselected:
        assert torch.equal(sim.algorithm.params[name], initial[name]), f"server copy of {name} changed"
    trained = [c for c in sim.clients.values() if c.rounds_trained]
    assert any(not torch.equal(c.params[n], initial[n]) for c in trained for n in unselected), "personal layers did not train"
    assert all(any(not torch.equal(sim.algorithm.params[n], initial[n]) for n in shared) for _ in [0])
    assert sim.history[-1]["bytes_up"] == sum(real({n: sim.algorithm.params[n] for n in shared}) for _ in range(2))


def test_same_config_gives_same_metrics(task_dir):
    rows = []
    for _ in range(2):
        sim = Simulation(tiny(task_dir, "method.ratio=0.5"))
        rows.append([{k: v for k, v in r.items() if k not in TIMING} for r in sim.run()])
    assert rows[0] == rows[1]
    other = Simulation(tiny(task_dir, "method.ratio=0.5", "seed=1"))
    assert [r["clients"] for r in other.run()] != [r["clients"] for r in rows[0]]


def test_fedavg_shares_every_trainable_tensor(task_dir):
    sim = Simulation(tiny(task_dir, "method.name=fedavg"))
    sim.run()
    assert sim.algorithm.shared == sim.model.trainable_names()
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in sim.history)
    assert len(sim.history[-1]["client_accuracy"]) == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_fedpeptao_with_estimated_ratio_on_other_families(task_dir, arch):
    head = "model.head=mlm" if arch == "roberta" else "model.head=lm"
    sim = Simulation(tiny(task_dir, "method.ratio=auto", "method.warmup_rounds=1",
                          "method.lanczos_iters=8", "federated.rounds=3", head, arch=arch))
    sim.run()
    ratio = sim.algorithm.selection["ratio"]
    assert 0.0 < ratio <= 1.0
    assert sim.history[0]["shared_tensors"] > sim.history[-1]["shared_tensors"] or ratio == 1.0
    assert sim.algorithm.server_state.round == 2


@pytest.mark.slow
def test_fedpeptao_on_real_smollm2_with_label_words(tmp_path):
    from conftest import write_task

    task = write_task(tmp_path / "t", repeat=1)
    cfg = load_config(None, ["model.name=smollm2-135m", f"data.task={task}", "tuning.num_prompt_tokens=2",
                             "model.max_length=24", "federated.num_clients=2", "federated.clients_per_round=2",
                             "federated.rounds=3", "method.ratio=0.5", "progress=false",
                             "client.epochs=1", "client.batch_size=10", "client.lr=0.01"])
    sim = Simulation(cfg)
    assert sim.fed.head == "lm" and sim.model.task.label_word_ids != []
    sim.run()
    assert len(sim.algorithm.selection["layers"]) == 15  # ceil(0.5 * 30)
    # training the prompts lowers the label-word LM loss of the real model (accuracy is a benchmark matter)
    losses = [r["train_loss"] for r in sim.history]
    assert losses[-1] < losses[0] and np.isfinite(losses).all()


def test_tensorboard_mirrors_the_jsonl_rows(task_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(task_dir, "tensorboard=true", f"output_dir={tmp_path}", "run_name=tb", "federated.eval_every=1")
    sim, run_dir = simulator.run_experiment(cfg)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("accuracy", "train_loss", "total_bytes"):
        logged = [(e.step, e.value) for e in events.Scalars(f"round/{key}")]
        assert logged == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in sim.history], key


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    from fedpeptao import config

    monkeypatch.setattr(config, "tensorboard_available", lambda: False)
    with pytest.raises(config.ConfigError, match="tensorboard"):
        load_config(None, ["tensorboard=true"])


def test_tensorboard_of_a_resumed_run_keeps_checkpointed_rounds_and_replaces_the_rest(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedpeptao.utils.round_log import RoundLog

    log = RoundLog(tmp_path, tensorboard=True)
    for r in range(1, 6):  # rounds 4 and 5 ran after the last checkpoint, then the run died
        log.write({"round": r, "accuracy": 0.1 * (r - 1)})
    log.close()
    log = RoundLog(tmp_path, tensorboard=True, first_round=4)
    for r in (4, 5):
        log.write({"round": r, "accuracy": 0.5 + r - 1})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("round/accuracy")]
    assert logged == [(1, 0.0), (2, pytest.approx(0.1)), (3, pytest.approx(0.2)), (4, 3.5), (5, 4.5)]

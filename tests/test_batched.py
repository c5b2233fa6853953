"""Batched clients: several clients in the same passes over the one frozen backbone give the same
tensors and metrics as training them one after another (dropout off), for every algorithm's local
objective; a tuning that cannot batch falls back and says so."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fedpeptao.config import ConfigError, load_config
from fedpeptao.core.client import PASS_COST_TOKENS, pass_groups
from fedpeptao.models.slots import batch_refusal
from fedpeptao.sim.simulator import Simulation

# Adam turns float rounding in near-zero gradient components into visible steps; at the default
# lr (4e-2) three rounds reach a few 1e-5 either way, so the comparison trains at lr 5e-3.
TOLERANCE = 1e-5


def simulation(task_dir, execution: str, *extra: str) -> Simulation:
    cfg = load_config(None, ["model.name=tiny-bert", f"data.task={task_dir}", "model.max_length=24",
                             "federated.num_clients=6", "federated.clients_per_round=4", "federated.rounds=3",
                             "client.epochs=2", "client.batch_size=4", "client.lr=5e-3", "progress=false",
                             "data.partition=paper-dirichlet", f"execution={execution}", "clients_per_pass=3",
                             *extra])
    sim = Simulation(cfg)
    for module in sim.model.modules():  # dropout off: both modes then compute the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return sim


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


METHODS = [["method.name=fedpeptao", "method.ratio=0.5"], ["method.name=fedavg"], ["method.name=fedprox"],
           ["method.name=scaffold"], ["method.name=moon"], ["method.name=fedadam"]]


@pytest.mark.parametrize("tuning", ["deep_prompt", "lora"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0].split("=")[1])
def test_batched_equals_sequential(task_dir, method, tuning):
    runs = {}
    for execution in ("sequential", "batched"):
        sim = simulation(task_dir, execution, *method, f"tuning.name={tuning}")
        sim.run()
        runs[execution] = sim
    seq, bat = runs["sequential"], runs["batched"]
    assert bat.batched and not seq.batched
    assert max_diff(seq.algorithm.params, bat.algorithm.params) <= TOLERANCE
    assert seq.clients.keys() == bat.clients.keys()
    for k, client in seq.clients.items():
        assert max_diff(client.params, bat.clients[k].params) <= TOLERANCE, k
        assert client.rounds_trained == bat.clients[k].rounds_trained
    for a, b in zip(seq.history, bat.history):
        assert a["clients"] == b["clients"] and a["bytes_up"] == b["bytes_up"]
        assert a["accuracy"] == b["accuracy"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["client_accuracy"] == b["client_accuracy"]


def test_clients_per_pass_caps_a_pass_and_keeps_the_result(task_dir):
    """Four sampled clients in passes of 2, of 3 (3 + 1) and of 4 give the same tensors."""
    results = []
    for size in (2, 3, 4):
        sim = simulation(task_dir, "batched", "method.name=fedavg", f"clients_per_pass={size}")
        assert [len(g) for g in sim.worker.passes([0, 1, 2, 3])] == {2: [2, 2], 3: [3, 1], 4: [4]}[size]
        sim.run()
        results.append(sim.algorithm.params)
    assert max_diff(results[0], results[1]) <= TOLERANCE and max_diff(results[0], results[2]) <= TOLERANCE


def test_a_batched_pass_really_shares_the_backbone(task_dir, monkeypatch):
    """The backbone runs once per step for the whole pass, not once per client: a round of four
    clients in one pass costs as many backbone calls as its longest client has batches (with a
    pass as dear as on an accelerator, so that no step splits by width)."""
    monkeypatch.setitem(PASS_COST_TOKENS, "cpu", PASS_COST_TOKENS["accelerator"])
    sim = simulation(task_dir, "batched", "method.name=fedavg", "clients_per_pass=4")
    calls = []
    sim.model.model.base_model.register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    row = sim.train_round(0)
    batches = [-(-len(sim.train_parts[k]) // 4) * 2 for k in row["clients"]]  # 2 epochs of batches of 4
    assert len(calls) == max(batches) < sum(batches)
    assert sum(calls) == sum(2 * len(sim.train_parts[k]) for k in row["clients"])


def test_pass_groups_split_a_step_by_width_only_where_padding_costs_more_than_a_pass():
    shapes = [(8, 22), (8, 60), (8, 20), (8, 58)]
    assert pass_groups(shapes, 64) == [[0, 2], [1, 3]]  # 16 padded tokens < one pass < 8 * 38
    assert pass_groups(shapes, 4096) == [[0, 1, 2, 3]]  # a pass is dearer than any padding
    assert pass_groups(shapes, 0) == [[0], [1], [2], [3]]
    assert pass_groups([(8, 30)] * 3, 64) == [[0, 1, 2]]
    assert pass_groups([], 64) == []


@pytest.mark.parametrize("method", [METHODS[0], ["method.name=moon"], ["method.name=scaffold"]],
                         ids=lambda m: m[0].split("=")[1])
def test_a_step_split_into_several_passes_still_equals_sequential(task_dir, method, monkeypatch):
    """Every step's batches in passes of their own width (a free pass): the same tensors."""
    for kind in PASS_COST_TOKENS:  # on whichever device the run picks
        monkeypatch.setitem(PASS_COST_TOKENS, kind, 0)
    seq = simulation(task_dir, "sequential", *method)
    bat = simulation(task_dir, "batched", *method)
    passes = {}
    for name, sim in (("sequential", seq), ("batched", bat)):
        count = passes[name] = {"training": False, "passes": 0}
        sim.model.model.base_model.register_forward_hook(
            lambda *_, count=count: count.update(passes=count["passes"] + count["training"]))
        for k in range(sim.cfg.federated.rounds):  # the training passes only (FedPepTAO's scoring pools)
            sim.algorithm.prepare_round(k, sim.run_task)
            count["training"] = True
            sim.train_round(k)
            count["training"] = False
    assert max_diff(seq.algorithm.params, bat.algorithm.params) <= TOLERANCE
    for k, client in seq.clients.items():
        assert max_diff(client.params, bat.clients[k].params) <= TOLERANCE, k
    assert passes["batched"]["passes"] == passes["sequential"]["passes"] > 0  # each batch in a pass of its own


@pytest.mark.parametrize("tuning", ["input_prompt", "late_prompt", "attempt"])
def test_a_tuning_that_cannot_batch_falls_back_and_says_so(task_dir, tuning, caplog):
    with caplog.at_level(logging.INFO, logger="fedpeptao"):
        sim = simulation(task_dir, "batched", "method.name=fedavg", f"tuning.name={tuning}", "federated.rounds=1")
    assert not sim.batched
    assert batch_refusal(sim.model) is not None
    assert any("one at a time" in r.getMessage() and tuning in r.getMessage() for r in caplog.records)
    sim.run()
    seq = simulation(task_dir, "sequential", "method.name=fedavg", f"tuning.name={tuning}", "federated.rounds=1")
    seq.run()
    assert max_diff(seq.algorithm.params, sim.algorithm.params) == 0.0


@pytest.mark.parametrize("tuning", ["adapter", "idpg"])
def test_linear_only_tunings_batch_too(task_dir, tuning):
    seq = simulation(task_dir, "sequential", "method.name=fedavg", f"tuning.name={tuning}")
    bat = simulation(task_dir, "batched", "method.name=fedavg", f"tuning.name={tuning}")
    assert bat.batched
    seq.run()
    bat.run()
    assert max_diff(seq.algorithm.params, bat.algorithm.params) <= TOLERANCE


def test_batched_with_dropout_is_deterministic(task_dir):
    """Dropout on: not the sequential draws, but the same seed gives the same run."""
    runs = []
    for _ in range(2):
        sim = Simulation(load_config(None, ["model.name=tiny-bert", f"data.task={task_dir}", "model.max_length=24",
                                            "federated.num_clients=4", "federated.clients_per_round=3",
                                            "federated.rounds=2", "progress=false", "method.name=fedavg",
                                            "execution=batched"]))
        assert sim.batched
        sim.run()
        runs.append(sim.algorithm.params)
    assert max_diff(*runs) == 0.0


def test_auto_shares_passes_on_an_accelerator_only(task_dir):
    sim = simulation(task_dir, "auto", "method.name=fedavg", "device=cpu")
    assert not sim.batched and sim.worker.pooled_eval  # a CPU: sequential training, pooled evaluation


def test_pooled_evaluation_equals_one_client_at_a_time(task_dir):
    sim = simulation(task_dir, "sequential", "method.name=fedpeptao", "method.ratio=0.5", "federated.rounds=2")
    sim.run()
    pooled = sim.evaluate()
    sim.worker.pooled_eval = False
    alone = sim.evaluate()
    assert pooled["client_accuracy"] == alone["client_accuracy"]
    assert pooled["accuracy"] == alone["accuracy"] and pooled["val_accuracy"] == alone["val_accuracy"]
    assert pooled["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-6)


def test_execution_and_clients_per_pass_are_validated():
    with pytest.raises(ConfigError, match=r"^execution: "):
        load_config(None, ["execution=parallel"])
    with pytest.raises(ConfigError, match=r"^clients_per_pass: "):
        load_config(None, ["clients_per_pass=0"])


def test_slot_mode_gives_each_example_its_clients_tensors(task_dir):
    """One pass over two clients' examples equals two passes, one per client's tensors."""
    sim = simulation(task_dir, "batched", "method.name=fedavg", "tuning.name=lora")
    from fedpeptao.data.encoding import stack_batches
    from fedpeptao.models.slots import slot_mode

    model, data = sim.model, sim.train_data
    tensors = [{n: (t + 0.05 * k * torch.randn_like(t)).to(model.device) for n, t in sim.fed.initial.items()}
               for k in range(2)]
    batches = [next(data.batches(sim.train_parts[k], 3)) for k in range(2)]
    model.eval()
    with torch.no_grad():
        alone = []
        for own, batch in zip(tensors, batches):
            model.load_trainable(own)
            alone.append(model(**batch).logits)
        combined, rows = stack_batches(batches, data.pad_id)
        with slot_mode(model, tensors, [r.stop - r.start for r in rows]):
            together = model(**combined).logits
    for own, r in zip(alone, rows):
        assert torch.allclose(together[r], own, atol=1e-6)
    assert not torch.allclose(alone[0], alone[1], atol=1e-4), "the clients' tensors differ, so must their logits"


def test_pooled_layer_scoring_equals_one_client_at_a_time(task_dir):
    """FedPepTAO's round-0 layer scores from one shared pass (batched) match scoring each client
    on its own, and so does the ranking that decides what travels."""
    from fedpeptao.algorithms.fedpeptao.selection import SCORE_TASK
    from fedpeptao.algorithms.base import ClientTask
    from fedpeptao.core.federation import SCORE_STREAM

    scores = {}
    for execution in ("sequential", "batched"):
        sim = simulation(task_dir, execution, "method.name=fedpeptao", "method.ratio=0.5")
        task = ClientTask(SCORE_TASK, None, dict(sim.algorithm.params), 0, SCORE_STREAM)
        scores[execution] = sim.run_task(task)
    seq, bat = scores["sequential"], scores["batched"]
    assert seq.keys() == bat.keys() and len(seq) == 6
    for k in seq:
        assert seq[k].keys() == bat[k].keys()
        if "scores" in seq[k]:
            assert seq[k]["num_train"] == bat[k]["num_train"]
            assert bat[k]["scores"] == pytest.approx(seq[k]["scores"], rel=1e-6, abs=1e-6), k
    sim.algorithm.prepare_round(0, sim.run_task)
    reference = simulation(task_dir, "sequential", "method.name=fedpeptao", "method.ratio=0.5")
    reference.algorithm.prepare_round(0, reference.run_task)
    assert sim.algorithm.ranking == reference.algorithm.ranking


def test_hessian_ratio_of_a_pass_equals_one_client_at_a_time(task_dir):
    """FedPepTAO's Hessian clients in one double-backward pass per Lanczos step: the same ratios
    (to float rounding) and so the same layers as one client after another."""
    settings = ["method.name=fedpeptao", "method.ratio=auto", "method.warmup_rounds=1", "method.lanczos_iters=8",
                "method.hessian_clients=3", "method.hessian_probes=2", "federated.rounds=2"]
    runs = {}
    for execution in ("sequential", "batched"):
        sim = simulation(task_dir, execution, *settings)
        pass_sizes = []  # clients per run_tasks call
        original = sim.algorithm.run_tasks
        sim.algorithm.run_tasks = lambda task, works: pass_sizes.append(len(works)) or original(task, works)
        sim.run()
        runs[execution] = (sim, pass_sizes)
    (seq, seq_calls), (bat, bat_calls) = runs["sequential"], runs["batched"]
    assert max(bat_calls) == 3 and max(seq_calls) == 1  # the three Hessian clients shared a pass
    assert bat.algorithm.selection["ratio"] == pytest.approx(seq.algorithm.selection["ratio"], abs=1e-6)
    assert bat.algorithm.selection["layers"] == seq.algorithm.selection["layers"]
    assert max_diff(seq.algorithm.params, bat.algorithm.params) <= TOLERANCE

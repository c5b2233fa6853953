"""Device and precision: one line for a missing device, bf16 backbones with fp32 trainables."""

from __future__ import annotations

import pytest
import torch

from fedpeptao.config import ConfigError, load_config
from fedpeptao.sim.simulator import Simulation
from fedpeptao.utils.device import DeviceError, resolve_device, to_device, to_host


def tiny(task_dir, *extra):
    return load_config(None, ["model.name=tiny-bert", f"data.task={task_dir}", "tuning.num_prompt_tokens=3",
                              "model.max_length=24", "federated.num_clients=4", "federated.clients_per_round=2",
                              "federated.rounds=2", "progress=false", "client.epochs=1", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_missing_device_is_one_line_naming_device(device):
    # the config may be read on another machine than the one that runs it: only placing the model refuses
    assert load_config(None, [f"device={device}"]).device == device
    with pytest.raises(DeviceError) as err:
        resolve_device(device)
    assert str(err.value).startswith("device: ") and "\n" not in str(err.value)


def test_an_unknown_device_is_refused():
    with pytest.raises(ConfigError, match=r"^device: expected auto"):
        load_config(None, ["device=gpu0"])


def test_auto_picks_an_available_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("method", ["fedpeptao", "fedavg", "scaffold"])
def test_a_bf16_run_on_the_cpu_keeps_trainables_and_server_state_fp32(task_dir, method):
    sim = Simulation(tiny(task_dir, "device=cpu", "precision=bf16", f"method.name={method}", "method.ratio=0.5"
                          if method == "fedpeptao" else "seed=0"))
    sim.run()
    assert {t.dtype for t in sim.algorithm.params.values()} == {torch.float32}
    assert {p.dtype for p in sim.model.parameters() if p.requires_grad} == {torch.float32}
    frozen = {p.dtype for p in sim.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert all(torch.isfinite(t).all() for t in sim.algorithm.params.values())
    assert {t.dtype for c in sim.clients.values() for t in c.params.values()} == {torch.float32}
    # the initial tensors do not depend on the precision (the tuning is initialised before the cast)
    fp32 = Simulation(tiny(task_dir, "device=cpu", f"method.name={method}"))
    assert all(torch.equal(fp32.fed.initial[n], t) for n, t in sim.fed.initial.items())


def test_gradient_checkpointing_gives_the_same_tensors(task_dir):
    plain = Simulation(tiny(task_dir, "method.name=fedavg"))
    plain.run()
    checkpointed = Simulation(tiny(task_dir, "method.name=fedavg", "model.gradient_checkpointing=true"))
    assert checkpointed.model.model.is_activation_checkpointing and not plain.model.model.is_activation_checkpointing
    checkpointed.run()
    for name, tensor in plain.algorithm.params.items():
        assert torch.allclose(checkpointed.algorithm.params[name], tensor, atol=1e-6), name


def test_client_state_lives_on_the_host():
    state = {"a": torch.ones(3), "nested": {"b": [torch.zeros(2)]}, "step": 3}
    host = to_host(state)
    assert host["a"] is state["a"] and host["nested"]["b"][0].device.type == "cpu" and host["step"] == 3


def test_a_batch_moves_to_the_device_with_its_shape_kept():
    """Tuples stay tuples and ``None`` (an unlabelled batch) stays ``None``; on the way back to the
    host a copy is never left in flight."""
    device = resolve_device("auto")
    ids, labels = torch.arange(6).view(2, 3), None
    moved = to_device((ids, labels, {"mask": [torch.ones(2, 3)]}), device)
    assert isinstance(moved, tuple) and moved[1] is None
    assert moved[0].device.type == device.type and moved[2]["mask"][0].device.type == device.type
    back = to_device(moved, "cpu")
    assert torch.equal(back[0], ids) and back[0].device.type == "cpu"


def test_an_architecture_builds_from_its_config_with_random_weights(task_dir, tmp_path):
    from transformers import BertConfig

    from fedpeptao.models.loading import architecture_config

    big = architecture_config("roberta-large-config")
    assert (big.num_hidden_layers, big.hidden_size, big.model_type) == (24, 1024, "roberta")
    assert architecture_config("llama-7b-config").num_hidden_layers == 32
    folder = tmp_path / "arch"
    folder.mkdir()
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(folder)
    cfg = load_config(None, [f"model.name={folder}", "model.random_init=true", f"data.task={task_dir}",
                             "tuning.num_prompt_tokens=2", "model.max_length=24", "federated.num_clients=2",
                             "federated.clients_per_round=2", "federated.rounds=1", "progress=false",
                             "client.epochs=1", "method.ratio=0.5"])
    sim = Simulation(cfg)
    sim.run()
    assert "random weights" in sim.fed.backbone.name and len(sim.model.layer_groups()) == 2
    with pytest.raises(Exception, match="model.random_init"):
        Simulation(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(tmp_path)})}))


@pytest.mark.parametrize("tuning", ["deep_prompt", "lora"])
def test_a_bf16_batched_run_with_pooled_selection_keeps_fp32_and_finite(task_dir, tuning):
    """Shared passes over a bf16 backbone (training, evaluation, layer scores and the Hessian
    clients' pooled products): trainables, optimiser state and the ratio stay fp32 and finite."""
    sim = Simulation(load_config(None, [
        "model.name=tiny-bert", f"data.task={task_dir}", f"tuning.name={tuning}", "model.max_length=24",
        "federated.num_clients=4", "federated.clients_per_round=2", "federated.rounds=2", "progress=false",
        "client.epochs=1", "device=cpu", "precision=bf16", "execution=batched", "method.name=fedpeptao",
        "method.ratio=auto", "method.warmup_rounds=1", "method.lanczos_iters=5", "method.hessian_clients=2"]))
    assert sim.batched
    sim.run()
    assert 0.0 <= sim.algorithm.selection["ratio"] <= 1.0
    assert {t.dtype for t in sim.algorithm.params.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in sim.algorithm.params.values())
    states = [c.optimizer["state"] for c in sim.clients.values() if c.optimizer]
    assert states and {t.dtype for s in states for v in s.values() for t in v.values()
                       if torch.is_tensor(t) and t.dim() > 0} == {torch.float32}


def test_the_summary_says_where_and_how_the_clients_ran(task_dir):
    from fedpeptao.report.summary import describe_compute

    seq = Simulation(tiny(task_dir, "device=cpu", "execution=sequential", "federated.rounds=1"))
    bat = Simulation(tiny(task_dir, "device=cpu", "precision=bf16", "execution=batched", "clients_per_pass=2",
                          "federated.rounds=1"))
    for sim in (seq, bat):
        sim.run()
    assert seq.summary()["compute"] == {"device": "cpu", "precision": "fp32", "execution": "sequential",
                                        "clients_per_pass": 1}
    assert bat.summary()["compute"] == {"device": "cpu", "precision": "bf16", "execution": "batched",
                                        "clients_per_pass": 2}
    assert describe_compute(bat.summary()["compute"]) == "cpu, bf16 backbone, up to 2 clients per shared pass"

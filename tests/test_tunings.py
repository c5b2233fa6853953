"""Tunings and baseline presets on tiny random models: what one round changes, what travels, and
tuning- and algorithm-specific checks (ported from the former test_baselines.py)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import write_task

from fedpeptao.algorithms.scaffold import CONTROL, DELTA_CONTROL
from fedpeptao.compare.presets import DEFAULT_PRESETS, PRESETS, WEIGHT_LR, preset_config
from fedpeptao.core import payload
from fedpeptao.models.tuned import TunedModel
from fedpeptao.models.tiny import HIDDEN, tiny_backbone
from fedpeptao.sim import simulator
from fedpeptao.sim.simulator import Simulation
from fedpeptao.tasks import task_class
from fedpeptao.tunings import TUNINGS, build_model
from fedpeptao.tunings.adapter import AdapterModel, AdapterSettings
from fedpeptao.tunings.attempt import ATTEMPTModel, AttemptSettings
from fedpeptao.tunings.idpg import IDPGModel, IDPGSettings
from fedpeptao.tunings.input_prompt import FedPromptModel, InputPromptSettings
from fedpeptao.tunings.late_prompt import LatePromptModel, LatePromptSettings
from fedpeptao.tunings.lora import LoRAModel, LoraSettings

L, H, P, C, R = 3, HIDDEN, 2, 2, LoraSettings().r  # tiny-bert: 3 layers, hidden 32 = kv width
HEAD = H * C + C
ADAPTER_M = H // AdapterSettings().reduction
DEEP = L * P * 2 * H + HEAD
# The documented trainable (= shared) parameter counts per client (presets.py and the tunings' docstrings).
EXPECTED_PARAMS = {
    "fedavg": DEEP, "fedprox": DEEP, "moon": DEEP, "fedadam": DEEP, "fedyogi": DEEP, "fedadagrad": DEEP,
    "scaffold": DEEP,
    "fedprompt": P * H + HEAD,
    "lpt": P * H + HEAD,
    "lora": L * 2 * R * (H + H) + HEAD,
    "adapter": L * (H * ADAPTER_M + ADAPTER_M + ADAPTER_M * H + H) + HEAD,
    "idpg": H * 32 + 32 + 32 * P * H + P * H + HEAD,
    "attempt": P * H + (H * 32 + 32) + (32 * H + H) + 2 * H + HEAD,
}
# how many times the model tensors travel each way (SCAFFOLD adds c down and dc_k up)
COPIES = {"scaffold": 2}
EXPECTED_NAMES = {
    "deep_prompt": lambda n: n.startswith(("prompt.layers.", "head.")),
    "input_prompt": lambda n: n == "peft.prompt_encoder.default.embedding.weight" or n.startswith("head."),
    "late_prompt": lambda n: n in ("late_prompt", "head.weight", "head.bias"),
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n or n.startswith("head."),
    "adapter": lambda n: n.startswith(("adapters.", "head.")),
    "idpg": lambda n: n.startswith(("generator_in.", "generator_out.", "head.")),
    "attempt": lambda n: n.startswith(("target_prompt", "attn_down.", "attn_up.", "attn_norm.", "head.")),
}
BASELINES = [m for m in DEFAULT_PRESETS if m != "fedpeptao"]
IDS = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]])
MASK = (IDS != 0).long()


def tuned(settings, backbone, head: str = "linear", words: list[int] | None = None) -> TunedModel:
    """``settings``' tuning on ``backbone`` read by the task ``head`` (C classes), seed 0."""
    return build_model(settings, backbone, task_class(head)(backbone, C, words), 0)


def plain(backbone) -> TunedModel:
    """The frozen backbone with a linear head and no tuning: what a tuning must start equal to."""
    model = TunedModel(backbone, task_class("linear")(backbone, C))
    model.attach_task(torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tunings") / "task")


def overrides(task, *extra):
    return ["model.name=tiny-bert", f"data.task={task}", "federated.num_clients=4", "federated.clients_per_round=2",
            "federated.rounds=1", "client.epochs=1", "client.batch_size=4", f"tuning.num_prompt_tokens={P}",
            "model.max_length=16", "progress=false", *extra]


def simulation(task, preset, *extra):
    return Simulation(preset_config(None, preset, overrides(task, *extra)))


def frozen_tensors(model) -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


@pytest.mark.parametrize("name", BASELINES)
def test_one_round_changes_exactly_the_trainable_tensors(task, name):
    sim = simulation(task, name)
    preset = PRESETS[name]
    assert (sim.cfg.method.name, sim.cfg.tuning.name) == (preset.method, preset.tuning)
    names = sim.model.trainable_names()
    assert names and all(EXPECTED_NAMES[preset.tuning](n) for n in names), names
    assert sorted(sim.algorithm.shared) == sorted(names)  # baselines share every trainable tensor
    before_frozen = frozen_tensors(sim.model)
    before = {n: t.clone() for n, t in sim.algorithm.params.items()}

    row = sim.train_round(0)

    sim.model.load_trainable(sim.algorithm.params)
    after_frozen = frozen_tensors(sim.model)
    assert after_frozen.keys() == before_frozen.keys()
    changed_frozen = [n for n in before_frozen if not torch.equal(before_frozen[n], after_frozen[n])]
    assert changed_frozen == []
    assert set(sim.algorithm.params) == set(before)
    unchanged = [n for n in names if torch.equal(before[n], sim.algorithm.params[n])]
    assert unchanged == [], f"{name}: trainable tensors the round did not change: {unchanged}"
    # only the sampled clients trained (a client is created on first contact)
    assert sorted(sim.clients) == row["clients"]
    assert all(c.rounds_trained == 1 for c in sim.clients.values())


@pytest.mark.parametrize("name", BASELINES)
def test_payload_has_the_documented_size(task, name, monkeypatch):
    sim = simulation(task, name)
    shared = sim.algorithm.global_shared()
    count = sum(t.numel() for t in shared.values())
    assert count == EXPECTED_PARAMS[name]
    message = sim.algorithm.client_message(0)
    sent = []
    real = payload.num_bytes
    monkeypatch.setattr("fedpeptao.core.payload.num_bytes", lambda tensors: sent.append(sorted(tensors)) or real(tensors))
    row = sim.train_round(0)
    copies = COPIES.get(name, 1)
    n = len(row["clients"])
    per_up, per_down = row["bytes_up"] / n, row["bytes_down"] / n
    for per in (per_up, per_down):
        # float32 values plus a safetensors header (8-byte length + JSON of names, dtypes, shapes, offsets)
        assert 4 * copies * count < per <= 4 * copies * count + 8 + 160 * copies * len(shared)
    assert per_down == real(payload.flatten(message))
    down_keys, up_keys = sent[:n], sent[n:]  # the round encodes every message, then every reply
    assert len(up_keys) == n
    extra_down = {f"{CONTROL}/{k}" for k in shared} if name == "scaffold" else set()
    extra_up = {f"{DELTA_CONTROL}/{k}" for k in shared} if name == "scaffold" else set()
    assert all(set(keys) == set(shared) | extra_down for keys in down_keys)
    assert all(set(keys) == set(shared) | extra_up for keys in up_keys)
    assert sum(t.numel() for t in payload.flatten(message).values()) == copies * count


def test_rules_change_training(task):
    """FedProx, SCAFFOLD (from round 2, once c != c_k), MOON and the server optimisers differ from FedAvg."""
    def two_rounds(name):
        sim = simulation(task, name, "federated.rounds=2")
        sim.train_round(0)
        sim.train_round(1)
        return sim.algorithm.params

    ref = two_rounds("fedavg")
    again = two_rounds("fedavg")  # so a difference below is the rule's, not noise
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    for name in ("fedprox", "scaffold", "moon", "fedadam", "fedyogi", "fedadagrad"):
        other = two_rounds(name)
        assert other.keys() == ref.keys()
        assert any(not torch.allclose(ref[k], other[k]) for k in ref), name


def test_every_tuning_runs_through_the_same_loop(task):
    """One simulator for every preset: the partition and client sampling are fedavg's whatever the tuning."""
    base = simulation(task, "fedavg", "federated.rounds=2")
    h1 = base.run()
    for name in ("lora", "fedprompt"):
        other = simulation(task, name, "federated.rounds=2")
        assert all(np.array_equal(a, b) for a, b in zip(base.train_parts, other.train_parts))
        assert all(np.array_equal(a, b) for a, b in zip(base.eval_parts, other.eval_parts))
        h2 = other.run()
        assert [r["clients"] for r in h1] == [r["clients"] for r in h2]
        summary = other.summary()
        assert (summary["method"], summary["tuning"]) == (PRESETS[name].method, PRESETS[name].tuning)
        assert summary["trainable_parameters"] == EXPECTED_PARAMS[name] == summary["params_per_message"]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in h2)


def test_lora_and_adapters_start_as_the_frozen_model():
    pos = torch.zeros(2, dtype=torch.long)
    frozen = plain(tiny_backbone("bert").model)
    frozen.eval()
    ref = frozen(IDS, MASK, pos).logits
    for settings in (LoraSettings(), AdapterSettings()):
        model = tuned(settings, tiny_backbone("bert").model)
        assert isinstance(model, (LoRAModel, AdapterModel))
        model.eval()
        torch.testing.assert_close(model(IDS, MASK, pos).logits, ref)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # and the new tensors are really in the forward pass
            for name, p in model.named_parameters():
                if p.requires_grad and not name.startswith("head."):
                    p.add_(0.5 * torch.randn(p.shape, generator=gen))
        assert not torch.allclose(model(IDS, MASK, pos).logits, ref), settings.name


def test_late_prompt_is_invisible_below_its_layer():
    ids = torch.tensor([[101, 2204, 3185, 2001, 102], [101, 2919, 102, 0, 0]])
    mask = (ids != 0).long()
    frozen = plain(tiny_backbone("bert", num_layers=4).model)
    late = tuned(LatePromptSettings(num_prompt_tokens=3), tiny_backbone("bert", num_layers=4).model)
    frozen.eval(), late.eval()
    assert late.insert_layer == 2
    ref, out = frozen.layer_outputs(ids, mask), late.layer_outputs(ids, mask)
    assert [h.shape for h in ref] == [h.shape for h in out]  # the prompt positions are cut from the outputs
    for i in range(2):
        torch.testing.assert_close(out[i], ref[i])
    for i in (2, 3):
        assert not torch.allclose(out[i][mask.bool()], ref[i][mask.bool()])
    # padding is still masked: a padded copy of a sentence gives the same outputs as the sentence alone
    alone = late.layer_outputs(ids[1:, :3], mask[1:, :3])
    torch.testing.assert_close(out[-1][1, :3], alone[-1][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder"):
        tuned(LatePromptSettings(num_prompt_tokens=3), tiny_backbone("gpt2").model, "lm", [1, 2])


def test_fedprompt_is_peft_prompt_tuning_prepended_to_the_input():
    model = tuned(InputPromptSettings(num_prompt_tokens=3), tiny_backbone("bert").model)
    assert isinstance(model, FedPromptModel)
    model.eval()
    prompt = model.peft.prompt_encoder["default"].embedding.weight
    assert [n for n in model.trainable_names() if not n.startswith("head.")] == [
        "peft.prompt_encoder.default.embedding.weight"]
    embeds = model.model.get_input_embeddings()(IDS)
    full = model.model(inputs_embeds=torch.cat([prompt.unsqueeze(0).expand(2, -1, -1), embeds], 1),
                       attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), MASK], 1)).last_hidden_state
    torch.testing.assert_close(model.encode(IDS, MASK).last_hidden_state, full[:, 3:])


def test_idpg_prompts_depend_on_the_instance_and_attempt_mixes_prompts():
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 2919, 102]])
    mask = torch.ones_like(ids)
    idpg = tuned(IDPGSettings(num_prompt_tokens=P), tiny_backbone("bert").model)
    assert isinstance(idpg, IDPGModel)
    embeds = idpg.model.get_input_embeddings()(ids)
    generated = idpg.input_prompt(ids, mask, embeds)
    assert generated.shape == (2, P, H) and not torch.allclose(generated[0], generated[1])
    attempt = tuned(AttemptSettings(num_prompt_tokens=P), tiny_backbone("bert").model)
    assert isinstance(attempt, ATTEMPTModel)
    weights = attempt.attention(ids, mask, embeds)
    assert weights.shape == (2, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    mixed = attempt.input_prompt(ids, mask, embeds)
    sources = torch.cat([attempt.source_prompts, attempt.target_prompt.detach().unsqueeze(0)])
    expected = attempt.target_prompt.detach() + torch.einsum("bs,sph->bph", weights.detach(), sources)
    torch.testing.assert_close(mixed.detach(), expected)
    # the source prompts are frozen and never communicated (not trainable, not in the saved state)
    assert not any("source" in n for n in attempt.trainable_names())
    assert not any("source" in n for n in attempt.trainable_state())
    assert not any("source" in n for n in attempt.state_dict())


@pytest.mark.parametrize("arch,head", [("roberta", "mlm"), ("gpt2", "lm"), ("llama", "lm")])
def test_weight_and_input_methods_work_on_other_families(arch, head):
    pos = torch.tensor([2, 1])
    labels = torch.tensor([0, 1])
    words = [2204, 2919]
    for settings in (LoraSettings(), AdapterSettings(), InputPromptSettings(num_prompt_tokens=2),
                     IDPGSettings(num_prompt_tokens=2), AttemptSettings(num_prompt_tokens=2)):
        model = tuned(settings, tiny_backbone(arch, head=head).model, head, words)
        assert model.trainable_names() and not any(n.startswith("head.") for n in model.trainable_names())
        out = model(IDS, MASK, pos, labels)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert out.logits.shape == (2, C) and all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the backbone stays frozen
    if arch == "roberta":  # LPT runs on encoders of the RoBERTa family too
        model = tuned(LatePromptSettings(num_prompt_tokens=2), tiny_backbone(arch, head=head).model, head, words)
        model(IDS, MASK, pos, labels).loss.backward()
        assert float(model.late_prompt.grad.abs().sum()) > 0


def _documented_count(formula: str, sizes: dict[str, int]) -> int:
    """Evaluate a preset's ``parameters`` formula (e.g. ``"H*m + m, m = 32"``) for the trained tensors."""
    formula = formula.replace("(BERT)", "")
    names = dict(sizes)
    expression = None
    for part in (p.strip() for p in formula.split(",")):
        if part.endswith(" shared"):  # FedPepTAO: what a selection shares, not what trains
            continue
        part = re.sub(r"(\d)([A-Za-z])", r"\1*\2", part.removesuffix(" trained"))
        if "=" in part:
            key, value = (s.strip() for s in part.split("="))
            names[key] = eval(value, {}, names)  # our own constant strings
        else:
            expression = part
    return eval(expression, {"ceil": math.ceil}, names)


def test_every_preset_has_a_documented_payload(task):
    from fedpeptao.compare.runner import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # the --methods help as written (the formatted help may break a name at its hyphens)
    help_text = next(a.help for a in parser._actions if "--methods" in a.option_strings)
    for preset in PRESETS.values():
        assert preset.summary and preset.shared and preset.parameters
        assert preset.name in help_text, preset.name
        assert preset.tuning in TUNINGS
        cfg = preset_config(None, preset.name, overrides(task))
        assert (cfg.method.name, cfg.tuning.name) == (preset.method, preset.tuning)
        for setting in preset.settings:  # the preset's own settings win over the shared ones
            key, value = setting.split("=")
            section, field = key.split(".")
            got = getattr(getattr(cfg, section), field)
            assert str(got).lower() == value.lower(), setting
        # the documented formula is the number of trained parameters (without the head) on tiny-bert
        model = tuned(cfg.tuning, tiny_backbone("bert").model)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad) - HEAD
        sizes = {"L": L, "P": P, "kv": H, "H": H, "r": R}
        assert _documented_count(preset.parameters, sizes) == trained, (preset.name, preset.parameters)
    assert len(DEFAULT_PRESETS) == len(set(DEFAULT_PRESETS)) and set(DEFAULT_PRESETS) <= set(PRESETS)
    assert DEFAULT_PRESETS[0] == "fedpeptao" and len(DEFAULT_PRESETS) == 14  # FedPepTAO and the 13 baselines
    assert DELTA_CONTROL != CONTROL


def test_compare_writes_table_plots_and_records(task, tmp_path):
    from fedpeptao.compare.runner import compare_main, run_comparison

    extra = [f"data.task={task}", "model.name=tiny-bert", "federated.num_clients=4",
             "federated.clients_per_round=2", "federated.rounds=2", "client.epochs=1", "client.batch_size=4",
             f"tuning.num_prompt_tokens={P}", "model.max_length=16", "progress=false", "method.ratio=0.5",
             "federated.target_accuracy=0.01"]
    args = argparse.Namespace(config=extra[0], overrides=extra[1:], methods="fedpeptao, lora,scaffold",
                              out=str(tmp_path / "cmp"), resume=False)
    assert compare_main(args) == 0  # what `fedpeptao compare` calls; the first override is no config file
    out = tmp_path / "cmp"
    assert (out / "command.txt").read_text().startswith("fedpeptao compare data.task=")
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["fedpeptao", "lora", "scaffold"]
    assert int(rows[1]["trainable_params"]) == EXPECTED_PARAMS["lora"] == int(rows[1]["params_per_message"])
    assert int(rows[2]["params_per_message"]) == EXPECTED_PARAMS["scaffold"]
    # FedPepTAO with ratio 0.5 of 3 layers shares ceil(1.5) = 2 layers' prompts + head
    assert int(rows[0]["params_per_message"]) == 2 * P * 2 * H + HEAD < int(rows[0]["trainable_params"]) == DEEP
    assert all(r["rounds_to_target"] == "1" for r in rows)  # any accuracy beats 0.01 at the first evaluation
    assert float(rows[2]["mb_communicated"]) > 2 * float(rows[0]["mb_communicated"])  # SCAFFOLD sends 2x, all layers
    md = (out / "compare.md").read_text()
    assert "Command: `fedpeptao compare data.task=" in md and md.count("\n| ") == 4
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = {m: json.loads((out / "runs" / f"{m}.json").read_text()) for m in ("fedpeptao", "lora", "scaffold")}
    assert len({r["partition"] for r in records.values()}) == 1
    assert records["fedpeptao"]["config"]["method"]["name"] == "fedpeptao"
    assert (records["lora"]["config"]["method"]["name"], records["lora"]["config"]["tuning"]["name"]) == (
        "fedavg", "lora")
    assert records["lora"]["config"]["client"]["lr"] == WEIGHT_LR  # the preset's own device lr
    assert all(len(r["history"]) == 2 for r in records.values())
    # --resume reuses finished runs with the same config and reruns the others
    (out / "runs" / "lora.json").write_text(json.dumps({**records["lora"], "wall_s": -1.0}))
    run_comparison(None, ["lora"], extra, out, resume=True)
    assert json.loads((out / "runs" / "lora.json").read_text())["wall_s"] == -1.0
    run_comparison(None, ["lora"], [*extra, "seed=1"], out, resume=True)
    assert json.loads((out / "runs" / "lora.json").read_text())["wall_s"] > 0

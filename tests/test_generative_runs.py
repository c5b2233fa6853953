"""Generative instruction tuning through the round engine: any algorithm with deep prompts or LoRA
on a decoder, evaluated by generating (tiny random LLaMA; the real model is in the benchmark)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedpeptao.config import ConfigError, load_config
from fedpeptao.sim.simulator import Simulation

PLACES = ["basket", "box", "garden", "kitchen"]


def write_instruct(folder: Path, repeat: int = 4) -> Path:
    """A tiny conversational prompt-completion task: where is each thing?"""
    folder.mkdir(parents=True, exist_ok=True)
    things = ["apple", "ball", "cup", "key", "hat", "pen"]
    for name, times in (("train.jsonl", repeat), ("test.jsonl", 1)):
        rows = [{"prompt": [{"role": "user", "content": f"The {t} is in the {p}. Where is the {t}?"}],
                 "completion": [{"role": "assistant", "content": p}]}
                for _ in range(times) for t in things for p in PLACES]
        (folder / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture
def instruct_dir(tmp_path) -> Path:
    return write_instruct(tmp_path / "instruct")


def _run(instruct_dir, *extra: str) -> Simulation:
    sim = Simulation(load_config(None, [
        "model.name=tiny-llama", "model.head=generate", f"data.task={instruct_dir}", "model.max_length=48",
        "federated.num_clients=4", "federated.clients_per_round=2", "federated.rounds=2", "progress=false",
        "generation.max_new_tokens=4", *extra]))
    sim.run()
    return sim


@pytest.mark.parametrize("method", ["fedpeptao", "fedavg", "scaffold", "fedprox"])
@pytest.mark.parametrize("tuning", ["deep_prompt", "lora"])
def test_every_algorithm_tunes_a_decoder_on_instructions_and_is_scored_by_generating(instruct_dir, method, tuning):
    ratio = ["method.ratio=0.5"] if method == "fedpeptao" else []  # FedPepTAO selects layers from the start
    sim = _run(instruct_dir, f"method.name={method}", f"tuning.name={tuning}", *ratio)
    assert sim.metric == "exact_match"
    for row in sim.history:
        assert 0.0 <= row["exact_match"] <= 1.0 and row["metric"] == row["exact_match"] == row["accuracy"]
        assert math.isfinite(row["eval_loss"]) and math.isfinite(row["val_loss"]) and math.isfinite(row["train_loss"])
        assert row["eval_examples"] == 24 and row["trained_clients"] + row["untrained_clients"] == len(
            row["client_accuracy"])
    changed = [n for n, t in sim.algorithm.params.items() if not (t == sim.fed.initial[n]).all()]
    assert changed  # the shared tensors trained


def test_a_classification_metric_or_an_input_dependent_prompt_is_refused_in_one_line(instruct_dir):
    base = ["model.name=tiny-llama", "model.head=generate", f"data.task={instruct_dir}"]
    for extra, key in ((["data.metric=mcc"], "data.metric"), (["tuning.name=idpg"], "tuning.name")):
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            load_config(None, [*base, *extra])


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_real_backbone_runs_on_the_cpu_and_keeps_trainables_fp32(tmp_path, quantization):
    sim = Simulation(load_config(None, [
        "model.name=smollm2-135m", "model.head=generate", f"data.task={write_instruct(tmp_path / 'd', repeat=1)}",
        "data.max_train_examples=12", "data.max_eval_examples=4", "model.max_length=64", "federated.num_clients=2",
        "federated.clients_per_round=2", "federated.rounds=1", "generation.max_new_tokens=2", "progress=false",
        f"model.quantization={quantization}", "method.ratio=0.5", "tuning.num_prompt_tokens=4"]))
    sim.run()
    assert any("Linear8bitLt" in type(m).__name__ or "Linear4bit" in type(m).__name__ for m in sim.model.modules())
    assert all(p.dtype == torch.float32 for p in sim.model.parameters() if p.requires_grad)
    assert math.isfinite(sim.history[-1]["eval_loss"]) and 0.0 <= sim.history[-1]["exact_match"] <= 1.0

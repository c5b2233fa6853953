"""``lora`` (Hu et al., 2022)
    PEFT's LoRA injected into the frozen backbone with :func:`peft.inject_adapter_in_model` (no
    ``PeftModel`` wrapper, so the tuned model keeps calling the backbone as before). ``r = 8``,
    ``lora_alpha = 16``, no LoRA dropout, on PEFT's default target modules for the architecture
    (BERT/RoBERTa ``query``/``value``, GPT-2 ``c_attn``, LLaMA ``q_proj``/``v_proj``). ``B`` starts at
    zero, so the first forward pass equals the frozen model's. Trainable per target module
    ``r * (d_in + d_out)`` (+ the task's head); for BERT: ``L * 2 * r * 2H``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedpeptao.models.tuned import TunedModel
from fedpeptao.tunings.base import TuningSettings, register_tuning


class LoraSettings(TuningSettings):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    target_modules: list[str] | None = None  # None: PEFT's defaults for the architecture
    per_layer = True


class LoRAModel(TunedModel):
    def __init__(self, model, task, seed: int = 0, rank: int = 8, alpha: int = 16,
                 target_modules: list[str] | None = None):
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

        super().__init__(model, task)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.model)
        if not any("lora_" in n for n, p in self.named_parameters() if p.requires_grad):
            raise ValueError(f"lora: PEFT found no target modules in {type(model).__name__}")
        self.lora_rank = rank


@register_tuning(LoraSettings)
def build(settings: LoraSettings, model, task, generator: torch.Generator, seed: int) -> LoRAModel:
    return LoRAModel(model, task, seed, settings.r, settings.alpha, settings.target_modules)

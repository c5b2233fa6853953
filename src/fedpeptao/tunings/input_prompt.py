"""Input prompt tuning: ``input_prompt`` -- prompt tuning on the input only (Lester et al., 2021; FedPrompt, Zhao et al., 2023)
    PEFT's own implementation: ``PeftModelForFeatureExtraction`` with ``PromptTuningConfig``
    (``prompt_tuning_init="SAMPLE_VOCAB"``: initialised from random vocabulary embeddings, seeded).
    Trainable: ``P x H`` prompt (+ the task's head).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedpeptao.models.tuned import TunedModel
from fedpeptao.tunings.base import TuningSettings, register_tuning
from fedpeptao.tunings.common import strip_prompt, wrap_with_peft


class InputPromptSettings(TuningSettings):
    name: Literal["input_prompt"] = "input_prompt"
    num_prompt_tokens: int = Field(20, ge=1, le=512)


class FedPromptModel(TunedModel):
    """Input prompt tuning through PEFT's ``PromptTuningConfig`` (the prompt lives in PEFT's module)."""

    def __init__(self, model, task, num_tokens: int, seed: int = 0):
        super().__init__(model, task)
        from peft import PromptTuningConfig  # noqa: PLC0415

        self.num_input_tokens = num_tokens
        config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=num_tokens,
                                    prompt_tuning_init="SAMPLE_VOCAB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.peft = wrap_with_peft(self.body(), config)
        for name, param in self.peft.named_parameters():
            param.requires_grad_(name.startswith("prompt_encoder."))

    def encode(self, input_ids, attention_mask, hidden_states: bool = False):
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states,
                        return_dict=True)
        return strip_prompt(out, self.num_input_tokens)


@register_tuning(InputPromptSettings)
def build(settings: InputPromptSettings, model, task, generator: torch.Generator, seed: int) -> FedPromptModel:
    return FedPromptModel(model, task, settings.num_prompt_tokens, seed)

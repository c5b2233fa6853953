"""``deep_prompt`` -- P-tuning v2 (Liu et al., 2022), FedPepTAO's tuning: trainable key/value
prefixes in every attention layer of the frozen backbone, one group per layer (SPEC section 1).

The mechanism (a prefix-aware attention function registered with transformers'
``AttentionInterface``) is in :mod:`fedpeptao.prompts.prefix`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedpeptao.models.tuned import TunedModel
from fedpeptao.prompts.prefix import DeepPrompt, attach, attention_shape
from fedpeptao.tunings.base import TuningSettings, register_tuning


class DeepPromptSettings(TuningSettings):
    name: Literal["deep_prompt"] = "deep_prompt"
    num_prompt_tokens: int = Field(20, ge=1, le=512)
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    per_layer = True


class DeepPromptModel(TunedModel):
    """The backbone with a :class:`DeepPrompt` in ``layers`` (None: every layer) of its attention.

    Position ids shift by the prompt length, as a key/value cache of that length would give.
    """

    def __init__(self, model, task, num_prompt_tokens: int, prompt_dropout: float = 0.1,
                 generator: torch.Generator | None = None, layers: list[int] | None = None) -> None:
        super().__init__(model, task)
        num_layers, num_kv_heads, head_dim = attention_shape(model.config)
        self.prompt = DeepPrompt(num_layers, num_prompt_tokens, num_kv_heads, head_dim, prompt_dropout,
                                 generator=generator, layers=layers)
        self.num_prefix_positions = num_prompt_tokens
        attach(model, self.prompt)


@register_tuning(DeepPromptSettings)
def build(settings: DeepPromptSettings, model, task, generator: torch.Generator, seed: int) -> DeepPromptModel:
    return DeepPromptModel(model, task, settings.num_prompt_tokens, settings.prompt_dropout, generator)

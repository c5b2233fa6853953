"""``deep_prompt`` -- P-tuning v2 (Liu et al., 2022), FedPepTAO's tuning: trainable key/value
prefixes in every attention layer of the frozen backbone, one group per layer (SPEC section 1).

The mechanism (a prefix-aware attention function registered with transformers'
``AttentionInterface``) is in :mod:`fedpeptao.prompts.prefix`; the classifier and its heads in
:mod:`fedpeptao.models.classifier`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.tunings.base import TuningSettings, register_tuning


class DeepPromptSettings(TuningSettings):
    name: Literal["deep_prompt"] = "deep_prompt"
    num_prompt_tokens: int = Field(20, ge=1, le=512)
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    per_layer = True


@register_tuning(DeepPromptSettings)
def build(settings: DeepPromptSettings, model, head: str, num_labels: int, label_word_ids: list[int] | None,
          seed: int) -> PromptedClassifier:
    return PromptedClassifier(model, head, num_labels, settings.num_prompt_tokens, label_word_ids,
                              settings.prompt_dropout, seed=seed)

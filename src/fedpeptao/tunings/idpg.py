"""``idpg`` -- instance-dependent prompt generation (Wu et al., 2022), single-layer (S-IDPG) form
    A first, no-grad pass of the frozen backbone without prompts gives the sentence vector ``r``
    (mean-pooled last hidden state); a bottleneck generator ``W2 tanh(W1 r + b1) + b2`` (``H -> m -> P*H``,
    ``m = 32``; the paper uses PHM layers, we use plain linear ones) gives this example's ``P x H``
    input prompt. ``b2`` starts as random vocabulary embeddings and ``W2`` at N(0, 0.02), so training
    starts from a near-static prompt. Trainable: ``H*m + m + m*P*H + P*H`` (+ the task's head). Costs one extra
    no-grad forward pass per batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedpeptao.tunings.base import TuningSettings, register_tuning
from fedpeptao.tunings.common import INIT_STD, InputPromptModel, hidden_size, sample_vocab


class IDPGSettings(TuningSettings):
    name: Literal["idpg"] = "idpg"
    num_prompt_tokens: int = Field(20, ge=1, le=512)
    bottleneck: int = Field(32, ge=1)


class IDPGModel(InputPromptModel):
    def __init__(self, model, task, num_tokens: int, seed: int = 0, bottleneck: int = 32):
        super().__init__(model, task)
        hidden = hidden_size(model)
        generator = torch.Generator().manual_seed(seed + 1)
        self.num_input_tokens = num_tokens
        self.generator_in = nn.Linear(hidden, bottleneck)
        self.generator_out = nn.Linear(bottleneck, num_tokens * hidden)
        with torch.no_grad():
            self.generator_in.weight.normal_(0.0, INIT_STD, generator=generator)
            self.generator_in.bias.zero_()
            self.generator_out.weight.normal_(0.0, INIT_STD, generator=generator)
            self.generator_out.bias.copy_(sample_vocab(model, num_tokens, generator).reshape(-1))

    def sentence_vector(self, input_ids, attention_mask) -> torch.Tensor:
        """Mean-pooled last hidden state of the frozen backbone without any prompt (no gradient)."""
        with torch.no_grad():
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def input_prompt(self, input_ids, attention_mask, embeds):
        r = self.sentence_vector(input_ids, attention_mask).to(self.generator_in.weight.dtype)
        prompt = self.generator_out(torch.tanh(self.generator_in(r)))
        return prompt.view(len(r), self.num_input_tokens, -1)


@register_tuning(IDPGSettings)
def build(settings: IDPGSettings, model, task, generator: torch.Generator, seed: int) -> IDPGModel:
    return IDPGModel(model, task, settings.num_prompt_tokens, seed, settings.bottleneck)

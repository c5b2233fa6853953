"""``attempt`` -- attentional mixture of soft prompts (Asai et al., 2022)
    ``S = 4`` *source* prompts and one *target* prompt, each ``P x H``; an attention module
    ``h = LayerNorm(W_up SiLU(W_down x))`` on the max-pooled input embeddings ``x`` (``H -> r -> H``,
    ``r = 32``) scores every prompt by its max-pooled key, ``a = softmax(k_j . h / (H))`` over the
    source prompts and the target prompt, and the input prompt is ``P_target + sum_j a_j P_j``.
    **No pretrained source prompts are available here** (ATTEMPT trains them on large source tasks
    first), so the source prompts are random vocabulary embeddings drawn from the seed, frozen,
    identical on every client and never communicated: this is ATTEMPT's mechanism without its
    transfer, and it should be read as such. Trainable: target prompt ``P*H``, ``W_down``
    (``H*r + r``), ``W_up`` (``r*H + H``), LayerNorm (``2H``) (+ the task's head).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedpeptao.tunings.base import TuningSettings, register_tuning
from fedpeptao.tunings.common import INIT_STD, InputPromptModel, hidden_size, sample_vocab


class AttemptSettings(TuningSettings):
    name: Literal["attempt"] = "attempt"
    num_prompt_tokens: int = Field(20, ge=1, le=512)
    num_sources: int = Field(4, ge=1)
    bottleneck: int = Field(32, ge=1)


class ATTEMPTModel(InputPromptModel):
    def __init__(self, model, task, num_tokens: int, seed: int = 0, num_sources: int = 4, bottleneck: int = 32):
        super().__init__(model, task)
        hidden = hidden_size(model)
        generator = torch.Generator().manual_seed(seed + 2)
        self.num_input_tokens = num_tokens
        sources = sample_vocab(model, num_sources * num_tokens, generator).view(num_sources, num_tokens, hidden)
        self.register_buffer("source_prompts", sources, persistent=False)  # frozen, never communicated
        self.target_prompt = nn.Parameter(sample_vocab(model, num_tokens, generator))
        self.attn_down = nn.Linear(hidden, bottleneck)
        self.attn_up = nn.Linear(bottleneck, hidden)
        self.attn_norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            for layer in (self.attn_down, self.attn_up):
                layer.weight.normal_(0.0, INIT_STD, generator=generator)
                layer.bias.zero_()
        self.temperature = float(hidden)

    def attention(self, input_ids, attention_mask, embeds) -> torch.Tensor:
        """``[B, S + 1]`` weights over the source prompts and the target prompt."""
        masked = embeds.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(embeds.dtype).min)
        x = masked.max(dim=1).values.to(self.attn_down.weight.dtype)  # max-pooled input embeddings [B, H]
        h = self.attn_norm(self.attn_up(nn.functional.silu(self.attn_down(x))))
        prompts = torch.cat([self.source_prompts, self.target_prompt.unsqueeze(0)], dim=0)  # [S+1, P, H]
        keys = prompts.max(dim=1).values  # [S+1, H]
        return torch.softmax(h @ keys.T / self.temperature, dim=-1)

    def input_prompt(self, input_ids, attention_mask, embeds):
        weights = self.attention(input_ids, attention_mask, embeds)
        prompts = torch.cat([self.source_prompts, self.target_prompt.unsqueeze(0)], dim=0)
        mixture = torch.einsum("bs,sph->bph", weights, prompts)
        return self.target_prompt.unsqueeze(0) + mixture


@register_tuning(AttemptSettings)
def build(settings: AttemptSettings, model, task, generator: torch.Generator, seed: int) -> ATTEMPTModel:
    return ATTEMPTModel(model, task, settings.num_prompt_tokens, seed, settings.num_sources, settings.bottleneck)

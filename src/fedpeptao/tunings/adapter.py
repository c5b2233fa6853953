"""``adapter`` (Houlsby et al., 2019, in the Pfeiffer et al., 2021 placement)
    One bottleneck ``h + W_up ReLU(W_down h + b_down) + b_up`` per layer on the output of the FFN's
    output projection, before the residual connection and LayerNorm (BERT ``output.dense``, GPT-2
    ``mlp.c_proj``, LLaMA ``mlp.down_proj``), reduction factor 16 (``m = H // 16``). ``W_up``/``b_up``
    start at zero (identity at init), ``W_down`` at N(0, 0.02). Trainable per layer
    ``H*m + m + m*H + H`` (+ the task's head). Written here because the maintained library for it (AdapterHub
    ``adapters`` 1.3) requires transformers ~=4.57 and PEFT has no bottleneck adapter.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedpeptao.models.tuned import TunedModel
from fedpeptao.tunings.base import TuningSettings, register_tuning
from fedpeptao.tunings.common import INIT_STD, hidden_size


class AdapterSettings(TuningSettings):
    name: Literal["adapter"] = "adapter"
    reduction: int = Field(16, ge=1)  # bottleneck m = H // reduction
    per_layer = True


# where each layer's FFN output projection lives, per architecture family
_FFN_OUT = (re.compile(r"(?:^|\.)layer\.(\d+)\.output\.dense$"),  # BERT, RoBERTa
            re.compile(r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$"),  # GPT-2
            re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$"))  # LLaMA, Mistral, Qwen, SmolLM


class Adapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            self.down.weight.normal_(0.0, INIT_STD, generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck in the adapter's own dtype (float32 under a bf16 backbone)."""
        x = h.to(self.down.weight.dtype)
        return h + self.up(torch.relu(self.down(x))).to(h.dtype)


def ffn_outputs(model) -> dict[int, nn.Module]:
    """Layer index -> that layer's FFN output projection module."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        for pattern in _FFN_OUT:
            match = pattern.search(name)
            if match:
                found[int(match.group(1))] = module
    num_layers = model.config.get_text_config().num_hidden_layers
    if sorted(found) != list(range(num_layers)):
        raise ValueError(f"adapter: cannot find the FFN output projection of every layer of {type(model).__name__}")
    return found


class AdapterModel(TunedModel):
    def __init__(self, model, task, seed: int = 0, reduction: int = 16):
        super().__init__(model, task)
        hidden = hidden_size(model)
        bottleneck = max(1, hidden // reduction)
        generator = torch.Generator().manual_seed(seed + 4)
        targets = ffn_outputs(model)
        self.adapters = nn.ModuleDict({str(i): Adapter(hidden, bottleneck, generator) for i in sorted(targets)})
        self.adapter_size = bottleneck
        self._hooks = [module.register_forward_hook(self._hook(i)) for i, module in targets.items()]

    def _hook(self, index: int):
        def hook(_module, _args, output):
            return self.adapters[str(index)](output)

        return hook


@register_tuning(AdapterSettings)
def build(settings: AdapterSettings, model, task, generator: torch.Generator, seed: int) -> AdapterModel:
    return AdapterModel(model, task, seed, settings.reduction)

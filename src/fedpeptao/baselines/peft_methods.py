"""Weight-side parameter-efficient baselines: LoRA (through PEFT) and bottleneck adapters (our own).

Both keep :class:`~fedpeptao.models.classifier.PromptedClassifier`'s heads and API, with no deep
prompt (``prompt_layers=[]``, so positions are not shifted either).

``lora`` (Hu et al., 2022)
    PEFT's LoRA injected into the frozen backbone with :func:`peft.inject_adapter_in_model` (no
    ``PeftModel`` wrapper, so our classifier keeps calling the backbone as before). ``r = 8``,
    ``lora_alpha = 16``, no LoRA dropout, on PEFT's default target modules for the architecture
    (BERT/RoBERTa ``query``/``value``, GPT-2 ``c_attn``, LLaMA ``q_proj``/``v_proj``). ``B`` starts at
    zero, so the first forward pass equals the frozen model's. Trainable per target module
    ``r * (d_in + d_out)`` (+ head); for BERT: ``L * 2 * r * 2H``.
``adapter`` (Houlsby et al., 2019, in the Pfeiffer et al., 2021 placement)
    One bottleneck ``h + W_up ReLU(W_down h + b_down) + b_up`` per layer on the output of the FFN's
    output projection, before the residual connection and LayerNorm (BERT ``output.dense``, GPT-2
    ``mlp.c_proj``, LLaMA ``mlp.down_proj``), reduction factor 16 (``m = H // 16``). ``W_up``/``b_up``
    start at zero (identity at init), ``W_down`` at N(0, 0.02). Trainable per layer
    ``H*m + m + m*H + H`` (+ head). Written here because the maintained library for it (AdapterHub
    ``adapters`` 1.3) requires transformers ~=4.57 and PEFT has no bottleneck adapter.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedpeptao.baselines.prompts import INIT_STD, _NoDeepPrompt, _hidden_size

LORA_RANK, LORA_ALPHA = 8, 16
ADAPTER_REDUCTION = 16
# where each layer's FFN output projection lives, per architecture family
_FFN_OUT = (re.compile(r"(?:^|\.)layer\.(\d+)\.output\.dense$"),  # BERT, RoBERTa
            re.compile(r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$"),  # GPT-2
            re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$"))  # LLaMA, Mistral, Qwen, SmolLM


class LoRAClassifier(_NoDeepPrompt):
    def __init__(self, model, head, num_labels, label_word_ids=None, seed: int = 0, rank: int = LORA_RANK,
                 alpha: int = LORA_ALPHA, target_modules: list[str] | None = None):
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

        super().__init__(model, head, num_labels, label_word_ids, seed)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.model)
        if not any("lora_" in n for n, p in self.named_parameters() if p.requires_grad):
            raise ValueError(f"lora: PEFT found no target modules in {type(model).__name__}")
        self.lora_rank = rank


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
        return h + self.up(torch.relu(self.down(h)))


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


class AdapterClassifier(_NoDeepPrompt):
    def __init__(self, model, head, num_labels, label_word_ids=None, seed: int = 0,
                 reduction: int = ADAPTER_REDUCTION):
        super().__init__(model, head, num_labels, label_word_ids, seed)
        hidden = _hidden_size(model)
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

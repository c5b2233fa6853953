"""``late_prompt`` (LPT) -- late prompt tuning (Liu et al., 2022), without the neural prompt generator
    ``P`` trainable hidden-state vectors are prepended to the hidden states entering layer
    ``L // 2`` (by default) and pass through that layer and every later one like tokens; the layers
    below never see them. Implemented with forward pre-hooks on the encoder layers (layer ``l`` gets
    the prompt prepended; layers ``>= l`` get ``P`` always-visible rows/columns added to their
    attention mask). Supported for encoder backbones (BERT/RoBERTa family: layers called as
    ``layer(hidden_states, attention_mask, ...)``), which is where LPT was defined; decoders raise.
    Init N(0, 0.02) (the paper's static-prompt variant leaves the init open). Trainable:
    ``P x H`` (+ the task's head). The paper's instance-dependent generator variant is not implemented.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedpeptao.models.tuned import TunedModel
from fedpeptao.tunings.base import TuningSettings, register_tuning
from fedpeptao.tunings.common import INIT_STD, hidden_size, strip_prompt


class LatePromptSettings(TuningSettings):
    name: Literal["late_prompt"] = "late_prompt"
    num_prompt_tokens: int = Field(20, ge=1, le=512)
    layer: int | None = Field(None, ge=0)  # insertion layer; None: L // 2


def encoder_layers(model) -> nn.ModuleList:
    """The transformer layers of a BERT/RoBERTa-style encoder, or ValueError."""
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    config = model.config.get_text_config()
    if layers is None or getattr(config, "is_decoder", False):
        raise ValueError(f"lpt: late prompts are implemented for encoder backbones (BERT/RoBERTa family); "
                         f"{type(model).__name__} is not one")
    params = list(inspect.signature(layers[0].forward).parameters)
    if params[:2] != ["hidden_states", "attention_mask"]:
        raise ValueError(f"lpt: {type(layers[0]).__name__} does not take (hidden_states, attention_mask, ...)")
    return layers


def _extend_mask(mask: torch.Tensor | None, num: int) -> torch.Tensor | None:
    """Add ``num`` always-visible prompt keys (columns) and prompt queries (rows) to a layer's mask."""
    if mask is None:
        return None
    visible = True if mask.dtype == torch.bool else 0.0
    if mask.dim() == 2:  # [B, T] padding mask
        return torch.cat([torch.full((mask.shape[0], num), visible, dtype=mask.dtype, device=mask.device), mask], 1)
    batch, heads, q_len, _ = mask.shape
    cols = torch.full((batch, heads, q_len, num), visible, dtype=mask.dtype, device=mask.device)
    mask = torch.cat([cols, mask], dim=-1)
    if q_len == 1:  # broadcast over queries: one row serves the prompt queries too
        return mask
    # an encoder mask only hides padded keys, so every query row is alike: the prompt rows copy row 0
    return torch.cat([mask[:, :, :1].expand(batch, heads, num, mask.shape[-1]), mask], dim=2)


class LatePromptModel(TunedModel):
    def __init__(self, model, task, num_tokens: int, seed: int = 0, layer: int | None = None):
        super().__init__(model, task)
        layers = encoder_layers(model)
        self.insert_layer = len(layers) // 2 if layer is None else layer
        if not 0 <= self.insert_layer < len(layers):
            raise ValueError(f"lpt: layer {self.insert_layer} outside 0..{len(layers) - 1}")
        self.num_input_tokens = num_tokens
        generator = torch.Generator().manual_seed(seed + 3)
        self.late_prompt = nn.Parameter(torch.randn(num_tokens, hidden_size(model), generator=generator) * INIT_STD)
        self._hooks = [layers[i].register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
                       for i in range(self.insert_layer, len(layers))]

    def _pre_hook(self, index: int):
        def hook(_module, args, kwargs):
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == self.insert_layer:
                prompt = self.late_prompt.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
                hidden = torch.cat([prompt, hidden], dim=1)
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
            if len(args) > 1:
                args[1] = _extend_mask(args[1], self.num_input_tokens)
            elif "attention_mask" in kwargs:
                kwargs["attention_mask"] = _extend_mask(kwargs["attention_mask"], self.num_input_tokens)
            return tuple(args), kwargs

        return hook

    def encode(self, input_ids, attention_mask, hidden_states: bool = False):
        out = super().encode(input_ids, attention_mask, hidden_states)
        # hidden_states[0] is the embedding output; hidden_states[j] the output of layer j - 1
        return strip_prompt(out, self.num_input_tokens, start_layer=self.insert_layer + 1)


@register_tuning(LatePromptSettings)
def build(settings: LatePromptSettings, model, task, generator: torch.Generator, seed: int) -> LatePromptModel:
    return LatePromptModel(model, task, settings.num_prompt_tokens, seed, settings.layer)

"""What several tunings share: vocabulary-sampled inits, cutting prompt positions, input prompts, PEFT wrapping.

Input-level prompts follow PEFT's prompt tuning exactly:
``P`` vectors prepended to the input embeddings, ``P`` ones prepended to the attention mask, no
explicit position ids (so the text sits at positions ``P..P+T-1``). The prompt positions are cut
from the outputs again, so every task reads the text tokens where it always does.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from fedpeptao.models.tuned import TunedModel

INIT_STD = 0.02


def wrap_with_peft(model, config):
    """``peft.get_peft_model``, without the FutureWarning PEFT triggers by reading transformers'
    deprecated ``is_gradient_checkpointing`` (printed on every call, nothing a user can act on)."""
    from peft import get_peft_model  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


def sample_vocab(model, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows of the input embedding matrix, chosen at random (prompt-tuning's usual init)."""
    weight = model.get_input_embeddings().weight.detach()
    idx = torch.randint(0, weight.shape[0], (count,), generator=generator)
    return weight[idx].clone().float()


def strip_prompt(out, num: int, start_layer: int = 0):
    """Drop ``num`` leading prompt positions from a model output (hidden states of layers >= start)."""
    fields = {}
    if getattr(out, "last_hidden_state", None) is not None:
        fields["last_hidden_state"] = out.last_hidden_state[:, num:]
    if getattr(out, "logits", None) is not None:
        fields["logits"] = out.logits[:, num:]
    if getattr(out, "hidden_states", None) is not None:
        fields["hidden_states"] = tuple(h[:, num:] if i >= start_layer else h for i, h in enumerate(out.hidden_states))
    else:
        fields["hidden_states"] = None
    return SimpleNamespace(**fields)


class InputPromptModel(TunedModel):
    """Prepends a (possibly per-example) ``[B, P, H]`` prompt to the input embeddings."""

    num_input_tokens: int

    def input_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, input_ids, attention_mask, hidden_states: bool = False):
        embeds = self.model.get_input_embeddings()(input_ids)
        prompt = self.input_prompt(input_ids, attention_mask, embeds).to(embeds.dtype)
        num = prompt.shape[1]
        mask = torch.cat([torch.ones(attention_mask.shape[0], num, dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        out = self.body()(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask,
                                  output_hidden_states=hidden_states, return_dict=True)
        return strip_prompt(out, num)

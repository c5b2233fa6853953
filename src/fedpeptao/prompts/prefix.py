"""Deep prompts (P-tuning v2): one trainable key/value prefix per transformer layer.

The prefix is injected through a custom attention function registered with
``transformers.AttentionInterface`` instead of a ``past_key_values``/``cache`` argument.
That keeps us independent of the cache-argument rename in transformers 5.24 (SPEC section 7),
works for every architecture that routes attention through the interface (BERT, RoBERTa,
GPT-2, LLaMA/SmolLM2, ...), and makes per-layer exchange simply ``prompt.layers[i]``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "fedpeptao_prefix"
_PROMPT_ATTR = "_fedpeptao_prompt"


class DeepPrompt(nn.Module):
    """Per-layer prefixes, each ``[P, 2, num_kv_heads * head_dim]`` (keys, values), init N(0, 0.02).

    Kept as one parameter per layer so that a layer can be read, replaced, shared or kept
    private on its own: the unit FedPepTAO selects and communicates.
    """

    def __init__(
        self,
        num_layers: int,
        num_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        dropout: float = 0.1,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_model_layers = num_layers
        # Which model layers carry a prefix: all of them for P-tuning v2, a subset for
        # late/partial prompt variants. Stored as strings because ParameterDict keys must be.
        active = list(range(num_layers)) if layers is None else sorted(set(layers))
        width = num_kv_heads * head_dim
        self.layers = nn.ParameterDict(
            {
                str(i): nn.Parameter(torch.randn(num_tokens, 2, width, generator=generator) * init_std)
                for i in active
            }
        )
        self.dropout = nn.Dropout(dropout)
        #: slot mode (:mod:`fedpeptao.models.slots`): each slot's layer tensors, and each batch row's slot
        self.slots: tuple[list[dict[int, torch.Tensor]], torch.Tensor] | None = None

    @property
    def active_layers(self) -> list[int]:
        return sorted(int(k) for k in self.layers.keys())

    def get_layer(self, index: int) -> torch.Tensor:
        return self.layers[str(index)].detach().clone()

    def set_layer(self, index: int, value: torch.Tensor) -> None:
        param = self.layers[str(index)]
        if value.shape != param.shape:
            raise ValueError(f"prompt layer {index}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
        with torch.no_grad():
            param.copy_(value)

    def key_value(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prefix keys and values for one layer as ``[B, H_kv, P, d]``, or None if it has none.

        In slot mode each slot's own prefix is expanded over its rows of the batch.
        """
        if str(index) not in self.layers:
            return None
        if self.slots is None:
            kv = self._split(self.dropout(self.layers[str(index)]).unsqueeze(0))  # [2, 1, H_kv, P, d]
            return kv[0].expand(batch_size, -1, -1, -1), kv[1].expand(batch_size, -1, -1, -1)
        tensors, owner = self.slots
        # every slot's prefix in one stack, one dropout and one gather of each row's own slot: a
        # few operations per layer however many clients share the pass
        kv = self._split(self.dropout(torch.stack([slot[index] for slot in tensors])))[:, owner]
        return kv[0], kv[1]

    def _split(self, stacked: torch.Tensor) -> torch.Tensor:
        """``[S, P, 2, H_kv * d]`` prefixes as ``[2 (key, value), S, H_kv, P, d]``."""
        return stacked.view(-1, self.num_tokens, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)


def _prefix_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key_len: int, num_prefix: int,
                 causal: bool) -> torch.Tensor | None:
    """Extend the model's mask with ``num_prefix`` always-visible columns on the left."""
    batch, _, q_len, _ = query.shape
    if attention_mask is None:
        if not causal:
            return None
        # Causal with no padding: transformers skipped the mask; rebuild it for the longer key.
        total = num_prefix + key_len
        mask = torch.ones(q_len, total, dtype=torch.bool, device=query.device).tril(diagonal=total - q_len)
        return mask.view(1, 1, q_len, total)
    visible = torch.ones(attention_mask.shape[:-1] + (num_prefix,), dtype=torch.bool, device=attention_mask.device)
    if attention_mask.dtype != torch.bool:  # additive float mask: 0 means visible
        visible = torch.zeros(visible.shape, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([visible, attention_mask], dim=-1)


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs):
    """SDPA attention with this layer's prompt prepended to its keys and values."""
    prompt: DeepPrompt | None = getattr(module, _PROMPT_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    prefix = prompt.key_value(layer, query.shape[0]) if prompt is not None and layer is not None else None
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    prefix_key, prefix_value = prefix
    causal = query.shape[2] > 1 and bool(kwargs.pop("is_causal", None) or getattr(module, "is_causal", False))
    mask = _prefix_mask(attention_mask, query, key.shape[2], prefix_key.shape[2], causal)
    key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers config; GQA aware."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = text_config.num_hidden_layers
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return num_layers, num_kv_heads, head_dim


def attach(model: PreTrainedModel, prompt: DeepPrompt) -> None:
    """Route every self-attention layer of ``model`` through the prompt.

    The prompt is stored on the attention modules with ``object.__setattr__`` so it does not
    become a submodule of the backbone: the backbone's parameters stay exactly the frozen
    pretrained ones, and one backbone can serve many prompts (one per simulated client).
    """
    found = set()
    for module in model.modules():
        if getattr(module, "layer_idx", None) is not None and not getattr(module, "is_cross_attention", False):
            object.__setattr__(module, _PROMPT_ATTR, prompt)
            found.add(module.layer_idx)
    expected = set(range(prompt.num_model_layers))
    if not expected <= found:
        raise ValueError(
            f"{type(model).__name__}: deep prompts need attention modules with layer_idx for layers "
            f"{sorted(expected - found)}; this architecture is not supported"
        )
    model.set_attn_implementation(ATTENTION_NAME)


def position_ids(model: PreTrainedModel, attention_mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Position ids shifted by the prefix length, as a key/value cache of length P would give.

    This is what P-tuning v2 and PEFT's prefix tuning do, so our logits equal theirs. RoBERTa-style
    embeddings count from ``padding_idx + 1`` and give padding the id ``padding_idx``.
    """
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    steps = attention_mask.long().cumsum(-1) - 1
    if padding_idx is None:
        return (steps + num_prefix).clamp(min=num_prefix)
    return torch.where(attention_mask.bool(), steps + num_prefix + padding_idx + 1, padding_idx)


def max_text_length(model: PreTrainedModel, num_prefix: int, requested: int) -> int:
    """Longest token sequence that still fits the position table once shifted by the prefix."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if limit is None:
        return requested
    embeddings = getattr(model.base_model, "embeddings", None)
    if getattr(embeddings, "padding_idx", None) is not None:
        limit -= embeddings.padding_idx + 1
    return max(1, min(requested, limit - num_prefix))

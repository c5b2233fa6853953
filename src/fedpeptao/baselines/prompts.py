"""Prompt baselines other than P-tuning v2: input prompt tuning, late prompts, IDPG and ATTEMPT.

All are :class:`~fedpeptao.models.classifier.PromptedClassifier` subclasses with no deep prompt
(``prompt_layers=[]``) that keep its heads, trainable-state API and forward; they only change how
the backbone is run (``_base_outputs``). Input-level prompts follow PEFT's prompt tuning exactly:
``P`` vectors prepended to the input embeddings, ``P`` ones prepended to the attention mask, no
explicit position ids (so the text sits at positions ``P..P+T-1``). The prompt positions are cut
from the outputs again, so every head reads the text tokens where it always does.

``fedprompt`` -- prompt tuning on the input only (Lester et al., 2021; FedPrompt, Zhao et al., 2023)
    PEFT's own implementation: ``PeftModelForFeatureExtraction`` with ``PromptTuningConfig``
    (``prompt_tuning_init="SAMPLE_VOCAB"``: initialised from random vocabulary embeddings, seeded).
    Trainable: ``P x H`` prompt (+ head).
``lpt`` -- late prompt tuning (Liu et al., 2022), without the neural prompt generator
    ``P`` trainable hidden-state vectors are prepended to the hidden states entering layer
    ``L // 2`` (by default) and pass through that layer and every later one like tokens; the layers
    below never see them. Implemented with forward pre-hooks on the encoder layers (layer ``l`` gets
    the prompt prepended; layers ``>= l`` get ``P`` always-visible rows/columns added to their
    attention mask). Supported for encoder backbones (BERT/RoBERTa family: layers called as
    ``layer(hidden_states, attention_mask, ...)``), which is where LPT was defined; decoders raise.
    Init N(0, 0.02) (the paper's static-prompt variant leaves the init open). Trainable:
    ``P x H`` (+ head). The paper's instance-dependent generator variant is not implemented.
``idpg`` -- instance-dependent prompt generation (Wu et al., 2022), single-layer (S-IDPG) form
    A first, no-grad pass of the frozen backbone without prompts gives the sentence vector ``r``
    (mean-pooled last hidden state); a bottleneck generator ``W2 tanh(W1 r + b1) + b2`` (``H -> m -> P*H``,
    ``m = 32``; the paper uses PHM layers, we use plain linear ones) gives this example's ``P x H``
    input prompt. ``b2`` starts as random vocabulary embeddings and ``W2`` at N(0, 0.02), so training
    starts from a near-static prompt. Trainable: ``H*m + m + m*P*H + P*H`` (+ head). Costs one extra
    no-grad forward pass per batch.
``attempt`` -- attentional mixture of soft prompts (Asai et al., 2022)
    ``S = 4`` *source* prompts and one *target* prompt, each ``P x H``; an attention module
    ``h = LayerNorm(W_up SiLU(W_down x))`` on the max-pooled input embeddings ``x`` (``H -> r -> H``,
    ``r = 32``) scores every prompt by its max-pooled key, ``a = softmax(k_j . h / (H))`` over the
    source prompts and the target prompt, and the input prompt is ``P_target + sum_j a_j P_j``.
    **No pretrained source prompts are available here** (ATTEMPT trains them on large source tasks
    first), so the source prompts are random vocabulary embeddings drawn from the seed, frozen,
    identical on every client and never communicated: this is ATTEMPT's mechanism without its
    transfer, and it should be read as such. Trainable: target prompt ``P*H``, ``W_down``
    (``H*r + r``), ``W_up`` (``r*H + H``), LayerNorm (``2H``) (+ head).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from torch import nn

from fedpeptao.models.classifier import PromptedClassifier

INIT_STD = 0.02


def _hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


def _sample_vocab(model, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows of the input embedding matrix, chosen at random (prompt-tuning's usual init)."""
    weight = model.get_input_embeddings().weight.detach()
    idx = torch.randint(0, weight.shape[0], (count,), generator=generator)
    return weight[idx].clone().float()


def _strip(out, num: int, start_layer: int = 0):
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


class _NoDeepPrompt(PromptedClassifier):
    """A PromptedClassifier with no deep prompt: heads and trainable-state API only."""

    def __init__(self, model, head, num_labels, label_word_ids=None, seed: int = 0):
        super().__init__(model, head, num_labels, 0, label_word_ids, prompt_dropout=0.0, prompt_layers=[], seed=seed)

    def _base_module(self):
        return self.model.base_model if self.head_kind != "mlm" else self.model


class InputPromptClassifier(_NoDeepPrompt):
    """Prepends a (possibly per-example) ``[B, P, H]`` prompt to the input embeddings."""

    num_input_tokens: int

    def input_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _base_outputs(self, input_ids, attention_mask, hidden_states: bool = False):
        embeds = self.model.get_input_embeddings()(input_ids)
        prompt = self.input_prompt(input_ids, attention_mask, embeds).to(embeds.dtype)
        num = prompt.shape[1]
        mask = torch.cat([torch.ones(attention_mask.shape[0], num, dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        out = self._base_module()(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask,
                                  output_hidden_states=hidden_states, return_dict=True)
        return _strip(out, num)


class FedPromptClassifier(_NoDeepPrompt):
    """Input prompt tuning through PEFT's ``PromptTuningConfig`` (the prompt lives in PEFT's module)."""

    def __init__(self, model, head, num_labels, num_tokens: int, label_word_ids=None, seed: int = 0):
        super().__init__(model, head, num_labels, label_word_ids, seed)
        from peft import PromptTuningConfig, get_peft_model  # noqa: PLC0415

        self.num_input_tokens = num_tokens
        config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=num_tokens,
                                    prompt_tuning_init="SAMPLE_VOCAB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.peft = get_peft_model(self._base_module(), config)
        for name, param in self.peft.named_parameters():
            param.requires_grad_(name.startswith("prompt_encoder."))

    def _base_outputs(self, input_ids, attention_mask, hidden_states: bool = False):
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states,
                        return_dict=True)
        return _strip(out, self.num_input_tokens)


class IDPGClassifier(InputPromptClassifier):
    def __init__(self, model, head, num_labels, num_tokens: int, label_word_ids=None, seed: int = 0,
                 bottleneck: int = 32):
        super().__init__(model, head, num_labels, label_word_ids, seed)
        hidden = _hidden_size(model)
        generator = torch.Generator().manual_seed(seed + 1)
        self.num_input_tokens = num_tokens
        self.generator_in = nn.Linear(hidden, bottleneck)
        self.generator_out = nn.Linear(bottleneck, num_tokens * hidden)
        with torch.no_grad():
            self.generator_in.weight.normal_(0.0, INIT_STD, generator=generator)
            self.generator_in.bias.zero_()
            self.generator_out.weight.normal_(0.0, INIT_STD, generator=generator)
            self.generator_out.bias.copy_(_sample_vocab(model, num_tokens, generator).reshape(-1))

    def sentence_vector(self, input_ids, attention_mask) -> torch.Tensor:
        """Mean-pooled last hidden state of the frozen backbone without any prompt (no gradient)."""
        with torch.no_grad():
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def input_prompt(self, input_ids, attention_mask, embeds):
        r = self.sentence_vector(input_ids, attention_mask)
        prompt = self.generator_out(torch.tanh(self.generator_in(r)))
        return prompt.view(len(r), self.num_input_tokens, -1)


class ATTEMPTClassifier(InputPromptClassifier):
    def __init__(self, model, head, num_labels, num_tokens: int, label_word_ids=None, seed: int = 0,
                 num_sources: int = 4, bottleneck: int = 32):
        super().__init__(model, head, num_labels, label_word_ids, seed)
        hidden = _hidden_size(model)
        generator = torch.Generator().manual_seed(seed + 2)
        self.num_input_tokens = num_tokens
        sources = _sample_vocab(model, num_sources * num_tokens, generator).view(num_sources, num_tokens, hidden)
        self.register_buffer("source_prompts", sources, persistent=False)  # frozen, never communicated
        self.target_prompt = nn.Parameter(_sample_vocab(model, num_tokens, generator))
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
        x = masked.max(dim=1).values  # max-pooled input embeddings [B, H]
        h = self.attn_norm(self.attn_up(nn.functional.silu(self.attn_down(x))))
        prompts = torch.cat([self.source_prompts, self.target_prompt.unsqueeze(0)], dim=0)  # [S+1, P, H]
        keys = prompts.max(dim=1).values  # [S+1, H]
        return torch.softmax(h @ keys.T / self.temperature, dim=-1)

    def input_prompt(self, input_ids, attention_mask, embeds):
        weights = self.attention(input_ids, attention_mask, embeds)
        prompts = torch.cat([self.source_prompts, self.target_prompt.unsqueeze(0)], dim=0)
        mixture = torch.einsum("bs,sph->bph", weights, prompts)
        return self.target_prompt.unsqueeze(0) + mixture


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


class LatePromptClassifier(_NoDeepPrompt):
    def __init__(self, model, head, num_labels, num_tokens: int, label_word_ids=None, seed: int = 0,
                 layer: int | None = None):
        super().__init__(model, head, num_labels, label_word_ids, seed)
        layers = encoder_layers(model)
        self.insert_layer = len(layers) // 2 if layer is None else layer
        if not 0 <= self.insert_layer < len(layers):
            raise ValueError(f"lpt: layer {self.insert_layer} outside 0..{len(layers) - 1}")
        self.num_input_tokens = num_tokens
        generator = torch.Generator().manual_seed(seed + 3)
        self.late_prompt = nn.Parameter(torch.randn(num_tokens, _hidden_size(model), generator=generator) * INIT_STD)
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

    def _base_outputs(self, input_ids, attention_mask, hidden_states: bool = False):
        out = super()._base_outputs(input_ids, attention_mask, hidden_states)
        # hidden_states[0] is the embedding output; hidden_states[j] the output of layer j - 1
        return _strip(out, self.num_input_tokens, start_layer=self.insert_layer + 1)

"""A frozen backbone with deep prompts and a classification rule (SPEC section 1).

Three ways to turn the backbone into a classifier:

- ``linear``: a small trainable linear head on the mean-pooled last hidden state (encoders);
- ``mlm``: the frozen masked-LM head read at the ``<mask>`` token, restricted to label words
  (the paper's choice for RoBERTa);
- ``lm``: label-word scoring for decoders: the language-model loss of the label word that
  follows the template; the predicted class is the word with the lowest loss.

Only the prompt (and the linear head) are trainable. One instance serves every simulated
client: clients differ only in the tensors loaded with :meth:`load_trainable`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedpeptao.prompts.prefix import DeepPrompt, attach, attention_shape, position_ids
from fedpeptao.utils.device import to_device

HeadKind = Literal["linear", "mlm", "lm"]
PROMPT_PREFIX = "prompt.layers."
HEAD_PREFIX = "head."
# a layer index in a parameter name: prompt.layers.3, encoder.layer.3.attention..., h.3.mlp..., adapters.3.up
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|adapters)\.(\d+)(?:\.|$)")


@dataclass
class Output:
    logits: torch.Tensor  # [B, C] class scores
    loss: torch.Tensor | None
    #: the loss is ``cross_entropy(scores, targets)``: kept so a batched pass can take each client's mean
    scores: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    features: torch.Tensor | None = None  # [B, H] what the rule reads (MOON's representation), if asked

    def loss_of(self, rows: slice) -> torch.Tensor:
        """The mean loss of ``rows`` alone (one client's examples of a batched pass)."""
        return F.cross_entropy(self.scores[rows], self.targets[rows])

    def row_losses(self) -> torch.Tensor:
        """Each row's own loss ``[B]`` (what :meth:`loss_of` averages)."""
        return F.cross_entropy(self.scores, self.targets, reduction="none")

    def rows(self, rows: slice) -> "Output":
        """The output of ``rows`` alone, as if they had been their own batch."""
        take = (lambda t: None if t is None else t[rows])
        return Output(self.logits[rows], self.loss_of(rows) if self.scores is not None else None,
                      take(self.scores), take(self.targets), take(self.features))


class PromptedClassifier(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        head: HeadKind,
        num_labels: int,
        num_prompt_tokens: int,
        label_word_ids: list[int] | None = None,
        prompt_dropout: float = 0.1,
        prompt_layers: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if head in ("mlm", "lm") and (label_word_ids is None or len(label_word_ids) != num_labels):
            raise ValueError(f"head '{head}' needs one label word per class ({num_labels})")
        self.model = model
        self.head_kind: HeadKind = head
        self.num_labels = num_labels
        for param in self.model.parameters():
            param.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        num_layers, num_kv_heads, head_dim = attention_shape(model.config)
        self.prompt = DeepPrompt(num_layers, num_prompt_tokens, num_kv_heads, head_dim, prompt_dropout,
                                 generator=generator, layers=prompt_layers)
        attach(model, self.prompt)
        self.head: nn.Linear | None = None
        if head == "linear":
            hidden = model.config.get_text_config().hidden_size
            self.head = nn.Linear(hidden, num_labels)
            with torch.no_grad():
                self.head.weight.normal_(0.0, 0.02, generator=generator)
                self.head.bias.zero_()
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids or [], dtype=torch.long), persistent=False)
        object.__setattr__(self, "_mlm_head", _masked_lm_head(model) if head == "mlm" else None)  # not a submodule

    # -- trainable state: what clients own and what the server may aggregate ----------------
    def trainable_names(self) -> list[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A detached host copy of every trainable tensor (prompt layers and head): a client's
        state lives off the accelerator between its turns."""
        return {name: param.detach().to("cpu", copy=True) for name, param in self.named_parameters()
                if param.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite trainable tensors in place; every key must be trainable and shape-compatible."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                param = params.get(name)
                if param is None or not param.requires_grad:
                    raise KeyError(f"'{name}' is not a trainable parameter of this model")
                if param.shape != value.shape:
                    raise ValueError(f"'{name}': expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
                param.copy_(value)

    def layer_groups(self) -> dict[int, list[str]]:
        """Trainable tensors by transformer layer (deep prompts, LoRA, adapters): what FedPepTAO
        scores and selects among. Tensors of no layer (the head, input prompts) are in no group."""
        groups: dict[int, list[str]] = {}
        for name in self.trainable_names():
            match = _LAYER.search(name)
            if match and not name.startswith(HEAD_PREFIX):
                groups.setdefault(int(match.group(1)), []).append(name)
        return dict(sorted(groups.items()))

    def head_names(self) -> list[str]:
        return [n for n in self.trainable_names() if n.startswith(HEAD_PREFIX)]

    # -- forward ------------------------------------------------------------------------------
    @property
    def _whole_mlm(self) -> bool:
        """A masked-LM head we cannot call on its own: the whole model runs, over ``[B, T, V]``."""
        return self.head_kind == "mlm" and self._mlm_head is None

    def _base_module(self) -> nn.Module:
        """What a forward runs: the backbone without its head, which the rule then applies (or the
        whole masked-LM model where its head cannot be called on its own)."""
        return self.model if self._whole_mlm else self.model.base_model

    def _base_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = False):
        positions = position_ids(self.model, attention_mask, self.prompt.num_tokens)
        return self._base_module()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    output_hidden_states=hidden_states, return_dict=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_pos: torch.Tensor,
                labels: torch.Tensor | None = None, features: bool = False) -> Output:
        """Logits and loss in float32 whatever the backbone's precision; inputs move to the model.

        ``features=True`` also returns the representation the rule reads (the MLM rule then keeps
        the last hidden states, which it otherwise does not need).
        """
        input_ids, attention_mask, target_pos, labels = to_device((input_ids, attention_mask, target_pos, labels),
                                                                  self.device)
        out = self._base_outputs(input_ids, attention_mask, hidden_states=features and self._whole_mlm)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.head_kind == "linear":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            logits = self.head(pooled.to(self.head.weight.dtype))
            return _output(logits, logits, labels, pooled if features else None)
        if self.head_kind == "mlm" and not self._whole_mlm:  # the head at the mask only, not over [B, T, V]
            hidden = out.last_hidden_state[rows, target_pos]
            logits = self._mlm_head(hidden).float()[:, self.label_word_ids]
            return _output(logits, logits, labels, hidden if features else None)
        if self.head_kind == "mlm":
            vocab_logits = out.logits[rows, target_pos].float()
            logits = vocab_logits[:, self.label_word_ids]
            return _output(logits, logits, labels, out.hidden_states[-1][rows, target_pos] if features else None)
        # lm: score only the position that predicts the label word (saves a [B, T, V] projection)
        hidden = out.last_hidden_state[rows, target_pos]
        vocab_logits = self.model.get_output_embeddings()(hidden).float()
        logits = vocab_logits[:, self.label_word_ids]
        return _output(logits, vocab_logits, None if labels is None else self.label_word_ids[labels],
                       hidden if features else None)

    @torch.no_grad()
    def forward_with(self, tensors: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Output:
        """The output on ``batch`` with ``tensors`` in place of the trainable ones, in eval mode
        (a reference model's forward, e.g. MOON's global and previous models)."""
        was_training = self.training
        self.eval()
        try:
            return torch.func.functional_call(self, tensors, args=(), kwargs={**batch, "features": True}, strict=False)
        finally:
            self.train(was_training)

    def layer_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Output hidden states of every transformer layer ``[B, T, H]`` (for layer scoring)."""
        input_ids, attention_mask = to_device((input_ids, attention_mask), self.device)
        out = self._base_outputs(input_ids, attention_mask, hidden_states=True)
        return list(out.hidden_states[1:])


#: the attribute under which transformers' masked-LM classes keep a head that maps hidden states
#: to vocabulary logits on its own (BERT's ``cls``, RoBERTa's ``lm_head``)
_MLM_HEAD_NAMES = ("cls", "lm_head")


def _masked_lm_head(model: nn.Module) -> nn.Module | None:
    """The masked-LM head as one module callable on hidden states, or None where the model
    spreads it over several (DistilBERT, ELECTRA): those run whole and read the mask's row."""
    others = [(name, child) for name, child in model.named_children()
              if child is not getattr(model, "base_model", None)]
    if len(others) == 1 and others[0][0] in _MLM_HEAD_NAMES:
        return others[0][1]
    return None


def _output(logits: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor | None,
            features: torch.Tensor | None) -> Output:
    loss = F.cross_entropy(scores, targets) if targets is not None else None
    return Output(logits, loss, scores if targets is not None else None, targets, features)

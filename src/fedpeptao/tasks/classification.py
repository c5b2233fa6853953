"""The three classification readouts (SPEC section 1):

- ``linear``: a small trainable linear head on the mean-pooled last hidden state (encoders);
- ``mlm``: the frozen masked-LM head read at the ``<mask>`` token, restricted to label words
  (the paper's choice for RoBERTa);
- ``lm``: label-word scoring for decoders: the language-model loss of the label word that
  follows the template; the predicted class is the word with the lowest loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedpeptao.tasks.base import Batch, Output, Task, WordIds, classification_output, register_task


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` ``[B, T, H]`` over each row's real tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@register_task
class LinearHead(Task):
    name = "linear"

    def build_head(self, backbone: nn.Module, generator: torch.Generator) -> nn.Linear:
        head = nn.Linear(backbone.config.get_text_config().hidden_size, self.num_labels)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.02, generator=generator)
            head.bias.zero_()
        return head

    def output(self, out: Any, head: nn.Linear, backbone: nn.Module, batch: Batch) -> Output:
        pooled = mean_pool(out.last_hidden_state, batch.attention_mask)
        logits = head(pooled.to(head.weight.dtype))
        return classification_output(logits, logits, batch.labels, pooled if batch.features else None)


#: the attribute under which transformers' masked-LM classes keep a head that maps hidden states
#: to vocabulary logits on its own (BERT's ``cls``, RoBERTa's ``lm_head``)
_MLM_HEAD_NAMES = ("cls", "lm_head")


def masked_lm_head(model: nn.Module) -> nn.Module | None:
    """The masked-LM head as one module callable on hidden states, or None where the model
    spreads it over several (DistilBERT, ELECTRA): those run whole and read the mask's row."""
    others = [(name, child) for name, child in model.named_children()
              if child is not getattr(model, "base_model", None)]
    if len(others) == 1 and others[0][0] in _MLM_HEAD_NAMES:
        return others[0][1]
    return None


class LabelWordTask(Task):
    """A readout restricted to one vocabulary word per class (no trainable head)."""

    label_words = True

    def build_head(self, backbone: nn.Module, generator: torch.Generator) -> WordIds:
        return WordIds(self.label_word_ids)


@register_task
class MaskedLMVerbaliser(LabelWordTask):
    name = "mlm"
    backbone_class = "masked_lm"
    layout = "mask"
    kinds = ("encoder",)

    def __init__(self, backbone: nn.Module, num_labels: int, label_word_ids: list[int] | None = None) -> None:
        super().__init__(backbone, num_labels, label_word_ids)
        self.mlm_head = masked_lm_head(backbone)  # frozen, part of the backbone

    @property
    def runs_whole(self) -> bool:
        """A masked-LM head we cannot call on its own: the whole model runs, over ``[B, T, V]``."""
        return self.mlm_head is None

    def body(self, backbone: nn.Module) -> nn.Module:
        return backbone if self.runs_whole else backbone.base_model

    def needs_hidden_states(self, features: bool) -> bool:
        return features and self.runs_whole

    def output(self, out: Any, head: WordIds, backbone: nn.Module, batch: Batch) -> Output:
        rows = torch.arange(batch.target_pos.shape[0], device=batch.target_pos.device)
        if self.runs_whole:
            logits = out.logits[rows, batch.target_pos].float()[:, head.ids]
            hidden = out.hidden_states[-1][rows, batch.target_pos] if batch.features else None
            return classification_output(logits, logits, batch.labels, hidden)
        hidden = out.last_hidden_state[rows, batch.target_pos]  # the head at the mask only, not over [B, T, V]
        logits = self.mlm_head(hidden).float()[:, head.ids]
        return classification_output(logits, logits, batch.labels, hidden if batch.features else None)


@register_task
class LabelWordScoring(LabelWordTask):
    name = "lm"
    backbone_class = "causal_lm"
    layout = "next_word"
    kinds = ("decoder",)

    def output(self, out: Any, head: WordIds, backbone: nn.Module, batch: Batch) -> Output:
        # score only the position that predicts the label word (saves a [B, T, V] projection)
        rows = torch.arange(batch.target_pos.shape[0], device=batch.target_pos.device)
        hidden = out.last_hidden_state[rows, batch.target_pos]
        vocab_logits = backbone.get_output_embeddings()(hidden).float()
        logits = vocab_logits[:, head.ids]
        targets = None if batch.labels is None else head.ids[batch.labels]
        return classification_output(logits, vocab_logits, targets, hidden if batch.features else None)

"""``generate``: generative instruction tuning of a causal LM (the loss of the completion's tokens).

The tuned backbone learns to continue each prompt with its completion: the loss is the
cross-entropy of the completion tokens only, averaged over tokens (a long completion weighs more
than a short one, as in TRL's ``SFTTrainer``). Nothing trains beside the tuning (no head). The
language-model head runs only at the positions that predict a completion token, never over
``[B, T, V]``. Data come from :func:`fedpeptao.data.instruct.encode_instruct`, whose batches carry
the completion's ids as ``labels [B, L]`` and, as ``target_pos``, the position that predicts the
first of them. Evaluation is by generation (:mod:`fedpeptao.generation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedpeptao.tasks.base import Batch, Output, Task, register_task
from fedpeptao.tasks.classification import mean_pool

IGNORE_INDEX = -100


@dataclass
class TokenOutput(Output):
    """The :class:`Output` of a token-level loss.

    ``token_losses [N]`` is the loss of every completion token of the batch and ``token_rows [N]``
    the row it belongs to; ``loss`` is their mean (token-weighted), and so is :meth:`loss_of` for
    a slice of rows (one client's share of a batched pass). ``logits [B, 1]`` is each row's mean
    log-likelihood per completion token (a score, not classes: evaluation is by generation).
    """

    token_losses: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    def _in(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.num_rows)
        return ((self.token_rows >= start) & (self.token_rows < stop)).to(self.token_losses.dtype)

    def loss_of(self, rows: slice) -> torch.Tensor:
        """The token-weighted mean loss of ``rows`` alone (no host sync)."""
        weight = self._in(rows)
        return (self.token_losses * weight).sum() / weight.sum().clamp(min=1.0)

    def row_loss_sums(self) -> torch.Tensor:
        """Each row's summed token loss ``[B]``: divided by :meth:`row_token_counts` it pools
        token-weighted over any set of rows (clients)."""
        return torch.zeros(self.num_rows, dtype=self.token_losses.dtype,
                           device=self.token_losses.device).index_add_(0, self.token_rows, self.token_losses)

    def row_token_counts(self) -> torch.Tensor:
        """How many completion tokens each row has ``[B]``."""
        return torch.bincount(self.token_rows, minlength=self.num_rows).to(self.token_losses.dtype)

    def row_losses(self) -> torch.Tensor:
        """Each row's own loss ``[B]``: the mean over its completion tokens."""
        return self.row_loss_sums() / self.row_token_counts().clamp(min=1.0)

    def rows(self, rows: slice) -> TokenOutput:
        """The output of ``rows`` alone, as if they had been their own batch."""
        start, stop, _ = rows.indices(self.num_rows)
        keep = (self.token_rows >= start) & (self.token_rows < stop)
        take = (lambda t: None if t is None else t[rows])
        return TokenOutput(self.logits[rows], self.loss_of(rows), None, None, take(self.features),
                           self.token_losses[keep], self.token_rows[keep] - start)


def token_output(hidden: torch.Tensor, lm_head: nn.Module, target_pos: torch.Tensor, labels: torch.Tensor,
                 features: torch.Tensor | None = None) -> TokenOutput:
    """The loss of ``labels [B, L]`` (``-100``: none) predicted from ``hidden [B, T, H]`` at positions
    ``target_pos + j``; ``lm_head`` runs on those positions only."""
    batch, length = labels.shape
    positions = (target_pos.unsqueeze(1) + torch.arange(length, device=labels.device)).clamp(max=hidden.shape[1] - 1)
    valid = labels != IGNORE_INDEX
    rows = torch.arange(batch, device=labels.device).unsqueeze(1).expand(batch, length)[valid]
    logits = lm_head(hidden[rows, positions[valid]]).float()  # [N, V]
    token_losses = F.cross_entropy(logits, labels[valid], reduction="none")
    out = TokenOutput(torch.zeros(batch, 1, device=hidden.device), token_losses.mean() if len(token_losses)
                      else token_losses.sum(), None, None, features, token_losses, rows)
    out.logits = -out.row_losses().detach().unsqueeze(1)
    return out


@register_task
class Generate(Task):
    """Generative instruction tuning: the completion's token loss; no head; evaluated by generation."""

    name = "generate"
    backbone_class = "causal_lm"
    layout = "instruct"  # data from fedpeptao.data.instruct.encode_instruct
    kinds = ("decoder",)
    generative = True

    def __init__(self, backbone: nn.Module, num_labels: int = 0, label_word_ids: list[int] | None = None) -> None:
        super().__init__(backbone, num_labels, None)

    def output(self, out: Any, head: nn.Module | None, backbone: nn.Module, batch: Batch) -> TokenOutput:
        hidden = out.last_hidden_state
        features = mean_pool(hidden, batch.attention_mask) if batch.features else None
        if batch.labels is None:  # nothing to score: only the features (and an empty loss)
            empty = torch.zeros(0, device=hidden.device)
            rows = torch.zeros(0, dtype=torch.long, device=hidden.device)
            return TokenOutput(torch.zeros(hidden.shape[0], 1, device=hidden.device), None, None, None, features,
                               empty, rows)
        return token_output(hidden, backbone.get_output_embeddings(), batch.target_pos, batch.labels, features)

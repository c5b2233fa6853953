"""What a task is: the loss, the prediction and the readout a tuned backbone is trained for.

A tuning (:mod:`fedpeptao.tunings`) decides how the frozen backbone is adapted and runs it; a task
decides what is read from its outputs: which backbone class it needs (a bare encoder, a masked-LM
or a causal-LM model), how text is laid out for it (:mod:`fedpeptao.data.encoding`), the small
module it may train beside the tuning (its ``head``), and the :class:`Output` of a batch. Any task
runs with any tuning and any algorithm. Tasks are registered by name (``model.head`` in a
config), so a new one is a class and a decorator (``docs/architecture.md``, "add a task").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: which transformers class the backbone loads as: ``AutoModel``, ``AutoModelForMaskedLM``, ``AutoModelForCausalLM``
BackboneClass = Literal["base", "masked_lm", "causal_lm"]
#: how an example's text is laid out (:func:`fedpeptao.data.encoding.encode`): the text alone, a template
#: with a ``{mask}``, a template whose last token predicts the label word, or an instruction prompt
#: followed by its completion (:func:`fedpeptao.data.instruct.encode_instruct`)
Layout = Literal["plain", "mask", "next_word", "instruct"]


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

    def rows(self, rows: slice) -> Output:
        """The output of ``rows`` alone, as if they had been their own batch."""
        take = (lambda t: None if t is None else t[rows])
        return Output(self.logits[rows], self.loss_of(rows) if self.scores is not None else None,
                      take(self.scores), take(self.targets), take(self.features))


def classification_output(logits: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor | None,
                          features: torch.Tensor | None) -> Output:
    """Cross-entropy of ``scores`` against ``targets`` (when given), ``logits`` as the prediction."""
    loss = F.cross_entropy(scores, targets) if targets is not None else None
    return Output(logits, loss, scores if targets is not None else None, targets, features)


@dataclass
class Batch:
    """What a task reads besides the backbone's outputs (all on the model's device)."""

    attention_mask: torch.Tensor
    target_pos: torch.Tensor  # [B] the position a rule reads (the mask, or the token before the label word)
    labels: torch.Tensor | None
    features: bool  # also return the representation the rule reads


class Task:
    """Base class: a readout of a frozen ``backbone``; one instance serves every simulated client.

    ``head`` is the module the task trains beside the tuning (None: nothing), registered on the
    tuned model as ``head`` so its tensors are named ``head.*`` and are the client's like the
    tuning's. Everything else a task holds is frozen.
    """

    name: ClassVar[str]
    backbone_class: ClassVar[BackboneClass] = "base"
    layout: ClassVar[Layout] = "plain"
    #: the model kinds (``encoder``, ``decoder``) the task can read
    kinds: ClassVar[tuple[str, ...]] = ("encoder", "decoder")
    #: whether the task reads one word per class (``model.label_words``)
    label_words: ClassVar[bool] = False
    #: whether the task is scored by generating (instruction data, exact match) rather than by classes
    generative: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, num_labels: int, label_word_ids: list[int] | None = None) -> None:
        if self.label_words and (label_word_ids is None or len(label_word_ids) != num_labels):
            raise ValueError(f"head '{self.name}' needs one label word per class ({num_labels})")
        self.num_labels = num_labels
        self.label_word_ids = list(label_word_ids or [])

    def build_head(self, backbone: nn.Module, generator: torch.Generator) -> nn.Module | None:
        """The module this task trains (initialised from ``generator``), or None."""
        return None

    def body(self, backbone: nn.Module) -> nn.Module:
        """What a forward runs: the backbone without its own head, which :meth:`output` then applies."""
        return backbone.base_model

    def needs_hidden_states(self, features: bool) -> bool:
        """Whether the forward must keep every layer's hidden states (beyond the last)."""
        return False

    def output(self, out: Any, head: nn.Module | None, backbone: nn.Module, batch: Batch) -> Output:
        """Scores, loss and (when asked) features from the body's outputs ``out``."""
        raise NotImplementedError


class WordIds(nn.Module):
    """The label words' token ids as a buffer, so they move with the model (no trainable tensor)."""

    def __init__(self, ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task selectable as ``model.head`` (also one registered after import)."""
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown head '{name}' (expected one of {', '.join(TASKS)})")
    return TASKS[name]

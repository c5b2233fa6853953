"""A frozen backbone, a tuning's trainable tensors and a task's readout, as one module.

:class:`TunedModel` is the base every tuning subclasses (as PEFT's tuners are the model): a tuning
adds its tensors and overrides :meth:`TunedModel.encode`, how the backbone runs; it knows nothing
of heads. The task (:mod:`fedpeptao.tasks`) is attached with :meth:`TunedModel.attach_task` and
decides the loss, the prediction and what is read. Only the tuning's tensors and the task's head
are trainable. One instance serves every simulated client: clients differ only in the tensors
loaded with :meth:`load_trainable`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedpeptao.prompts.prefix import position_ids
from fedpeptao.tasks.base import Batch, Output, Task
from fedpeptao.utils.device import to_device

HEAD_PREFIX = "head."
# a layer index in a parameter name: prompt.layers.3, encoder.layer.3.attention..., h.3.mlp..., adapters.3.up
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|adapters)\.(\d+)(?:\.|$)")


class TunedModel(nn.Module):
    """The base of every tuning: the frozen ``model`` run as is (no trainable tensors of its own)."""

    #: positions the tuning prepends to every sequence's position ids (deep prompts: their length)
    num_prefix_positions: int = 0

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.task = task

    def attach_task(self, generator: torch.Generator) -> None:
        """Register the task's head (after the tuning's tensors, which draw from ``generator`` first)."""
        self.head = self.task.build_head(self.model, generator)

    # -- trainable state: what clients own and what the server may aggregate ----------------
    def trainable_names(self) -> list[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A detached host copy of every trainable tensor (the tuning's and the head's): a
        client's state lives off the accelerator between its turns."""
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
    def body(self) -> nn.Module:
        """The part of the backbone a forward runs (the task's choice)."""
        return self.task.body(self.model)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = False):
        """The body's outputs on a batch: what a tuning overrides to change how the backbone runs."""
        positions = position_ids(self.model, attention_mask, self.num_prefix_positions)
        return self.body()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           output_hidden_states=hidden_states, return_dict=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_pos: torch.Tensor,
                labels: torch.Tensor | None = None, features: bool = False) -> Output:
        """The task's output (float32 whatever the backbone's precision); inputs move to the model.

        ``features=True`` also returns the representation the task reads (MOON's).
        """
        input_ids, attention_mask, target_pos, labels = to_device((input_ids, attention_mask, target_pos, labels),
                                                                  self.device)
        out = self.encode(input_ids, attention_mask, hidden_states=self.task.needs_hidden_states(features))
        return self.task.output(out, self.head, self.model, Batch(attention_mask, target_pos, labels, features))

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
        out = self.encode(input_ids, attention_mask, hidden_states=True)
        return list(out.hidden_states[1:])

"""Many clients through one frozen backbone in one pass: per-example trainable tensors.

The frozen backbone is the same for every client; only the small trainable tensors differ. In
*slot mode* a batch is the concatenation of K clients' batches (client ``k``'s examples are the
``k``-th contiguous slice), and every place a trainable tensor is used reads the slice's own
client's tensor instead of the model's:

- a deep prompt's per-layer keys/values are built per slot and concatenated along the batch
  (:meth:`~fedpeptao.prompts.prefix.DeepPrompt.key_value`);
- every ``nn.Linear`` that owns trainable tensors (a linear head, LoRA's ``A``/``B``, adapters,
  IDPG's generator) applies each slot's own weight to its slice of the input.

The expensive frozen matmuls run once for the whole batch; the per-slot work is the same small
operations the sequential loop does, on the same values, so results agree to float rounding
(S-LoRA/Punica gather adapters per request the same way). A tuning whose tensors are used in any
other way (an input prompt ``nn.Parameter``) is not batchable: :func:`batch_refusal` says why and
the runtime falls back to one client at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpeptao.prompts.prefix import DeepPrompt
from fedpeptao.utils.device import to_device

Tensors = dict[str, Tensor]


def _slot_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Name prefix -> every ``nn.Linear`` of ``model`` owning a trainable weight or bias."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters(recurse=False))}


def batch_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s trainable tensors cannot be given per example (None: they can)."""
    covered = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DeepPrompt):
            covered |= {f"{prefix}layers.{i}" for i in module.layers}
        elif isinstance(module, nn.Linear):
            covered |= {f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)}
    other = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
    return None if not other else f"its trainable tensor {other[0]!r} is neither a deep prompt nor a linear weight"


def _slot_linear_forward(module: nn.Linear, prefix: str, slots: Sequence[Mapping[str, Tensor]], sizes: list[int]):
    weight, bias = f"{prefix}.weight", f"{prefix}.bias"

    def forward(x: Tensor) -> Tensor:
        if x.shape[0] != sum(sizes):
            raise RuntimeError(f"{prefix}: slot mode needs the batch first ({sum(sizes)} rows), got {tuple(x.shape)}")
        parts = x.split(sizes)
        return torch.cat([F.linear(part, slot[weight], slot.get(bias, module.bias))
                          for part, slot in zip(parts, slots)])

    return forward


@contextmanager
def slot_mode(model: nn.Module, slots: Sequence[Mapping[str, Tensor]], sizes: list[int]) -> Iterator[None]:
    """Within the block, ``model``'s batch is ``len(slots)`` clients' examples, ``sizes[k]`` rows of
    client ``k`` after those of clients ``< k``, each using its own trainable tensors ``slots[k]``
    (full names as in ``model.named_parameters()``; anything a slot lacks is the model's own)."""
    prompts = [(f"{name}." if name else "", m) for name, m in model.named_modules() if isinstance(m, DeepPrompt)]
    linears = _slot_linears(model)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))  # row -> slot
    try:
        for prefix, prompt in prompts:
            device = next(iter(prompt.layers.values())).device if len(prompt.layers) else torch.device("cpu")
            prompt.slots = ([{int(i): slot.get(f"{prefix}layers.{i}", p) for i, p in prompt.layers.items()}
                             for slot in slots], to_device(owner, device))
        for prefix, module in linears.items():
            module.forward = _slot_linear_forward(module, prefix, slots, list(sizes))
        yield
    finally:
        for _, prompt in prompts:
            prompt.slots = None
        for module in linears.values():
            module.__dict__.pop("forward", None)


class ClientView(nn.Module):
    """One client's trainable tensors as leaf parameters, under the model's own names.

    What a client's optimiser steps and what an algorithm's device hooks see as "the model" in a
    batched pass: ``named_parameters()`` gives this client's tensors (FedProx's anchor, SCAFFOLD's
    step correction), and :meth:`forward_with` runs this client's batch under other tensors
    (MOON's reference models) through the shared backbone.
    """

    def __init__(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "shared_model", model)  # not a submodule: its parameters are not ours
        device = model.device
        self._names = list(tensors)
        self._params = nn.ParameterList(nn.Parameter(t.detach().to(device, torch.float32, copy=True))
                                        for t in tensors.values())

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from ((prefix + name, param) for name, param in zip(self._names, self._params))

    def tensors(self) -> Tensors:
        return dict(zip(self._names, self._params))

    def trainable_state(self) -> Tensors:
        """A detached host copy, as :meth:`TunedModel.trainable_state` gives."""
        return {name: p.detach().to("cpu", copy=True) for name, p in zip(self._names, self._params)}

    def forward_with(self, tensors: Mapping[str, Tensor], batch: Mapping[str, Tensor]):
        """This client's batch under ``tensors`` (its own for the rest), in eval mode, no gradient."""
        return self.shared_model.forward_with({**self.tensors(), **tensors}, batch)

"""What travels between server and clients: a :class:`Message`, and its size as safetensors bytes.

Byte counts in the metrics are ``len()`` of the message's encoding, i.e. of the real payload,
the algorithm's extra tensors included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import save as _save

Tensors = dict[str, torch.Tensor]


@dataclass
class Message:
    """One message, either way between the server and a device.

    ``model`` holds model tensors under their names in the tuning: down, the shared tensors the
    device trains from; up, the same tensors after local training (what the server validates and
    averages). ``extras`` holds an algorithm's own tensors in named groups (SCAFFOLD's control
    variates, FedPepTAO's warmed-up base): only that algorithm reads them, and checks them.
    """

    model: Tensors
    extras: dict[str, Tensors] = field(default_factory=dict)


def flatten(message: Message) -> Tensors:
    """The message as one set of named tensors: the model's under their own names, each extra
    group's under ``<group>/<name>``."""
    flat = dict(message.model)
    for group, tensors in message.extras.items():
        flat.update({f"{group}/{name}": t for name, t in tensors.items()})
    return flat


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return _save({name: t.detach().contiguous() for name, t in tensors.items()})


def num_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return len(encode(tensors))


def message_bytes(message: Message) -> int:
    """The size of ``message`` on the wire: its model tensors and every extra group."""
    return num_bytes(flatten(message))

"""What travels between server and clients: named tensors as safetensors bytes.

Byte counts in the metrics are ``len()`` of these encodings, i.e. of the real payload.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return _save({name: t.detach().contiguous() for name, t in tensors.items()})


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    return _load(payload)


def num_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return len(encode(tensors))

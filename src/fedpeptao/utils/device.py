"""Where the frozen backbone runs and in which precision (``device``, ``precision``).

The same code path runs on CPU, CUDA and MPS: the model moves its inputs to its own device, the
trainable tensors and optimiser state stay float32 whatever the backbone's dtype, and a client's
state between rounds lives on the host (pinned when a GPU is used), so accelerator memory holds
one backbone and the client whose turn it is, however many clients the federation has.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


class DeviceError(ValueError):
    """``device`` names a device this machine does not have (one line, naming ``device``)."""


def check_device_name(name: str) -> str:
    """``name`` if it is a device's name (auto, cpu, cuda, cuda:N, mps), wherever it will run;
    ``ValueError`` naming ``device`` otherwise. The config checks only this: a machine that only
    reads a config (a Flower ServerApp host, a laptop reporting a GPU run) need not have its device."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return name


def check_device(name: str) -> str:
    """``name`` if this machine has it; :class:`DeviceError` (a ``ValueError``) naming ``device`` otherwise."""
    check_device_name(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {name} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use device=auto or device=cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device: {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist "
                              f"on this machine")
    if name == "mps" and not _mps_available():
        raise DeviceError("device: mps requested but MPS is not available on this machine; use device=auto or "
                          "device=cpu")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """The device a model is placed on; ``auto``: CUDA, then MPS, then CPU. Here, not when the
    config is read, a device this machine lacks is refused (:class:`DeviceError`, one line)."""
    check_device(name)
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, ``cpu``, ``mps``: what a run's summary says it ran on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def to_host(tree: Any) -> Any:
    """A copy of ``tree`` (nested dicts / lists of tensors) with every tensor on the CPU, pinned
    when CUDA is in use so the next client's upload overlaps; CPU tensors are returned as they are."""
    if isinstance(tree, torch.Tensor):
        if tree.device.type == "cpu":
            return tree
        host = tree.detach().to("cpu")
        return host.pin_memory() if tree.device.type == "cuda" else host
    if isinstance(tree, Mapping):
        return {k: to_host(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_host(v) for v in tree)
    return tree


def to_device(tree: Any, device: torch.device | str) -> Any:
    """``tree`` (a tensor, or nested dicts / lists / tuples of tensors and ``None``) with every
    tensor on ``device``. Copies to an accelerator do not wait for its queued work: a blocking copy
    would synchronise the stream, and a training step would then wait for the previous one."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=torch.device(device).type != "cpu")
    if isinstance(tree, Mapping):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(to_device(v, device) for v in tree)
    return tree

"""A quantized frozen backbone (``model.quantization``: ``none``, ``int8``, ``nf4``), through bitsandbytes.

The backbone's linear layers are quantized while it loads, by transformers' ``BitsAndBytesConfig``:
``int8`` is LLM.int8 (``Linear8bitLt``, int8 weights with a float scale per row), ``nf4`` 4-bit
NormalFloat (``Linear4bit``, a scale per block of 64 weights, computing in the backbone's dtype).
Embeddings, norms and the language-model head stay in the backbone's precision. Only frozen
tensors are quantized: the tuning's tensors, a task's head and the optimiser state stay float32
(:func:`fedpeptao.experiment.place`), and gradients reach them through the quantized layers
(bitsandbytes' matmuls are differentiable with respect to their input), deep prompts (through
attention) and LoRA (PEFT wraps bitsandbytes layers) alike.

Why bitsandbytes, and the numbers behind the choice: ``docs/generative.md``.

On a CPU, bitsandbytes switches kernels with the module's mode: in eval mode it runs LLM.int8 with
int8 activations, and repacks nf4 weights in place for an AVX512-BF16 kernel (after which training
runs on the repacked weights through an operator without an autograd formula). Federated training
alternates training and evaluation, so both would change what is learnt and measured. We pin the
CPU to bitsandbytes' training-mode kernels in both modes (dequantize, then a float matmul):
training and evaluation then compute the same function. On CUDA nothing is changed.

Refused in one line naming the key (:func:`quantization_refusal`, :func:`check_quantized`):
a backbone built from a config (``model.random_init``, the ``tiny-*`` test models: quantization
needs a checkpoint to load), a GGUF checkpoint (already quantized; loaded dequantised), a missing
bitsandbytes, and a model in which bitsandbytes found no linear layer to quantize.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import nn

from fedpeptao.models.builtin import ModelError

Quantization = Literal["none", "int8", "nf4"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4")
#: the pinned release (pyproject.toml); without it, bitsandbytes' optional ``kernels`` package is not needed
BITSANDBYTES = "bitsandbytes==0.50.2"
#: the random-weight test backbones (:mod:`fedpeptao.models.tiny`), built from a config: nothing to quantize on load
TINY_MODELS = ("tiny-bert", "tiny-roberta", "tiny-gpt2", "tiny-llama")


def check_name(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"model.quantization: unknown '{quantization}' (expected {', '.join(QUANTIZATIONS)})")


def quantization_refusal(quantization: str, *, random_init: bool = False, from_config: str | None = None,
                         gguf: str | None = None) -> str | None:
    """Why ``quantization`` cannot apply to this backbone (one line naming the key), or None.

    ``random_init``: ``model.random_init`` is set; ``from_config``: the backbone (named) is built
    from a config with random weights (``tiny-*``); ``gguf``: the checkpoint (named) is a GGUF file.
    """
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        return f"model.quantization: unknown '{quantization}' (expected {', '.join(QUANTIZATIONS)})"
    if random_init:
        return (f"model.quantization: {quantization} quantizes a checkpoint while it loads, but model.random_init "
                f"builds the backbone from a config (set model.quantization=none)")
    if from_config:
        return (f"model.quantization: {from_config} is built from a config with random weights; {quantization} "
                f"needs a checkpoint to load (save it with save_pretrained) or model.quantization=none")
    if gguf:
        return (f"model.quantization: '{gguf}' is a GGUF checkpoint, already quantized and loaded dequantised; "
                f"use a safetensors checkpoint or model.quantization=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"model.quantization: {quantization} needs the bitsandbytes package (pip install {BITSANDBYTES})"
    return None


def bitsandbytes_config(quantization: str, dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``int8`` or ``nf4`` (computing in ``dtype``), or None."""
    check_name(quantization)
    if quantization == "none":
        return None
    _import_bitsandbytes()
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=False)


def _import_bitsandbytes() -> None:
    """Import bitsandbytes without its notice that the optional ``kernels`` package (an AVX512-BF16
    inference kernel for packed nf4 weights, which :func:`pin_cpu_kernels` never uses) is missing."""
    import logging  # noqa: PLC0415

    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401, PLC0415
    except ImportError:
        raise ModelError(f"model.quantization: needs the bitsandbytes package (pip install {BITSANDBYTES})") from None
    finally:
        notices.setLevel(level)


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """How many linear layers of each bitsandbytes kind ``model`` holds (empty: none)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        kind = type(module).__name__
        if kind in ("Linear8bitLt", "Linear4bit"):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_layers(model))


def check_quantized(model: nn.Module, quantization: str, name: str) -> None:
    """After loading: bitsandbytes quantized something, and the CPU runs one kernel in both modes."""
    if quantization == "none":
        return
    if not is_quantized(model):
        raise ModelError(f"model.quantization: bitsandbytes found no linear layer to quantize in '{name}' "
                         f"({type(model).__name__}); set model.quantization=none")
    pin_cpu_kernels(model)


class _TrainingKernelState:
    """Mixin for bitsandbytes' ``MatmulLtState`` whose ``is_training`` stays True: bitsandbytes picks
    its CPU kernel from it, and Linear8bitLt overwrites it with the module's mode at every forward."""

    @property
    def is_training(self) -> bool:
        return True

    @is_training.setter
    def is_training(self, value: bool) -> None:
        pass


_PINNED_STATES: dict[type, type] = {}


def pin_cpu_kernels(model: nn.Module) -> None:
    """On a CPU, make bitsandbytes compute the same function in eval mode as in training mode
    (module docstring): int8 layers keep the dequantizing kernel, nf4 weights are never repacked."""
    for module in model.modules():
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        if weight is None or weight.device.type != "cpu":
            continue
        if kind == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
        elif kind == "Linear8bitLt":
            state = module.state
            cls = type(state)
            if cls not in _PINNED_STATES and not issubclass(cls, _TrainingKernelState):
                _PINNED_STATES[cls] = type(f"CpuTraining{cls.__name__}", (_TrainingKernelState, cls), {})
            if not isinstance(state, _TrainingKernelState):
                state.__class__ = _PINNED_STATES[cls]


def weight_bytes(model: nn.Module) -> int:
    """The bytes the backbone's parameters and buffers hold, quantized ones at their packed size
    (plus their scales)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        for extra in (getattr(state, "absmax", None), getattr(state, "code", None), getattr(tensor, "SCB", None)):
            if isinstance(extra, torch.Tensor):
                total += extra.numel() * extra.element_size()
    return total

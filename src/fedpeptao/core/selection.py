"""Device-side measurements that decide which prompt layers travel (SPEC section 2).

The maths lives in :mod:`fedpeptao.core.scoring` and :mod:`fedpeptao.core.hessian`; this module
only feeds them a client's batch through the prompted model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedpeptao.core.hessian import hvp_fn
from fedpeptao.core.scoring import layer_scores
from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.models.classifier import PromptedClassifier


def _first_batch(data: EncodedDataset, indices: np.ndarray, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return next(data.batches(indices, batch_size, shuffle=True, rng=rng))


@torch.no_grad()
def client_layer_scores(model: PromptedClassifier, data: EncodedDataset, indices: np.ndarray,
                        batch_size: int, seed: int) -> torch.Tensor:
    """Layer-importance scores from one batch of this client's data (needs >= 2 examples)."""
    if len(indices) < 2:
        raise ValueError("layer scoring needs at least 2 examples on the client")
    model.eval()
    batch = _first_batch(data, indices, batch_size, seed)
    outputs = model.layer_outputs(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).to(outputs[0])
    return layer_scores([h * mask for h in outputs])


def client_hvp(model: PromptedClassifier, data: EncodedDataset, indices: np.ndarray, batch_size: int,
               seed: int, names: list[str] | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Hessian-vector products of this client's batch loss w.r.t. the named trainable tensors
    (default: every deep-prompt layer), i.e. the tuning's per-layer groups.

    Evaluated in eval mode (no dropout) so that the operator is a fixed symmetric matrix, and with
    the math SDPA kernel: PyTorch's fused CPU attention kernels have no double backward.
    """
    model.eval()
    batch = _first_batch(data, indices, batch_size, seed)
    if names is None:
        params = [model.prompt.layers[str(i)] for i in model.prompt.active_layers]
    else:
        named = dict(model.named_parameters())
        params = [named[n] for n in names]
    dim = sum(p.numel() for p in params)
    with sdpa_kernel(SDPBackend.MATH):
        return hvp_fn(lambda: model(**batch).loss, params), dim

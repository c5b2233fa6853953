"""Device-side work: local training of the prompts and evaluation (SPEC section 3, "Device").

Everything here acts on a :class:`PromptedClassifier` whose trainable tensors have already been
set to one client's values; the caller owns the client's state. That is what lets one frozen
backbone serve every simulated client, and the Flower client reuse the same functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.utils.device import to_host


@dataclass
class LocalTrainConfig:
    epochs: int = 2
    batch_size: int = 8
    lr: float = 4e-2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    reset_optimizer: bool = False  # the paper's text resets momentum each round; the reference code keeps it


@dataclass
class LocalResult:
    num_steps: int
    num_examples: int
    mean_loss: float
    seconds: float
    optimizer_state: dict | None


def make_optimizer(model: PromptedClassifier, cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def local_train(
    model: PromptedClassifier,
    data: EncodedDataset,
    indices: np.ndarray,
    cfg: LocalTrainConfig,
    rng: np.random.Generator,
    optimizer_state: dict | None = None,
    extra_loss=None,
) -> LocalResult:
    """Run ``cfg.epochs`` over the client's examples; returns the optimiser state to keep.

    ``extra_loss(model) -> Tensor`` lets federated optimisers add a term (FedProx's proximal
    term, MOON's contrastive term) without a second training loop.
    """
    start = time.perf_counter()
    model.train()
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None and not cfg.reset_optimizer:
        optimizer.load_state_dict(optimizer_state)
    params = [p for p in model.parameters() if p.requires_grad]
    steps, total = 0, 0.0
    for _ in range(cfg.epochs):
        for batch in data.batches(indices, cfg.batch_size, shuffle=True, rng=rng):
            out = model(**batch)
            loss = out.loss if extra_loss is None else out.loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            steps += 1
            total += float(out.loss.detach())
    state = None if cfg.reset_optimizer else to_host(optimizer.state_dict())
    return LocalResult(steps, len(indices), total / max(steps, 1), time.perf_counter() - start, state)


@torch.no_grad()
def predict(model: PromptedClassifier, data: EncodedDataset, indices: np.ndarray, batch_size: int = 32
            ) -> tuple[np.ndarray, float]:
    """Predicted classes for the given examples and the summed loss."""
    model.eval()
    preds, loss_sum = [], 0.0
    for batch in data.batches(indices, batch_size):
        out = model(**batch)
        preds.append(out.logits.argmax(-1).cpu().numpy())
        loss_sum += float(out.loss) * len(batch["labels"])
    return (np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)), loss_sum

"""Pieces of one federated round that do not depend on the algorithm or on how messages travel.

Both runtimes seed a client's work with :func:`round_seed` and keep a device's state in a
:class:`ClientState`, so the embedded simulator and the Flower app compute the same thing for the
same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]

TRAIN_STREAM, SCORE_STREAM, HESSIAN_STREAM, PRIVACY_STREAM, COUNT_STREAM, ORDER_STREAM = 0, 1, 2, 3, 4, 5


def round_seed(seed: int, round_index: int, client_id: int, stream: int = TRAIN_STREAM) -> int:
    """A seed for one client's work in one round, independent of the order clients run in.

    ``stream`` separates draws for different purposes (training, layer scoring, Hessian batches).
    """
    entropy = [seed, round_index, client_id] + ([stream] if stream != TRAIN_STREAM else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def batch_order_seed(seed: int, round_index: int) -> int:
    """The seed every client of round ``round_index`` orders its length-grouped batches with
    (shared, so the clients of one batched pass see batches of similar lengths at each step)."""
    return int(np.random.SeedSequence([seed, round_index, ORDER_STREAM]).generate_state(1)[0])


@dataclass
class ClientState:
    """What a device keeps between rounds: its trainable tensors, optimiser state and the
    algorithm's own per-device tensors (SCAFFOLD's ``c_k``, FedPepTAO's adopted base version)."""

    params: Tensors
    optimizer: dict | None = None
    rounds_trained: int = 0
    algo_state: dict = field(default_factory=dict)


"""Pieces of one federated round that do not depend on the algorithm or on how messages travel.

Both runtimes call :func:`client_round` on a device, seed it with :func:`round_seed`, keep a
device's state in a :class:`ClientState`, and average with the rule from :func:`averaging`, so
the embedded simulator and the Flower app compute the same thing for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from fedpeptao.core.client import LocalJob, LocalResult, LocalTrainConfig, local_train, local_train_batched
from fedpeptao.core.server import ClientUpdate, weighted_average
from fedpeptao.core.validation import coordinate_median, trimmed_mean
from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.models.slots import ClientView

Averaging = Literal["weighted_mean", "median", "trimmed_mean"]
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


def client_round(
    model: PromptedClassifier,
    state: ClientState,
    start: Tensors,
    shared_names: Sequence[str],
    data: EncodedDataset,
    indices: np.ndarray,
    cfg: LocalTrainConfig,
    seed: int,
    extra_loss=None,
    order_seed: int = 0,
) -> tuple[Tensors, LocalResult]:
    """Train one client from ``start`` (its own tensors overwritten by the global shared ones).

    Updates ``state`` in place and returns only the ``shared_names`` tensors: the update that travels.
    """
    model.load_trainable(start)
    torch.manual_seed(seed)
    result = local_train(model, data, indices, cfg, np.random.default_rng(seed), state.optimizer, extra_loss,
                         order_seed)
    return _keep(state, model.trainable_state(), result, shared_names)


def client_rounds_batched(
    model: PromptedClassifier,
    states: Sequence[ClientState],
    views: Sequence[ClientView],
    extra_losses: Sequence[object | None],
    shared_names: Sequence[str],
    data: EncodedDataset,
    parts: Sequence[np.ndarray],
    cfg: LocalTrainConfig,
    seeds: Sequence[int],
    order_seed: int = 0,
) -> list[tuple[Tensors, LocalResult]]:
    """:func:`client_round` for several clients in shared passes (each client's tensors in its
    :class:`~fedpeptao.models.slots.ClientView`, built from its ``start``); same data order per
    client as the sequential loop. Dropout draws from one generator for the pass, seeded by the
    first client's seed."""
    torch.manual_seed(seeds[0])
    jobs = [LocalJob(view, part, np.random.default_rng(seed), state.optimizer, extra)
            for state, view, part, seed, extra in zip(states, views, parts, seeds, extra_losses)]
    results = local_train_batched(model, data, jobs, cfg, order_seed)
    return [_keep(state, view.trainable_state(), result, shared_names)
            for state, view, result in zip(states, views, results)]


def _keep(state: ClientState, params: Tensors, result: LocalResult, shared_names: Sequence[str]
          ) -> tuple[Tensors, LocalResult]:
    """Store a finished client round in ``state``; the ``shared_names`` tensors are what travels."""
    state.params = params
    state.optimizer = result.optimizer_state
    state.rounds_trained += 1
    return {name: params[name] for name in shared_names}, result


def averaging(kind: Averaging, trim_ratio: float = 0.1) -> Callable[[Sequence[ClientUpdate]], Tensors]:
    """The runtime-wide averaging rule an algorithm's server step calls (``server.aggregation``)."""
    if kind == "median":
        return coordinate_median
    if kind == "trimmed_mean":
        return lambda updates: trimmed_mean(updates, trim_ratio)
    return weighted_average

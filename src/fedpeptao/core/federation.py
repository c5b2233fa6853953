"""One round of federated prompt tuning, independent of how messages travel.

The embedded simulator and the Flower app both call :func:`client_round` on a device and
:class:`Aggregator` on the server, so the two runtimes compute the same thing for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import logging

import numpy as np
import torch

from fedpeptao.core.client import LocalResult, LocalTrainConfig, local_train
from fedpeptao.core.server import ClientUpdate, ServerState, ServerStepConfig, fedpeptao_step, weighted_average
from fedpeptao.core.validation import ValidationPolicy, coordinate_median, filter_updates, trimmed_mean
from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.models.classifier import PromptedClassifier

Algorithm = Literal["fedavg", "fedpeptao"]
Averaging = Literal["weighted_mean", "median", "trimmed_mean"]
log = logging.getLogger("fedpeptao.server")


TRAIN_STREAM, SCORE_STREAM, HESSIAN_STREAM = 0, 1, 2


def round_seed(seed: int, round_index: int, client_id: int, stream: int = TRAIN_STREAM) -> int:
    """A seed for one client's work in one round, independent of the order clients run in.

    ``stream`` separates draws for different purposes (training, layer scoring, Hessian batches).
    """
    entropy = [seed, round_index, client_id] + ([stream] if stream != TRAIN_STREAM else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass
class ClientState:
    """What a device keeps between rounds: all its trainable tensors and its optimiser state."""

    params: dict[str, torch.Tensor]
    optimizer: dict | None = None
    rounds_trained: int = 0


def client_round(
    model: PromptedClassifier,
    state: ClientState,
    global_shared: dict[str, torch.Tensor],
    data: EncodedDataset,
    indices: np.ndarray,
    cfg: LocalTrainConfig,
    seed: int,
    extra_loss=None,
) -> tuple[dict[str, torch.Tensor], LocalResult]:
    """Train one client from its own tensors overwritten by the global shared ones.

    Updates ``state`` in place and returns only the shared tensors: the update that travels.
    """
    model.load_trainable({**state.params, **global_shared})
    torch.manual_seed(seed)
    result = local_train(model, data, indices, cfg, np.random.default_rng(seed), state.optimizer, extra_loss)
    state.params = model.trainable_state()
    state.optimizer = result.optimizer_state
    state.rounds_trained += 1
    return {name: state.params[name] for name in global_shared}, result


@dataclass
class Aggregator:
    """The server's copy of every trainable tensor, and the rule that updates the shared ones.

    Tensors outside ``shared`` are never sent, never received and never changed here. Every
    update is validated first (keys, shapes, dtypes, finiteness, norm); a bad one is left out
    of the round and named in the log and in ``rejected``, so one participant cannot corrupt
    the global state.
    """

    params: dict[str, torch.Tensor]
    shared: list[str]
    algorithm: Algorithm = "fedavg"
    step_config: ServerStepConfig | None = None
    server_state: ServerState | None = None
    validation: ValidationPolicy | None = field(default_factory=ValidationPolicy)
    averaging: Averaging = "weighted_mean"
    trim_ratio: float = 0.1
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def broadcast(self) -> dict[str, torch.Tensor]:
        return {name: self.params[name] for name in self.shared}

    def use_fedpeptao(self, shared: list[str], step_config: ServerStepConfig) -> None:
        """Switch from the all-layer FedAvg warm-up to FedPepTAO's step on the selected tensors."""
        self.shared = list(shared)
        self.algorithm = "fedpeptao"
        self.step_config = step_config
        self.server_state = ServerState(server_lr=step_config.server_lr)

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        current = self.broadcast()
        self.rejected = []
        if self.validation is not None:
            updates, self.rejected = filter_updates(updates, current, self.validation, log)
        if not updates:
            log.warning("no valid update this round; global state unchanged")
            return
        if self.algorithm == "fedpeptao":
            new = fedpeptao_step(current, updates, self.server_state, self.step_config)
        elif self.averaging == "median":
            new = coordinate_median(updates)
        elif self.averaging == "trimmed_mean":
            new = trimmed_mean(updates, self.trim_ratio)
        else:
            new = weighted_average(updates)
        self.params.update({name: new[name].to(current[name].dtype) for name in self.shared})

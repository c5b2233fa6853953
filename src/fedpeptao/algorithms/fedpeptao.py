"""FedPepTAO (SPEC sections 2-3): scored layer selection, then SCAFFOLD-II control variates with
server momentum on the selected layers only.

Phases, driven through :meth:`prepare_round` like any other algorithm's hooks:

1. **scores** (before round 0): every client with >= 2 examples scores the layers of the
   pretrained model with fresh tuning tensors (task ``score_layers``); the server combines them
   by data size and ranks the layers.
2. **warm-up** (rounds ``0 .. warmup_rounds - 1``, counted inside ``federated.rounds`` as the
   reference does): FedAvg on every trainable tensor. Only with ``ratio = "auto"``; a fixed ratio
   or an explicit layer list switches at round 0.
3. **switch** (before round ``warmup_rounds``): the clients sampled in the last warm-up round (at
   most ``hessian_clients`` of them) estimate the share ratio from their loss Hessian's
   eigen-density at the warmed-up tensors (task ``hessian_ratio``; the reference's choice); the
   top ``ceil(r L)`` scored layers (and the head, ``share_head``) are shared from now on. Every
   device's unshared layers restart from the warmed-up global tensors: the server sends each
   client those personal tensors once, with its first message after the switch.
4. **selective**: :func:`~fedpeptao.core.server.fedpeptao_step` on the shared tensors; the
   unshared layers never leave the device.

The layer groups are the tuning's (deep prompts' per-layer key/values, LoRA's or adapters'
per-layer matrices), so FedPepTAO runs on any tuning that has them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from fedpeptao.algorithms.base import (Algorithm, AlgorithmSettings, ClientTask, ClientWork, RunTask, ServerContext,
                                       register)
from fedpeptao.core.federation import HESSIAN_STREAM, SCORE_STREAM, ClientState
from fedpeptao.core.hessian import ratio_of_runs, slq_runs_lockstep
from fedpeptao.core.scoring import combine_scores, rank_layers, select_layers
from fedpeptao.core.selection import client_hvp, lanczos_device, layer_scores_of
from fedpeptao.core.server import ClientUpdate, ServerState, ServerStepConfig, fedpeptao_step, weighted_average

log = logging.getLogger("fedpeptao.server")

BASE_PREFIX = "fedpeptao.base/"  # the warmed-up personal tensors, sent once after the switch
BASE_VERSION = "fedpeptao.base_version"  # 0-d int64: the round of the switch
SCORE_TASK, HESSIAN_TASK = "score_layers", "hessian_ratio"


class FedPepTAOSettings(AlgorithmSettings):
    name: Literal["fedpeptao"] = "fedpeptao"
    # which layers travel (SPEC 2)
    ratio: float | Literal["auto"] = "auto"  # share top ceil(ratio*L) layers; auto = Hessian eigen-density
    layers: list[int] | None = None  # explicit shared layers (overrides ratio)
    score_batch_size: int = Field(8, ge=2)
    warmup_rounds: int = Field(10, ge=0)  # FedAvg rounds before the switch, inside federated.rounds
    hessian_clients: int = Field(3, ge=1)  # at most this many of the last warm-up round's clients
    hessian_batch_size: int | None = Field(None, ge=1)  # None: one training batch (client.batch_size)
    hessian_probes: int = Field(1, ge=1)  # Lanczos probes per client (the reference's n_v)
    lanczos_iters: int = Field(50, ge=2)
    share_head: bool = True
    # the server step (SPEC 3)
    server_lr: float = Field(0.05, gt=0.0)
    lr_decay: float = Field(0.99, gt=0.0, le=1.0)
    lr_min: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    variant: Literal["plain", "reference"] = "plain"
    use_control_variates: bool = True
    use_momentum: bool = True
    robust_averaging = False
    needs_layer_groups = True

    @model_validator(mode="after")
    def _ratio_range(self) -> FedPepTAOSettings:
        if isinstance(self.ratio, float) and not 0.0 < self.ratio <= 1.0:
            raise ValueError("method.ratio: must be in (0, 1] or 'auto'")
        return self

    def private_releases(self) -> int:
        """The layer scores, and the Hessian ratio when it is estimated."""
        return 1 + int(self.ratio == "auto" and self.layers is None)

    def switch_round(self) -> int:
        """The round the selective step starts: after the warm-up when the ratio is estimated."""
        return self.warmup_rounds if self.ratio == "auto" and self.layers is None else 0


def private_scores(scores) -> list[float]:
    """A client's layer scores as released under DP: centred and scaled to unit L2 norm, so that
    one client's vector is bounded (its ranking of the layers unchanged) whatever the scale of
    the eigenvalue terms."""
    values = torch.tensor(list(scores), dtype=torch.float64)
    values = values - values.mean()
    norm = float(values.norm())
    return (values / norm if norm > 0 else values).tolist()


@register
class FedPepTAO(Algorithm):
    name = "fedpeptao"
    settings_class = FedPepTAOSettings
    settings: FedPepTAOSettings

    def __init__(self, settings: FedPepTAOSettings, ctx: ServerContext, initial: dict[str, Tensor]) -> None:
        super().__init__(settings, ctx, initial)
        if not ctx.layer_groups:
            raise ValueError("method.name=fedpeptao needs a tuning with per-layer groups (deep_prompt, lora, adapter)")
        self.scores: list[float] | None = None
        self.ranking: list[int] | None = None
        self.selection: dict[str, Any] | None = None  # ratio and layers, once switched
        self.server_state: ServerState | None = None
        self.base: dict[str, Tensor] = {}  # warmed-up personal tensors every device restarts from
        self.base_version = -1
        self.synced: set[int] = set()  # clients known to hold the base
        self.all_synced = False  # switched at round 0: the base is the initialisation everyone has
        self.last_sampled: list[int] = []
        s = settings
        self.step_config = ServerStepConfig(
            num_clients=ctx.num_clients, local_lr=ctx.local_lr, beta=s.momentum, server_lr=s.server_lr,
            server_lr_decay=s.lr_decay, server_lr_min=s.lr_min, variant=s.variant,
            control_variates=s.use_control_variates, momentum=s.use_momentum)

    # -- phases ---------------------------------------------------------------------------
    def prepare_round(self, round_index: int, run_task: RunTask) -> None:
        if self.scores is None:
            self._score(run_task)
        if self.selection is None and round_index >= self.settings.switch_round():
            self._switch(round_index, run_task)

    def finish(self, run_task: RunTask) -> None:
        if self.selection is None:  # the rounds ended inside the warm-up: still say what would travel
            self._switch(self.ctx.rounds, run_task)

    def _score(self, run_task: RunTask) -> None:
        results = run_task(ClientTask(SCORE_TASK, None, dict(self.params), 0, SCORE_STREAM))
        scored = [(k, r) for k, r in sorted(results.items()) if "scores" in r]
        if not scored:
            raise RuntimeError("no client could score layers (each needs at least 2 training examples)")
        if self.ctx.private_mean is not None:
            combined = self.ctx.private_mean([private_scores(r["scores"]) for _, r in scored], 1.0, len(results))
            combined = torch.tensor(combined, dtype=torch.float64)
        else:
            combined = combine_scores([torch.tensor(list(r["scores"]), dtype=torch.float64) for _, r in scored],
                                      [int(r["num_train"]) for _, r in scored])
        self.scores, self.ranking = combined.tolist(), rank_layers(combined)

    def _layers(self, run_task: RunTask) -> tuple[float, list[int]]:
        s, num_layers = self.settings, len(self.ranking)
        if s.layers is not None:
            bad = [i for i in s.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"method.layers: {bad} outside 0..{num_layers - 1}")
            return len(set(s.layers)) / num_layers, sorted(set(s.layers))
        ratio = self._estimate_ratio(run_task) if s.ratio == "auto" else float(s.ratio)
        return ratio, select_layers(self.ranking, ratio)

    def _estimate_ratio(self, run_task: RunTask) -> float:
        """The last warm-up round's clients' Hessian ratios at the warmed-up tensors, averaged."""
        chosen = (self.last_sampled or list(range(self.ctx.num_clients)))[:self.settings.hessian_clients]
        task = ClientTask(HESSIAN_TASK, chosen, dict(self.params), 0, HESSIAN_STREAM,
                          {k: {"probe_seed": self.ctx.seed + i} for i, k in enumerate(chosen)})
        results = run_task(task)
        values = [float(results[k]["ratio"]) for k in chosen if "ratio" in results.get(k, {})]
        if not values:
            raise RuntimeError("no client returned a Hessian ratio estimate")
        if self.ctx.private_mean is not None:  # each ratio lies in [0, 1]: bound 1
            mean = self.ctx.private_mean([[min(max(v, 0.0), 1.0)] for v in values], 1.0, len(chosen))
            return float(min(max(mean[0], 0.0), 1.0))
        return sum(values) / len(values)

    def _switch(self, round_index: int, run_task: RunTask) -> None:
        ratio, layers = self._layers(run_task)
        shared = [n for i in layers for n in self.ctx.layer_groups.get(i, [])]
        if self.settings.share_head:
            shared += self.ctx.head_names
        self.selection = {"scores": self.scores, "ranking": self.ranking, "ratio": ratio, "layers": layers}
        self.shared = shared
        self.base = {n: t for n, t in self.params.items() if n not in set(shared)}
        self.base_version = round_index
        self.all_synced = round_index == 0
        self.synced = set()
        self.server_state = ServerState(server_lr=self.settings.server_lr)
        log.info("FedPepTAO from round %d: sharing layers %s (ratio %.3f)", round_index, layers, ratio)

    # -- server step ----------------------------------------------------------------------
    def client_message(self, client_id: int) -> dict[str, Tensor]:
        message = self.global_shared()
        if self.base and not self.all_synced and client_id not in self.synced:
            message.update({BASE_PREFIX + n: t for n, t in self.base.items()})
            message[BASE_VERSION] = torch.tensor(self.base_version, dtype=torch.int64)
        return message

    def acknowledge(self, client_id: int) -> None:
        if self.base:
            self.synced.add(client_id)

    def aggregate(self, round_index: int, sampled: Sequence[int], updates: Sequence[ClientUpdate]) -> None:
        self.last_sampled = [int(k) for k in sampled]
        if self.server_state is None:  # warm-up: FedAvg on every tensor
            self._set_shared(weighted_average(updates))
            return
        new = fedpeptao_step(self.global_shared(), updates, self.server_state, self.step_config,
                             num_sampled=len(sampled))
        self._set_shared(new)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "scores": self.scores, "ranking": self.ranking, "selection": self.selection,
                "server_state": None if self.server_state is None else self.server_state.to_tensors(),
                "base": self.base, "base_version": self.base_version, "synced": sorted(self.synced),
                "all_synced": self.all_synced, "last_sampled": self.last_sampled}

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        self.scores, self.ranking, self.selection = state["scores"], state["ranking"], state["selection"]
        tensors = state["server_state"]
        self.server_state = None if tensors is None else ServerState.from_tensors(tensors)
        self.base, self.base_version = dict(state["base"]), int(state["base_version"])
        self.synced, self.all_synced = set(state["synced"]), bool(state["all_synced"])
        self.last_sampled = list(state["last_sampled"])

    def summary(self) -> dict[str, Any]:
        return {"selection": self.selection, "shared_layers": None if self.selection is None else
                self.selection["layers"]}

    # -- device ---------------------------------------------------------------------------
    def model_part(self, received: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: t for n, t in received.items() if not n.startswith(BASE_PREFIX) and n != BASE_VERSION}

    def client_start(self, received: Mapping[str, Tensor], client: ClientState) -> dict[str, Tensor]:
        """Adopt the warmed-up personal tensors once (a resent base of the same switch is ignored)."""
        if BASE_VERSION in received and int(received[BASE_VERSION]) > client.algo_state.get("base_version", -1):
            base = {n[len(BASE_PREFIX):]: t for n, t in received.items() if n.startswith(BASE_PREFIX)}
            client.params = {**client.params, **base}
            client.algo_state = {**client.algo_state, "base_version": int(received[BASE_VERSION])}
        return super().client_start(received, client)

    def run_tasks(self, task: ClientTask, works: Sequence[ClientWork]) -> list[dict[str, Any]]:
        """One pass's clients, all on the same tensors (``task.params``): layer scoring in one
        forward pass, and the Hessian ratio with every Lanczos iteration's products in one
        double-backward pass (each client's Hessian is its own block of one batched loss)."""
        first = works[0]
        if task.kind == HESSIAN_TASK:
            s = self.settings
            hvps, dim = client_hvp(first.model, first.data, [w.indices for w in works], self._hessian_batch(first),
                                   [w.seed for w in works], self._hessian_names())
            runs = slq_runs_lockstep(hvps, dim, s.lanczos_iters, s.hessian_probes,
                                     [self._probe_seed(task, w) for w in works], device=lanczos_device(first.model))
            return [{"ratio": float(ratio_of_runs(own))} for own in runs]
        if task.kind != SCORE_TASK:
            return super().run_tasks(task, works)
        scorable = [w for w in works if len(w.indices) >= 2]  # a client with fewer cannot score
        scores = iter(layer_scores_of(first.model, first.data, [w.indices for w in scorable],
                                      self.settings.score_batch_size, [w.seed for w in scorable]) if scorable else [])
        return [{"scores": next(scores).tolist(), "num_train": len(w.indices)} if len(w.indices) >= 2 else {}
                for w in works]

    def _hessian_names(self) -> list[str]:
        """The tensors the Hessian is taken over: every per-layer group of the tuning."""
        return [n for i in sorted(self.ctx.layer_groups) for n in self.ctx.layer_groups[i]]

    def _hessian_batch(self, work: ClientWork) -> int:
        return self.settings.hessian_batch_size or work.batch_size

    def _probe_seed(self, task: ClientTask, work: ClientWork) -> int:
        return int(task.options.get(work.client_id, {}).get("probe_seed", self.ctx.seed))

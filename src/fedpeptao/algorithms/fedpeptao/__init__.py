"""FedPepTAO (SPEC sections 2-3): scored layer selection, then SCAFFOLD-II control variates with
server momentum on the selected layers only.

The algorithm composes its :class:`~fedpeptao.algorithms.fedpeptao.selection.LayerSelection`
(which layers travel, and when that is decided: scores, warm-up, Hessian ratio, switch) with its
server step:

* until the switch (the warm-up): FedAvg on every trainable tensor;
* at the switch: only the chosen layers (and the head) are shared from then on. Every device's
  unshared layers restart from the warmed-up global tensors: the server sends each client those
  personal tensors once, with its first message after the switch (extras group
  ``fedpeptao.base``, with ``fedpeptao.switch`` holding the round of the switch, so that a base
  sent again is not adopted twice);
* after it: :func:`~fedpeptao.core.server.fedpeptao_step` on the shared tensors; the unshared
  layers never leave the device.

When the server learns only the population's mean (central DP, secure aggregation), the step
takes that mean as one client of weight one standing for the whole population: its control
variate is the population's (kept under :data:`POPULATION`) and it counts as every client
(``|S_t| / N = 1`` in the update of ``c``), so ``c`` and its ``c_k`` stay equal and the correction
``c - c_k`` is zero: the population form is the selected layers' FedAvg with server momentum.
Per-client drift correction needs per-client updates. Counting it as ``|S_t|`` of ``N`` instead
(an earlier version) made ``c_k`` outrun ``c`` by ``1 - |S_t| / N`` of the clients' change every
round, because this one client returns every round: the server's step turned against the clients
within three rounds at any number of local steps (``tests/test_algorithms.py``; on MR under secure
aggregation the run fell to the majority class at round 10).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedpeptao.algorithms.base import Algorithm, ClientTask, ClientWork, RunTask, ServerContext, register
from fedpeptao.algorithms.fedpeptao.selection import LayerSelection
from fedpeptao.algorithms.fedpeptao.settings import FedPepTAOSettings
from fedpeptao.core.aggregation import ClientUpdate, PopulationUpdate, RoundUpdates
from fedpeptao.core.federation import ClientState
from fedpeptao.core.payload import Message
from fedpeptao.core.server import ServerState, ServerStepConfig, fedpeptao_step, first_contact_ratio
from fedpeptao.utils.state import State, add_prefix, take_prefix

log = logging.getLogger("fedpeptao.server")
#: below this first-contact ratio the published correction costs a real run its accuracy: the server's
#: steps shrink round by round as momentum accumulates the correction (``benchmarks/stability.py``: 0.21
#: goes negative by round 2), and on MiniLM/MR runs at 0.60-0.68 peaked and then declined by up to 16
#: points while 0.83 did not (``docs/results/paper-protocol``)
STABLE_RATIO = 0.75

BASE = "fedpeptao.base"  # extras group: the warmed-up personal tensors, sent once after the switch
SWITCH = "fedpeptao.switch"  # extras group: {"round": 0-d int64}, the round of the switch the base belongs to
POPULATION = -1  # the client id a population's mean takes in the step


def step_clients(updates: RoundUpdates) -> Sequence[ClientUpdate]:
    """The clients of the server step: every update, or a population's mean as one client of weight one."""
    if isinstance(updates, PopulationUpdate):
        return [ClientUpdate(POPULATION, updates.params, 1, updates.num_steps)]
    return updates


@register
class FedPepTAO(Algorithm):
    name = "fedpeptao"
    settings_class = FedPepTAOSettings
    settings: FedPepTAOSettings

    def __init__(self, settings: FedPepTAOSettings, ctx: ServerContext, initial: dict[str, Tensor]) -> None:
        super().__init__(settings, ctx, initial)
        if not ctx.layer_groups:
            raise ValueError("method.name=fedpeptao needs a tuning with per-layer groups (deep_prompt, lora, adapter)")
        self.layer_selection = LayerSelection(settings, ctx)
        self.server_state: ServerState | None = None  # the selective step's, from the switch on
        self.base: dict[str, Tensor] = {}  # warmed-up personal tensors every device restarts from
        self.base_version = -1
        self.synced: set[int] = set()  # clients known to hold the base
        self.all_synced = False  # switched at round 0: the base is the initialisation everyone has
        self.local_steps: float | None = None  # the first round's mean K, for the stability check
        self.participation = 0.0
        s = settings
        self.step_config = ServerStepConfig(
            num_clients=ctx.num_clients, local_lr=ctx.local_lr, beta=s.momentum, server_lr=s.server_lr,
            server_lr_decay=s.lr_decay, server_lr_min=s.lr_min, variant=s.variant,
            control_variates=s.use_control_variates, momentum=s.use_momentum,
            correction=s.correction)

    @property
    def selection(self) -> dict[str, Any] | None:
        """The layer selection (scores, ranking, ratio, layers) once decided; None before the switch."""
        return self.layer_selection.choice

    @property
    def ranking(self) -> list[int] | None:
        """The layers by descending score; None before the clients scored them."""
        return self.layer_selection.ranking

    # -- server ---------------------------------------------------------------------------
    def prepare_round(self, round_index: int, run_task: RunTask) -> None:
        if self.layer_selection.prepare(round_index, run_task, self.params):
            self._switch(round_index)

    def _switch(self, round_index: int) -> None:
        self.shared = self.layer_selection.shared_names()
        self.base = {n: t for n, t in self.params.items() if n not in set(self.shared)}
        self.base_version = round_index
        self.all_synced = round_index == 0
        self.synced = set()
        self.server_state = ServerState(server_lr=self.settings.server_lr)
        choice = self.selection
        log.info("FedPepTAO from round %d: sharing layers %s (ratio %.3f)", round_index + 1, choice["layers"],
                 choice["ratio"])

    def client_message(self, client_id: int) -> Message:
        message = super().client_message(client_id)
        if self.base and not self.all_synced and client_id not in self.synced:
            message.extras[BASE] = dict(self.base)
            message.extras[SWITCH] = {"round": torch.tensor(self.base_version, dtype=torch.int64)}
        return message

    def acknowledge(self, client_id: int) -> None:
        if self.base:
            self.synced.add(client_id)

    def aggregate(self, round_index: int, sampled: Sequence[int], updates: RoundUpdates) -> None:
        if self.local_steps is None:
            self._check_stability(updates, self._step_sampled(updates, sampled))
        self.layer_selection.record(sampled)
        if self.server_state is None:  # warm-up: FedAvg on every tensor
            self._set_shared(self.ctx.average(updates))
            return
        self._set_shared(fedpeptao_step(self.global_shared(), step_clients(updates), self.server_state,
                                        self.step_config, num_sampled=self._step_sampled(updates, sampled)))

    def _step_sampled(self, updates: RoundUpdates, sampled: Sequence[int]) -> int:
        """``|S_t|`` as the step counts it: a population's mean stands for every client (module docstring)."""
        return self.ctx.num_clients if isinstance(updates, PopulationUpdate) else len(sampled)

    def state(self) -> State:
        """Adds ``base/<name>`` and the selective step's ``server/...`` tensors; the layer
        selection and the base's bookkeeping as JSON."""
        tensors, meta = super().state()
        tensors.update(add_prefix("base", self.base))
        meta.update(layer_selection=self.layer_selection.state(), server_state=None, base_version=self.base_version,
                    synced=sorted(self.synced), all_synced=self.all_synced, local_steps=self.local_steps,
                    participation=self.participation)
        if self.server_state is not None:
            server_tensors, meta["server_state"] = self.server_state.state()
            tensors.update(add_prefix("server", server_tensors))
        return tensors, meta

    def load_state(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.layer_selection.load_state(meta["layer_selection"])
        server = meta["server_state"]
        self.server_state = None if server is None else ServerState.from_state(take_prefix(tensors, "server"), server)
        self.base, self.base_version = take_prefix(tensors, "base"), int(meta["base_version"])
        self.synced, self.all_synced = set(meta["synced"]), bool(meta["all_synced"])
        self.local_steps, self.participation = meta["local_steps"], float(meta["participation"])

    def summary(self) -> dict[str, Any]:
        return {"selection": self.selection, "shared_layers": None if self.selection is None else
                self.selection["layers"], "stability": self.stability()}

    def stability(self) -> dict[str, Any] | None:
        """The first round's mean local steps and the published step's first-contact ratio there."""
        if self.local_steps is None:
            return None
        s, ctx = self.settings, self.ctx
        ratio = first_contact_ratio(self.local_steps, ctx.local_lr, s.server_lr, s.momentum,
                                    self.participation)
        return {"local_steps": self.local_steps, "first_contact_ratio": ratio, "correction": s.correction}

    def _check_stability(self, updates: RoundUpdates, num_sampled: int) -> None:
        """Warn once where the published correction turns the server's step against the clients."""
        clients = step_clients(updates)
        self.local_steps = sum(u.num_steps for u in clients) / max(len(clients), 1)
        self.participation = num_sampled / self.ctx.num_clients
        s, ratio = self.settings, self.stability()["first_contact_ratio"]
        if s.use_control_variates and s.correction == "published" and ratio < STABLE_RATIO:
            log.warning("fedpeptao: %.1f local steps per client round (client.epochs x examples per client / "
                        "client.batch_size) at client.lr=%g and method.server_lr=%g put the published control-"
                        "variate correction in its unstable range (first-contact ratio %.2f < %.2f: the server's "
                        "steps shrink and turn against its clients as rounds pass, so accuracy peaks and then "
                        "falls); train more steps per round, lower method.server_lr, or set "
                        "method.correction=previous", self.local_steps, self.ctx.local_lr, s.server_lr, ratio,
                        STABLE_RATIO)

    # -- device ---------------------------------------------------------------------------
    def client_start(self, message: Message, client: ClientState) -> dict[str, Tensor]:
        """Adopt the warmed-up personal tensors once (a base sent again for the same switch is ignored)."""
        switch = message.extras.get(SWITCH)
        if switch is not None and int(switch["round"]) > client.algo_state.get("base_version", -1):
            client.params = {**client.params, **message.extras[BASE]}
            client.algo_state = {**client.algo_state, "base_version": int(switch["round"])}
        return super().client_start(message, client)

    def run_tasks(self, task: ClientTask, works: Sequence[ClientWork]) -> list[dict[str, Any]]:
        return self.layer_selection.run_tasks(task, works)


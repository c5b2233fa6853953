"""The FedPepTAO server step on the shared prompt layers (SPEC section 3, "Server").

Round ``t``, sampled clients ``S_t`` of ``N``, weights ``p_k = n_k / sum_j n_j``, ``K_k`` local steps,
device lr ``eta_l``:

1. ``theta_bar = sum_k p_k theta_k``; ``Delta_t = theta_t - theta_bar``.
2. SCAFFOLD option-II control variates, held on the server and never sent:
   ``c_k <- c_k - c + (theta_t - theta_k) / (K_k eta_l)``;
   ``c <- c + (|S_t| / N) sum_k K_k (c_k_new - c_k_old) / sum_k K_k``.
3. Server momentum with the control-variate correction and a decaying server lr:
   ``u_k = beta v_{t-1} + (1 - beta) g_t + c - c_k``, ``x_k = theta_bar - eta_s u_k``,
   ``theta_{t+1} = sum_k p_k x_k``, ``v_t = sum_k p_k u_k``; round 0 just takes ``theta_bar``.

``variant="plain"`` (default) uses ``g_t = Delta_t`` and the same ``v_{t-1}`` for every client.
``variant="reference"`` reproduces llm-eff/FedPepTAO: ``g_t = Delta_{t-1} - Delta_t`` and ``u`` chained
through the sampled clients in the order given, ``u_k = beta u_{k-1} + (1 - beta) g_t + c - c_k`` with
``u_0 = v_{t-1}`` (its ``Fsgdm`` writes each client's ``u`` into the shared ``global_v`` dict that the
next client's optimiser starts from).

``correction="published"`` (default, the SPEC's and the reference's) applies ``c - c_k`` with the
``c`` and ``c_k`` just updated from this round's update. That pushes each ``x_k`` back by about
``eta_s / (K_k eta_l)`` times client ``k``'s own update: at first contact the server's step along a
direction every client agrees on is :func:`first_contact_ratio` times the clients' mean update,
negative once ``K eta_l`` falls under about ``eta_s`` (few local steps: small clients, cross-device),
and momentum carries the reversal into later rounds. ``correction="previous"`` applies the
``c - c_k`` the server held before this round (as SCAFFOLD's clients apply the ``c`` and ``c_k``
they hold during local training): a client's first contact is corrected by the population's ``c``
alone, and later ones by the drift between it and its earlier updates. ``benchmarks/stability.py``
measures both.

Server lr: the lr used in round ``t`` is ``max(eta_0 * decay^t, eta_min)``. ``state.server_lr`` holds
the lr of round ``state.round`` and decays after every round, round 0 included (which does not use
it), so round 1 uses ``0.99 * eta_0``, as in the reference (it decays just before each use).

The arithmetic runs in at least float32 (float64 inputs stay float64); server state is kept in that
dtype on the device of the global tensor; the returned parameters have the global tensors' dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from fedpeptao.core.aggregation import ClientUpdate, aggregation_weights, work_dtype
from fedpeptao.utils.state import State, add_prefix, take_prefix


@dataclass
class ServerStepConfig:
    num_clients: int  # N, all clients, for the |S_t| / N factor
    local_lr: float  # eta_l, the device lr
    beta: float = 0.9
    server_lr: float = 0.05  # eta_s at round 0
    server_lr_decay: float = 0.99
    server_lr_min: float = 1e-4
    variant: Literal["plain", "reference"] = "plain"
    control_variates: bool = True
    momentum: bool = True  # False: beta = 0
    correction: Literal["published", "previous"] = "published"  # which c - c_k the step applies

    def __post_init__(self) -> None:
        if self.num_clients < 1 or self.local_lr <= 0 or self.server_lr <= 0:
            raise ValueError("need num_clients >= 1, local_lr > 0 and server_lr > 0")
        if not 0.0 <= self.beta < 1.0 or not 0.0 < self.server_lr_decay <= 1.0 or self.server_lr_min < 0:
            raise ValueError("need 0 <= beta < 1, 0 < server_lr_decay <= 1 and server_lr_min >= 0")
        if self.variant not in ("plain", "reference"):
            raise ValueError(f"variant must be 'plain' or 'reference', got {self.variant!r}")
        if self.correction not in ("published", "previous"):
            raise ValueError(f"correction must be 'published' or 'previous', got {self.correction!r}")


def first_contact_ratio(local_steps: float, local_lr: float, server_lr: float, beta: float,
                        participation: float) -> float:
    """The published step's move along a direction every client agrees on, over the clients' mean
    update, for clients the server meets for the first time (``c`` and ``v`` still about zero):
    ``1 + eta_s (1 - beta) - eta_s (1 - |S|/N) / (K eta_l)``. Below zero the server steps against
    its clients (derived in the module docstring; measured by ``benchmarks/stability.py``)."""
    return 1.0 + server_lr * (1.0 - beta) - server_lr * (1.0 - participation) / (local_steps * local_lr)


@dataclass
class ServerState:
    """Everything the step needs to resume. A name missing from a dict reads as zeros."""

    round: int = 0
    server_lr: float = 0.05  # the lr of round `round`
    momentum: dict[str, Tensor] = field(default_factory=dict)  # v
    control: dict[str, Tensor] = field(default_factory=dict)  # c
    client_control: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # c_k
    prev_delta: dict[str, Tensor] | None = None  # Delta_{t-1}

    def state(self) -> State:
        """``(tensors, meta)`` (:mod:`fedpeptao.utils.state`): ``momentum/<name>``, ``control/<name>``,
        ``client_control/<id>/<name>``, ``prev_delta/<name>``; the round, the lr and which
        clients and ``prev_delta`` exist as JSON."""
        tensors = {**add_prefix("momentum", self.momentum), **add_prefix("control", self.control),
                   **add_prefix("prev_delta", self.prev_delta or {})}
        for cid, c in self.client_control.items():
            tensors.update(add_prefix(f"client_control/{cid}", c))
        meta = {"round": self.round, "server_lr": self.server_lr, "client_control": list(self.client_control),
                "prev_delta": self.prev_delta is not None}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> ServerState:
        """Inverse of :meth:`state`."""
        client_control: dict[int, dict[str, Tensor]] = {int(cid): {} for cid in meta["client_control"]}
        for key, tensor in take_prefix(tensors, "client_control").items():  # one pass over every client
            cid, _, name = key.partition("/")
            client_control[int(cid)][name] = tensor
        return cls(round=int(meta["round"]), server_lr=float(meta["server_lr"]),
                   momentum=take_prefix(tensors, "momentum"), control=take_prefix(tensors, "control"),
                   client_control=client_control,
                   prev_delta=take_prefix(tensors, "prev_delta") if meta["prev_delta"] else None)


def _validate(global_params: Mapping[str, Tensor], updates: Sequence[ClientUpdate], cfg: ServerStepConfig) -> None:
    if not updates:
        raise ValueError("fedpeptao_step needs at least one client update")
    if len(updates) > cfg.num_clients:
        raise ValueError(f"{len(updates)} updates but only {cfg.num_clients} clients")
    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate client ids in one round: {ids}")
    for u in updates:
        missing, extra = set(global_params) - set(u.params), set(u.params) - set(global_params)
        if missing or extra:
            key = sorted(missing or extra)[0]
            raise ValueError(f"client {u.client_id}: key {key!r} is {'missing' if missing else 'unexpected'}")
        for name, ref in global_params.items():
            if u.params[name].shape != ref.shape:
                raise ValueError(f"client {u.client_id}: key {name!r} has shape {tuple(u.params[name].shape)}, "
                                 f"expected {tuple(ref.shape)}")
        if cfg.control_variates and u.num_steps < 1:
            raise ValueError(f"client {u.client_id}: num_steps must be >= 1 for control variates, got {u.num_steps}")


def fedpeptao_step(global_params: dict[str, Tensor], updates: Sequence[ClientUpdate], state: ServerState,
                   cfg: ServerStepConfig, num_sampled: int | None = None) -> dict[str, Tensor]:
    """One server round of SPEC section 3; returns ``theta_{t+1}`` and advances ``state``.

    Inputs are never mutated; ``state`` gets new ``round``, ``server_lr``, ``momentum``,
    ``control``, ``client_control`` and ``prev_delta`` (names outside ``global_params`` are kept as
    they are). Ablations: ``control_variates=False`` drops ``c - c_k`` and leaves ``c``/``c_k``
    untouched; ``momentum=False`` sets ``beta = 0``. The reference variant needs ``Delta_{t-1}``
    in ``state.prev_delta`` for every name from round 1 on.

    ``num_sampled`` is ``|S_t|`` of the control-variate update: the clients sampled this round, as
    the reference code counts them (default: the updates given). It differs from ``len(updates)``
    only when the runtime rejected an update.
    """
    _validate(global_params, updates, cfg)
    weights = aggregation_weights(updates)
    first_round = state.round == 0
    if cfg.variant == "reference" and not first_round:
        missing = sorted(set(global_params) - set(state.prev_delta or {}))
        if missing:
            raise ValueError(f"reference variant needs Delta_(t-1) for {missing} in state.prev_delta")
    beta = cfg.beta if cfg.momentum else 0.0
    lr = state.server_lr
    share = (len(updates) if num_sampled is None else num_sampled) / cfg.num_clients
    total_steps = sum(u.num_steps for u in updates)

    new_params: dict[str, Tensor] = {}
    momentum, control, prev_delta = dict(state.momentum), dict(state.control), dict(state.prev_delta or {})
    client_control = {cid: dict(c) for cid, c in state.client_control.items()}
    for name, ref in global_params.items():
        dtype, device = work_dtype(ref), ref.device

        def get(tensors: Mapping[str, Tensor], key: str = name) -> Tensor:
            t = tensors.get(key)
            return torch.zeros(ref.shape, dtype=dtype, device=device) if t is None else t.to(device=device, dtype=dtype)

        theta = ref.detach().to(dtype)
        locals_ = [u.params[name].detach().to(device=device, dtype=dtype) for u in updates]
        theta_bar = sum(w * x for w, x in zip(weights, locals_))
        delta = theta - theta_bar

        c = get(state.control)
        c_k = [get(state.client_control.get(u.client_id, {})) for u in updates]
        held = [c - ck for ck in c_k]  # the correction as the server held it before this round
        if cfg.control_variates:
            c_k_new = [ck - c + (theta - x) / (u.num_steps * cfg.local_lr) for ck, x, u in zip(c_k, locals_, updates)]
            c = c + share * sum(u.num_steps * (new - old) for u, new, old in zip(updates, c_k_new, c_k)) / total_steps
            c_k = c_k_new
            control[name] = c
            for u, ck in zip(updates, c_k):
                client_control.setdefault(u.client_id, {})[name] = ck

        if first_round:
            new = theta_bar
        else:
            if cfg.control_variates:
                corrections = held if cfg.correction == "previous" else [c - ck for ck in c_k]
            else:
                corrections = [torch.zeros_like(theta)] * len(updates)
            v = get(state.momentum)
            if cfg.variant == "plain":
                g = delta
                us = [beta * v + (1 - beta) * g + corr for corr in corrections]
            else:
                g = get(state.prev_delta) - delta
                us, u_prev = [], v
                for corr in corrections:
                    u_prev = beta * u_prev + (1 - beta) * g + corr
                    us.append(u_prev)
            new = sum(w * (theta_bar - lr * u) for w, u in zip(weights, us))
            momentum[name] = sum(w * u for w, u in zip(weights, us))
        prev_delta[name] = delta
        new_params[name] = new.to(ref.dtype)

    state.momentum, state.control, state.client_control, state.prev_delta = momentum, control, client_control, prev_delta
    state.round += 1
    state.server_lr = max(cfg.server_lr_decay * lr, cfg.server_lr_min)
    return new_params

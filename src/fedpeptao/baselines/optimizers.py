"""Federated optimisers for the baselines: client-side hooks and server rules on the shared tensors.

A *rule* is what a federated optimiser adds to plain local training and averaging. Its server
side holds the server's state (FedOpt's ``m``/``v``, SCAFFOLD's ``c``):

- ``down(global_shared)``: what the server sends to each sampled client;
- ``aggregate(current, updates)``: the server's new shared tensors.

Its device side reads no server state, only what the device received and what the device keeps,
so a real device (the Flower ClientApp) runs it on its own state:

- ``received_model(received)``: the model tensors of what ``down`` sent;
- ``device_training(model, received, own, state)``: a context manager around the device's local
  training that yields an ``extra_loss(model)`` for :func:`fedpeptao.core.client.local_train` (or
  ``None``) and may install hooks; ``own`` is the device's trainable tensors from its last round
  (MOON's previous local model), ``state`` the rule's per-device tensors (SCAFFOLD's ``c_k``);
- ``device_upload(received, update, num_steps, state)``: ``(what the device sends, its new state)``.

The embedded simulator runs every device in one process and calls ``client(sim, k, global_shared)``
and ``upload(k, global_shared, update, num_steps)``: the device side for simulated client ``k``,
with that client's rule state kept in ``client_control[k]`` (the server never reads it).

Every rule here acts on the same shared tensors as FedAvg (for the prompt baselines: every layer's
deep prompt and the head) and the device optimiser is the experiment's (AdamW by default), so the
rule is the only thing that differs between these baselines.

Rules (``p_k = n_k / sum_j n_j`` over the sampled clients unless ``weighted=False``, which uses the
published ``1/|S|``):

``fedavg``
    ``x <- sum_k p_k y_k``. Payload: the shared tensors both ways.
``fedprox`` (Li et al., 2020)
    FedAvg plus the proximal term ``(mu/2) ||w - x||^2`` over the shared tensors in each client's
    loss (``mu = 0.01``). Payload as FedAvg.
``scaffold`` (Karimireddy et al., 2020, Alg. 1 with option II), client control variates
    The server sends ``x`` and ``c``; client ``k`` corrects every local step,
    ``y <- step(y) - eta_l (c - c_k)`` (an optimiser step post-hook, active only during that client's
    training), then sets ``c_k+ = c_k - c + (x - y_k) / (K_k eta_l)`` and sends ``y_k`` and
    ``dc_k = c_k+ - c_k``. Server: ``x <- x + eta_g sum_k p_k (y_k - x)``, ``c <- c + (1/N) sum_k dc_k``
    (``= c + |S|/N * mean_k dc_k``, which keeps ``c = mean_i c_i``). ``eta_g = 1``. Payload: twice
    the shared tensors both ways. With device SGD (no weight decay) the corrected step is exactly
    Alg. 1's ``y <- y - eta_l (g + c - c_k)``. With the default AdamW the correction is applied to the
    update rather than added to the gradient: option II measures ``c_k`` in units of
    "displacement per step / eta_l", i.e. of the optimiser's update direction, and adding such a
    vector (O(1) per coordinate) to raw gradients that Adam then normalises would let it swamp the
    gradient; applied to the update, ``c_k+`` comes out as the client's mean update direction, as
    with SGD.
``moon`` (Li, He and Song, 2021)
    FedAvg plus ``mu * l_con`` with ``l_con = -log(e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} +
    e^{sim(z, z_prev)/tau}))``: ``z`` the representation the classifier reads (mean-pooled last hidden
    state for the linear head, the hidden state at the label position for the mlm/lm heads) under the
    local tensors being trained, ``z_glob`` under the received global tensors, ``z_prev`` under the
    client's own tensors from its previous round (the initial tensors before its first).
    ``mu = 1``, ``tau = 0.5``; ``z_glob`` and ``z_prev`` cost two extra no-grad forward passes per
    step. Payload as FedAvg.
``fedadam`` / ``fedyogi`` / ``fedadagrad`` (Reddi et al., 2021, Alg. 2)
    ``Delta = sum_k p_k y_k - x``; ``m <- b1 m + (1 - b1) Delta``;
    Adagrad ``v <- v + Delta^2``, Adam ``v <- b2 v + (1 - b2) Delta^2``,
    Yogi ``v <- v - (1 - b2) Delta^2 sign(v - Delta^2)``; ``x <- x + eta m / (sqrt(v) + tau)``, with
    ``m_{-1} = 0``, ``v_{-1} = tau^2`` and no bias correction, as in the paper. Defaults
    ``eta = 0.01``, ``b1 = 0.9``, ``b2 = 0.99``, ``tau = 1e-3``. Payload as FedAvg.

Server arithmetic runs in at least float32 (float64 stays float64); results take the dtypes of the
current global tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedpeptao.core.server import ClientUpdate, weighted_average

if TYPE_CHECKING:
    from fedpeptao.baselines.methods import BaselineSimulation

Params = dict[str, Tensor]
CONTROL_PREFIX = "scaffold.control/"  # c, sent down
DELTA_CONTROL_PREFIX = "scaffold.delta_control/"  # dc_k, sent up


def _work(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def aggregation_weights(updates: Sequence[ClientUpdate], weighted: bool = True) -> list[float]:
    """``n_k / sum n_j`` (``weighted``) or ``1/|S|``."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    if not weighted:
        return [1.0 / len(updates)] * len(updates)
    total = sum(u.num_examples for u in updates)
    if total <= 0 or any(u.num_examples < 0 for u in updates):
        raise ValueError("num_examples must be >= 0 with a positive total")
    return [u.num_examples / total for u in updates]


def average(updates: Sequence[ClientUpdate], names: Sequence[str], weighted: bool = True) -> Params:
    """``sum_k w_k y_k`` for the given names, accumulated in float64, in the first update's dtypes."""
    if weighted:
        avg = weighted_average([ClientUpdate(u.client_id, {n: u.params[n] for n in names}, u.num_examples, u.num_steps)
                                for u in updates])
        return avg
    w = aggregation_weights(updates, weighted=False)
    return {n: sum(wk * u.params[n].to(torch.float64) for wk, u in zip(w, updates)).to(updates[0].params[n].dtype)
            for n in names}


# ------------------------------------------------------------------------------------------
# pure update rules (what the NumPy references in tests/test_fedopt.py check)
# ------------------------------------------------------------------------------------------
FedOptKind = Literal["adam", "yogi", "adagrad"]


def fedopt_update(x: Tensor, delta: Tensor, m: Tensor, v: Tensor, kind: FedOptKind, lr: float, beta1: float,
                  beta2: float, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """One server step of Reddi et al. (2021) Alg. 2 on one tensor: returns ``(x_new, m, v)``."""
    m = beta1 * m + (1 - beta1) * delta
    sq = delta * delta
    if kind == "adagrad":
        v = v + sq
    elif kind == "adam":
        v = beta2 * v + (1 - beta2) * sq
    elif kind == "yogi":
        v = v - (1 - beta2) * sq * torch.sign(v - sq)
    else:
        raise ValueError(f"unknown adaptive server optimiser {kind!r}")
    return x + lr * m / (torch.sqrt(v) + tau), m, v


def scaffold_client_control(c_k: Tensor, c: Tensor, x: Tensor, y: Tensor, num_steps: int, local_lr: float) -> Tensor:
    """Option II: ``c_k+ = c_k - c + (x - y) / (K eta_l)``."""
    if num_steps < 1 or local_lr <= 0:
        raise ValueError("SCAFFOLD needs num_steps >= 1 and local_lr > 0")
    return c_k - c + (x - y) / (num_steps * local_lr)


def scaffold_server(x: Tensor, c: Tensor, ys: Sequence[Tensor], delta_cs: Sequence[Tensor], weights: Sequence[float],
                    num_clients: int, global_lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """``x + eta_g sum_k w_k (y_k - x)`` and ``c + (1/N) sum_k dc_k``."""
    x_new = x + global_lr * sum(w * (y - x) for w, y in zip(weights, ys))
    c_new = c + sum(delta_cs) / num_clients
    return x_new, c_new


# ------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------
ExtraLoss = Callable[[torch.nn.Module], Tensor]


@dataclass
class FedAvgRule:
    weighted: bool = True
    name: str = "fedavg"
    # The simulated clients' rule state by client id (SCAFFOLD's c_k); see the module docstring.
    client_control: dict[int, Params] = field(default_factory=dict)

    # -- server side -------------------------------------------------------------------------
    def down(self, global_shared: Params) -> Params:
        return global_shared

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate]) -> Params:
        return average(updates, list(current), self.weighted)

    # -- device side: only what the device received and keeps --------------------------------
    def received_model(self, received: Params) -> Params:
        """The model tensors of a ``down`` payload (without the rule's own entries)."""
        return received

    @contextmanager
    def device_training(self, model: torch.nn.Module | None, received: Params, own: Params, state: Params
                        ) -> Iterator[ExtraLoss | None]:
        yield None

    def device_upload(self, received: Params, update: Params, num_steps: int, state: Params
                      ) -> tuple[Params, Params]:
        return update, state

    # -- the simulator's clients -------------------------------------------------------------
    @contextmanager
    def client(self, sim: BaselineSimulation | None, k: int, global_shared: Params) -> Iterator[ExtraLoss | None]:
        """Simulated client ``k``'s :meth:`device_training` (this rule needs no model and no client state)."""
        with self.device_training(None, self.down(global_shared), {}, {}) as extra_loss:
            yield extra_loss

    def upload(self, k: int, global_shared: Params, update: Params, num_steps: int) -> Params:
        """Simulated client ``k``'s :meth:`device_upload`, its new state kept in ``client_control[k]``."""
        sent, state = self.device_upload(self.down(global_shared), update, num_steps, self.client_control.get(k, {}))
        if state:
            self.client_control[k] = state
        return sent


@dataclass
class FedProxRule(FedAvgRule):
    mu: float = 0.01
    name: str = "fedprox"

    @contextmanager
    def device_training(self, model, received, own, state):
        anchor = {n: t.detach().clone() for n, t in self.received_model(received).items()}

        def proximal(model) -> Tensor:
            params = dict(model.named_parameters())
            return 0.5 * self.mu * sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())

        yield proximal


@dataclass
class ScaffoldRule(FedAvgRule):
    """Classic SCAFFOLD: the server holds ``c`` and sends it down; each device holds its own ``c_k``."""

    num_clients: int = 1
    local_lr: float = 1.0
    global_lr: float = 1.0
    name: str = "scaffold"
    control: Params = field(default_factory=dict)  # c (server)

    def _c(self, name: str, ref: Tensor) -> Tensor:
        return self.control.get(name, torch.zeros_like(ref, dtype=_work(ref)))

    def down(self, global_shared):
        return {**global_shared, **{CONTROL_PREFIX + n: self._c(n, t).to(t.dtype) for n, t in global_shared.items()}}

    def received_model(self, received):
        return {n: t for n, t in received.items() if not n.startswith(CONTROL_PREFIX)}

    @staticmethod
    def _ck(state: Params, name: str, ref: Tensor) -> Tensor:
        """The device's ``c_k`` for one tensor (zeros before its first round)."""
        return state.get(name, torch.zeros_like(ref, dtype=_work(ref)))

    @contextmanager
    def device_training(self, model, received, own, state):
        params = dict(model.named_parameters())
        corrections = {id(params[name]): (received[CONTROL_PREFIX + name].to(_work(ref)) - self._ck(state, name, ref)
                                          ).to(params[name].dtype)
                       for name, ref in self.received_model(received).items()}

        def after_step(optimizer, _args, _kwargs) -> None:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        corr = corrections.get(id(p))
                        if corr is not None:
                            p.sub_(group["lr"] * corr)

        # A global optimiser hook, registered only while this device trains (the simulator runs
        # clients one at a time, and so does a Flower ClientApp process); local_train builds its
        # optimiser inside, so there is no instance to attach to beforehand.
        handle = register_optimizer_step_post_hook(after_step)
        try:
            yield None
        finally:
            handle.remove()

    def device_upload(self, received, update, num_steps, state):
        deltas, new_state = {}, dict(state)
        for name, x in self.received_model(received).items():
            old = self._ck(state, name, x)
            new = scaffold_client_control(old, received[CONTROL_PREFIX + name].to(old.dtype), x.to(old.dtype),
                                          update[name].to(old.dtype), num_steps, self.local_lr)
            new_state[name] = new
            deltas[DELTA_CONTROL_PREFIX + name] = (new - old).to(x.dtype)
        return {**update, **deltas}, new_state

    @contextmanager
    def client(self, sim, k, global_shared):
        """Simulated client ``k``'s :meth:`device_training`, with its ``c_k`` from ``client_control``."""
        with self.device_training(sim.model, self.down(global_shared), {}, self.client_control.get(k, {})):
            yield None

    def aggregate(self, current, updates):
        w = aggregation_weights(updates, self.weighted)
        new = {}
        for name, x in current.items():
            dtype = _work(x)
            x_new, c_new = scaffold_server(
                x.to(dtype), self._c(name, x), [u.params[name].to(dtype) for u in updates],
                [u.params[DELTA_CONTROL_PREFIX + name].to(dtype) for u in updates], w, self.num_clients, self.global_lr)
            self.control[name] = c_new
            new[name] = x_new.to(x.dtype)
        return new


def representation(model, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """What the classifier reads: masked mean of ``hidden`` (linear head) or its label position."""
    if model.head_kind == "linear":
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch["target_pos"]]


@dataclass
class MoonRule(FedAvgRule):
    mu: float = 1.0
    temperature: float = 0.5
    name: str = "moon"

    @contextmanager
    def device_training(self, model, received, own, state):
        """``own``: the device's tensors from its previous round, the previous local model of the loss."""
        glob = {n: t.detach().clone() for n, t in self.received_model(received).items()}
        prev = {n: own[n].detach().clone() for n in glob}
        seen: dict[str, object] = {}

        def grab_batch(_module, _args, kwargs):
            seen["batch"] = kwargs

        def grab_hidden(_module, _args, output):
            seen["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handles = [model.register_forward_pre_hook(grab_batch, with_kwargs=True),
                   model.model.base_model.register_forward_hook(grab_hidden)]

        def contrastive(m) -> Tensor:
            batch = {key: seen["batch"][key] for key in ("input_ids", "attention_mask", "target_pos")}
            z = representation(m, seen["hidden"], batch)
            refs = []
            was_training = m.training
            m.eval()
            with torch.no_grad():
                for tensors in (glob, prev):
                    torch.func.functional_call(m, tensors, args=(), kwargs=batch, strict=False)
                    refs.append(representation(m, seen["hidden"], batch))
            m.train(was_training)
            logits = torch.stack([F.cosine_similarity(z, r, dim=-1) for r in refs], dim=1) / self.temperature
            target = torch.zeros(len(z), dtype=torch.long, device=z.device)
            return self.mu * F.cross_entropy(logits, target)

        try:
            yield contrastive
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def client(self, sim, k, global_shared):
        """Simulated client ``k``'s :meth:`device_training`: its previous local model is ``sim.clients[k].params``."""
        with self.device_training(sim.model, self.down(global_shared), sim.clients[k].params, {}) as contrastive:
            yield contrastive


@dataclass
class FedOptRule(FedAvgRule):
    kind: FedOptKind = "adam"
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "fedadam"
    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)

    def aggregate(self, current, updates):
        avg = average(updates, list(current), self.weighted)
        new = {}
        for name, x in current.items():
            dtype = _work(x)
            xw = x.to(dtype)
            m = self.m.get(name, torch.zeros_like(xw))
            v = self.v.get(name, torch.full_like(xw, self.tau ** 2))
            x_new, self.m[name], self.v[name] = fedopt_update(xw, avg[name].to(dtype) - xw, m, v, self.kind, self.lr,
                                                              self.beta1, self.beta2, self.tau)
            new[name] = x_new.to(x.dtype)
        return new


RuleName = Literal["fedavg", "fedprox", "scaffold", "moon", "fedadam", "fedyogi", "fedadagrad"]


def make_rule(name: RuleName, num_clients: int, local_lr: float, **options) -> FedAvgRule:
    """A fresh rule (with fresh server/client optimiser state) for one run."""
    if name == "fedavg":
        return FedAvgRule(**options)
    if name == "fedprox":
        return FedProxRule(**options)
    if name == "scaffold":
        return ScaffoldRule(num_clients=num_clients, local_lr=local_lr, **options)
    if name == "moon":
        return MoonRule(**options)
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        return FedOptRule(kind=name.removeprefix("fed"), name=name, **options)
    raise ValueError(f"unknown federated optimiser {name!r}")

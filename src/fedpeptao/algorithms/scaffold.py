"""SCAFFOLD (Karimireddy et al., 2020), option II: control variates against client drift.

The server holds ``c`` and sends it with the shared tensors; each device holds its own ``c_k``
(in its :class:`~fedpeptao.core.federation.ClientState`, so it is checkpointed with the client),
corrects every local step by ``-lr (c - c_k)``, and sends back its tensors and ``dc_k``. Both
directions therefore carry twice the model tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, ExtraLoss, register
from fedpeptao.core.aggregation import ClientUpdate, PopulationUpdate, RoundUpdates, aggregation_weights, work_dtype
from fedpeptao.core.federation import ClientState
from fedpeptao.core.payload import Message
from fedpeptao.core.validation import groups_problem
from fedpeptao.utils.state import State, add_prefix, take_prefix

CONTROL = "scaffold.control"  # extras group sent down: c
DELTA_CONTROL = "scaffold.delta_control"  # extras group sent up: dc_k


class ScaffoldSettings(AlgorithmSettings):
    name: Literal["scaffold"] = "scaffold"
    server_lr: float = Field(1.0, gt=0.0)  # eta_g, the global step on the averaged change
    robust_averaging = False
    dp_refusal = ("scaffold sends per-client control-variate deltas that client-level DP does not cover; use "
                  "fedpeptao, whose control variates come from the privatised mean, or fedavg")


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


@register
class Scaffold(Algorithm):
    name = "scaffold"
    settings_class = ScaffoldSettings

    def __init__(self, settings, ctx, initial) -> None:
        super().__init__(settings, ctx, initial)
        self.control: dict[str, Tensor] = {}  # c

    def _c(self, name: str, ref: Tensor) -> Tensor:
        return self.control.get(name, torch.zeros_like(ref, dtype=work_dtype(ref)))

    def client_message(self, client_id: int) -> Message:
        shared = self.global_shared()
        return Message(shared, {CONTROL: {n: self._c(n, t).to(t.dtype) for n, t in shared.items()}})

    def extras_problem(self, update: ClientUpdate) -> str | None:
        """A reply carries ``dc_k`` for every shared tensor, shaped and typed like it, finite."""
        return groups_problem(update.extras, {DELTA_CONTROL: self.global_shared()})

    def aggregate(self, round_index: int, sampled: Sequence[int], updates: RoundUpdates) -> None:
        if isinstance(updates, PopulationUpdate):
            self._aggregate_sum(updates)
            return
        weights = aggregation_weights(updates)
        new = {}
        for name in self.shared:
            x = self.params[name]
            dtype = work_dtype(x)
            x_new, self.control[name] = scaffold_server(
                x.to(dtype), self._c(name, x), [u.params[name].to(dtype) for u in updates],
                [u.extras[DELTA_CONTROL][name].to(dtype) for u in updates], weights, self.ctx.num_clients,
                self.settings.server_lr)
            new[name] = x_new
        self._set_shared(new)

    def _aggregate_sum(self, population: PopulationUpdate) -> None:
        """Under secure aggregation: the step needs only the clients' weighted mean and the sum of
        their ``dc_k``, which travel in the same masked vector (``population.extras``), so it is
        :func:`scaffold_server`'s with the mean in place of the weighted sum of ``y_k``."""
        deltas = population.extras.get(DELTA_CONTROL)
        if deltas is None:
            raise TypeError("SCAFFOLD needs the sum of the clients' control-variate deltas, not only their mean")
        new = {}
        for name in self.shared:
            x = self.params[name]
            dtype = work_dtype(x)
            new[name], self.control[name] = scaffold_server(
                x.to(dtype), self._c(name, x), [population.params[name].to(dtype)], [deltas[name].to(dtype)], [1.0],
                self.ctx.num_clients, self.settings.server_lr)
        self._set_shared(new)

    def state(self) -> State:
        tensors, meta = super().state()
        return {**tensors, **add_prefix("control", self.control)}, meta

    def load_state(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.control = take_prefix(tensors, "control")

    # -- device ---------------------------------------------------------------------------
    @staticmethod
    def _ck(client: ClientState, name: str, ref: Tensor) -> Tensor:
        """The device's ``c_k`` for one tensor (zeros before its first round)."""
        return client.algo_state.get(name, torch.zeros_like(ref, dtype=work_dtype(ref)))

    @contextmanager
    def client_training(self, model: torch.nn.Module, message: Message, client: ClientState
                        ) -> Iterator[ExtraLoss | None]:
        params, control = dict(model.named_parameters()), message.extras[CONTROL]
        corrections = {id(params[name]): (control[name].to(work_dtype(ref)) - self._ck(client, name, ref)
                                          ).to(params[name])
                       for name, ref in message.model.items()}

        def after_step(optimizer, _args, _kwargs) -> None:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        corr = corrections.get(id(p))
                        if corr is not None:
                            p.sub_(group["lr"] * corr)

        # A global optimiser hook, registered while this device trains; it touches only this
        # device's parameters (by identity), so several devices of one batched pass can each hold
        # one. local_train builds its optimiser inside, so there is no instance to attach to beforehand.
        handle = register_optimizer_step_post_hook(after_step)
        try:
            yield None
        finally:
            handle.remove()

    def client_reply(self, message: Message, trained: dict[str, Tensor], num_steps: int, client: ClientState
                     ) -> Message:
        """The trained tensors, and ``dc_k = c_k+ - c_k`` (the device keeps ``c_k+``)."""
        control, deltas, new_state = message.extras[CONTROL], {}, dict(client.algo_state)
        for name, x in message.model.items():
            old = self._ck(client, name, x)
            new = scaffold_client_control(old, control[name].to(old.dtype), x.to(old.dtype),
                                          trained[name].to(old.dtype), num_steps, self.ctx.local_lr)
            new_state[name] = new
            deltas[name] = (new - old).to(x.dtype)
        client.algo_state = new_state
        return Message(trained, {DELTA_CONTROL: deltas})

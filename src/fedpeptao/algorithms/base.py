"""What a federated algorithm is: one small protocol that both runtimes drive the same way.

Modelled on FedJAX's ``FederatedAlgorithm`` (server ``init``/``apply``, client init/step/final)
and Flower's strategy hooks. An algorithm never sees how messages travel; the embedded simulator
(:mod:`fedpeptao.sim`) and the Flower apps (:mod:`fedpeptao.flower`) call the same hooks. What
travels either way is a :class:`~fedpeptao.core.payload.Message`: the model tensors, plus the
algorithm's own groups of tensors (``extras``), which only the algorithm reads and checks.

server side
    ``prepare_round(t, run_task)``  phases before round ``t``, and with ``t = rounds`` after the
                                    last one (FedPepTAO's layer selection); ``run_task`` asks
                                    clients for numbers
    ``client_message(k)``           what client ``k`` receives
    ``acknowledge(k)``              client ``k`` answered a message (so it holds what was sent)
    ``extras_problem(update)``      why a reply's extras are unusable (validation asks; None: fine)
    ``aggregate(t, sampled, updates)``  the server step on the round's validated updates: every
                                    client's, or only their privatised mean (central DP)
    ``state()`` / ``load_state()``  ALL server state, for exact resume, as a
                                    :data:`~fedpeptao.utils.state.State` (named tensors, JSON);
                                    ``summary()`` for the run's
device side (pure functions of what the device received and what it keeps, a :class:`ClientState`)
    ``client_start(message, client)``    the tensors the device trains or evaluates from
    ``client_training(model, message, client)``  a context yielding the local objective's extra
                                    term (FedProx, MOON) and hooking the step (SCAFFOLD)
    ``client_reply(message, trained, steps, client)``  what travels back up
    ``run_tasks(task, works)``      a client-side computation a phase asked for, on one pass's
                                    clients (one shared pass where the algorithm can pool them)

Update validation and robust averaging are runtime-wide: the runtime validates every update's
model tensors against :meth:`Algorithm.global_shared` and its extras with
:meth:`Algorithm.extras_problem` before ``aggregate``; averaging algorithms call ``ctx.average``,
which is the configured weighted mean, coordinate median or trimmed mean (and a population's
mean as released).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from fedpeptao.core.aggregation import ClientUpdate, RoundUpdates
from fedpeptao.core.federation import ClientState
from fedpeptao.core.payload import Message
from fedpeptao.core.validation import no_extras
from fedpeptao.utils.state import State, add_prefix, take_prefix

Tensors = dict[str, Tensor]
#: a term added to the local loss: ``extra(model, batch, output)``, where ``model`` is the client's
#: model (or its :class:`~fedpeptao.models.slots.ClientView` in a batched pass) and ``output`` the
#: forward's :class:`~fedpeptao.tasks.base.Output` on ``batch`` (with ``features``)
ExtraLoss = Callable[[torch.nn.Module, Mapping[str, Tensor], Any], Tensor]


class AlgorithmSettings(BaseModel):
    """Base of every algorithm's typed settings (``method.*`` in a config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    #: whether robust averaging (median, trimmed mean) can replace this algorithm's mean
    robust_averaging: ClassVar[bool] = True
    #: whether the algorithm needs per-layer parameter groups in the tuning
    needs_layer_groups: ClassVar[bool] = False
    #: why client-level DP cannot cover what this algorithm sends (None: it can)
    dp_refusal: ClassVar[str | None] = None
    #: why the algorithm cannot run on the sum of its clients' updates alone (None: it can)
    secure_aggregation_refusal: ClassVar[str | None] = None

    def private_releases(self) -> int:
        """How many data-dependent releases before training DP must count (FedPepTAO's selection)."""
        return 0


@dataclass
class ServerContext:
    """What the server side knows of the run; no model, no data (the Flower server has neither)."""

    num_clients: int
    local_lr: float  # the device lr (SCAFFOLD and FedPepTAO's control variates divide by it)
    seed: int
    rounds: int
    layer_groups: dict[int, list[str]]  # tuning's per-layer trainable tensors (empty: none)
    head_names: list[str]
    #: the runtime's averaging rule (:func:`~fedpeptao.core.aggregation.averaging`)
    average: Callable[[RoundUpdates], Tensors]
    #: under central DP with private selection: ``(vectors, bound, count) -> privatised mean``
    #: (:meth:`~fedpeptao.privacy.engine.ClientPrivacy.private_mean`); None without DP
    private_mean: Callable[[Sequence[np.ndarray], float, int], np.ndarray] | None = None


@dataclass
class ClientTask:
    """A client-side computation a phase needs (``kind``), on ``params``, by ``clients``.

    ``options[k]`` are client ``k``'s own numbers (seeds); ``round`` and ``stream`` seed its data
    draw with :func:`~fedpeptao.core.federation.round_seed`.
    """

    kind: str
    clients: list[int] | None  # None: every client
    params: Tensors
    round: int = 0
    stream: int = 0
    options: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class ClientWork:
    """What a device offers a task: the model, its data, and the seed for this task's draw."""

    client_id: int
    model: torch.nn.Module
    data: Any  # EncodedDataset
    indices: np.ndarray
    seed: int
    batch_size: int


RunTask = Callable[[ClientTask], dict[int, dict[str, Any]]]


class Algorithm:
    """Base class: plain FedAvg behaviour on every hook; subclasses override what differs."""

    name: ClassVar[str]
    settings_class: ClassVar[type[AlgorithmSettings]]

    def __init__(self, settings: AlgorithmSettings, ctx: ServerContext, initial: Tensors) -> None:
        self.settings = settings
        self.ctx = ctx
        self.params: Tensors = dict(initial)  # every trainable tensor the server holds
        self.shared: list[str] = list(initial)  # the names that travel

    def global_shared(self) -> Tensors:
        return {name: self.params[name] for name in self.shared}

    def _set_shared(self, new: Mapping[str, Tensor]) -> None:
        self.params.update({name: new[name].to(self.params[name].dtype) for name in self.shared})

    # -- server ---------------------------------------------------------------------------
    def prepare_round(self, round_index: int, run_task: RunTask) -> None:
        """Phases before round ``round_index`` (none by default); the runtime also calls it once
        with ``round_index = rounds`` after the last round."""

    def client_message(self, client_id: int) -> Message:
        return Message(self.global_shared())

    def acknowledge(self, client_id: int) -> None:
        """Client ``client_id`` answered a message; nothing to remember by default."""

    def extras_problem(self, update: ClientUpdate) -> str | None:
        """Why ``update``'s extras are unusable (None: they are fine); by default a reply carries none."""
        return no_extras(update)

    def aggregate(self, round_index: int, sampled: Sequence[int], updates: RoundUpdates) -> None:
        self._set_shared(self.ctx.average(updates))

    def state(self) -> State:
        """Everything needed to continue exactly: ``(tensors, meta)``, the tensors named by group
        (``params/<name>``; a subclass adds its own groups), the meta JSON only."""
        return add_prefix("params", self.params), {"shared": list(self.shared)}

    def load_state(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Continue from what :meth:`state` returned (read back from a checkpoint)."""
        self.params = take_prefix(tensors, "params")
        self.shared = list(meta["shared"])

    def summary(self) -> dict[str, Any]:
        """Algorithm-specific lines for the run summary."""
        return {}

    # -- device ---------------------------------------------------------------------------
    def client_start(self, message: Message, client: ClientState) -> Tensors:
        """The trainable tensors the device works from: its own, overwritten by the shared ones."""
        return {**client.params, **message.model}

    @contextmanager
    def client_training(self, model: torch.nn.Module, message: Message, client: ClientState
                        ) -> Iterator[ExtraLoss | None]:
        yield None

    def client_reply(self, message: Message, trained: Tensors, num_steps: int, client: ClientState) -> Message:
        """What travels back: ``trained`` (the received model tensors after local training)."""
        return Message(trained)

    def run_tasks(self, task: ClientTask, works: Sequence[ClientWork]) -> list[dict[str, Any]]:
        """A phase's client computation on one pass's clients (whose model holds ``task.params``);
        the executor decides who shares a pass, the algorithm may pool them in it."""
        raise ValueError(f"{self.name} asks clients for no task, got {task.kind!r}")


REGISTRY: dict[str, type[Algorithm]] = {}
#: called after every registration (the config then accepts the new ``method.name``)
REGISTERED: list[Callable[[], None]] = []


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm selectable as ``method.name``, also one registered
    after the config was imported (a plug-in, or an algorithm defined in a test)."""
    names = getattr(cls.settings_class.model_fields["name"].annotation, "__args__", (cls.name,))
    for name in names:
        REGISTRY[name] = cls
    for listener in REGISTERED:
        listener()
    return cls

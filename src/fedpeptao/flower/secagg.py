"""Secure aggregation for the Message-API ServerApp, through Flower's own SecAgg+ protocol.

The server learns the sum of the sampled clients' contributions, never one of them. Nothing
cryptographic is ours: Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` runs the four
stages (setup, share keys, collect masked vectors, unmask) against the nodes, and Flower's
:func:`~flwr.client.mod.secaggplus_mod` answers them on each node (key pairs, Shamir shares,
pairwise and private masks, quantization). This module only adapts the workflow, written for the
legacy ``Strategy``/``FitRes`` world, to one secure sum per call:

* :func:`secure_sum` drives the workflow for one round with a throw-away ``LegacyContext`` whose
  legacy strategy names the nodes and captures the unmasked vector instead of aggregating it;
  each node's training content is ours (the workflow would send it a converted ``FitIns``);
* the workflow forgets nodes that dropped before they distributed their key shares only after it
  has asked everyone for shares of their keys, which makes the unmask stage fail; as in Bonawitz
  et al. (2017), the set of users whose masks must be removed is the set that shared keys, so the
  adapter narrows the workflow's ``sampled_node_ids`` to it after the setup and share-keys stages;
* :func:`contribution` builds what a node's train handler replies with under SecAgg+: its arrays
  (already multiplied by its weight, as float64, flattened: Flower's unmasking loses the offset of
  0-d arrays) and its weight as one more entry, laid out as the ``FitRes`` the mod expects; the mod
  quantizes and masks them and clears every array before the reply leaves the node;
* :func:`secaggplus_when_asked` is Flower's mod applied only to train messages that carry a SecAgg+
  stage, so one train handler serves secure and plain rounds alike.

Quantization (``flwr.common.secure_aggregation.quantization``): every entry ``x`` is clipped to
``[-c, c]`` (``c = clipping_range``), mapped to ``y = (x + c) * T / (2c)`` (``T =
quantization_range``) and rounded *stochastically* to ``floor(y)`` or ``ceil(y)`` with
``E[q] = y``. So each entry of each contribution carries an unbiased error below one quantum
``2c / T``, and an entry of the sum over ``n`` contributors an error below ``n * 2c / T``
(standard deviation at most ``sqrt(n) * c / T``). Entries beyond ``+-c`` are clipped silently by
Flower: keep ``|weight * value| <= c`` and ``weight <= c``. The sum is exact modulo
``modulus_range``, so ``n * T < modulus_range`` is required (checked here; Flower only warns about
``num_shares``). Flower's arithmetic is int64 and wraps modulo ``2**64``, which a power-of-two
modulus divides, so moduli past its default ``2**32`` work (``T = 2**30``, ``modulus = 2**40`` is
tested); ``T`` stays below ``2**31`` (Flower rounds into int32).

Dropouts: a node that fails before it has distributed its key shares is simply not in the sum; one
that fails after (no masked vector) is not in the sum either, and its pairwise masks are removed
with its key rebuilt from ``reconstruction_threshold`` of its neighbours' shares; one that fails
in the unmask stage is in the sum. The sum completes while every node still has at least
``reconstruction_threshold`` live neighbours (with ``num_shares=1.0`` every node neighbours every
other, so: while at least that many nodes answer every stage, the unmask stage included).
Otherwise :func:`secure_sum` raises :class:`SecureAggregationError` and nothing is revealed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

log = logging.getLogger("fedpeptao.flower.secagg")

#: the key, in the reply's ``fitres.metrics``, of the contributed arrays' names and shapes (JSON)
LAYOUT = "secagg.layout"


class SecureAggregationError(RuntimeError):
    """The SecAgg+ round halted (too few nodes answered) or its replies do not fit together."""


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters (Flower's ``SecAggPlusWorkflow`` arguments).

    ``num_shares``: neighbours each node shares its keys with (itself included); a float is a
    fraction of the sampled nodes (``1.0``: all of them). ``reconstruction_threshold``: shares
    needed to rebuild a key, so the least number of live neighbours every node needs; a float is a
    fraction of ``num_shares`` (rounded, at least 2). Higher: more nodes must collude with the
    server to rebuild a node's secrets, fewer may drop out; the default, ``2/3`` of all sampled
    nodes, tolerates a third dropping out and keeps the threshold above half of them.
    ``clipping_range``, ``quantization_range``, ``modulus_range``: see the module docstring.
    ``timeout``: seconds each of the four stages waits for replies (``None``: forever).
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 2 / 3
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    timeout: float | None = 600.0

    @property
    def quantum(self) -> float:
        """The value of one quantization step, ``2 * clipping_range / quantization_range``."""
        return 2.0 * self.clipping_range / self.quantization_range

    def error_bound(self, contributors: int) -> float:
        """Largest per-entry error of a sum over ``contributors`` (values within the clipping range)."""
        return contributors * self.quantum

    def check(self, num_nodes: int) -> None:
        """Raise ``ValueError`` for settings that cannot sum ``num_nodes`` contributions exactly."""
        if num_nodes < 2:
            raise ValueError(f"SecAgg+ needs at least 2 nodes, got {num_nodes}")
        if not self.clipping_range > 0:
            raise ValueError(f"clipping_range must be > 0, got {self.clipping_range}")
        if not 1 < self.quantization_range < 2**31:  # Flower rounds into int32
            raise ValueError(f"quantization_range must be in (1, 2**31), got {self.quantization_range}")
        if self.modulus_range & (self.modulus_range - 1) or self.modulus_range > 2**62:
            raise ValueError(f"modulus_range must be a power of 2 up to 2**62, got {self.modulus_range}")
        if num_nodes * self.quantization_range >= self.modulus_range:
            raise ValueError(f"{num_nodes} nodes x quantization_range {self.quantization_range} overflow "
                             f"modulus_range {self.modulus_range}: the sum would wrap around")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout}")


@dataclass
class SecureSum:
    """What the server learns from a SecAgg+ round.

    ``arrays``: the sum over contributors of their (weighted) arrays, float64, each entry within
    ``settings.error_bound(contributors)`` of the exact sum. ``weight_sum``: the sum of their
    weights (same bound). ``contributors``: node ids whose vectors are in the sum. ``dropped``: the
    other requested node ids. ``metrics``: each contributor's plaintext ``metrics`` (public by
    construction: only the arrays are protected).
    """

    arrays: dict[str, np.ndarray]
    weight_sum: float
    contributors: list[int]
    dropped: list[int]
    metrics: dict[int, dict[str, Scalar]] = field(default_factory=dict)

    @property
    def num_contributors(self) -> int:
        return len(self.contributors)

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean, ``arrays / weight_sum``."""
        if self.weight_sum <= 0:
            raise ValueError(f"the contributors' weights sum to {self.weight_sum}")
        return {name: value / self.weight_sum for name, value in self.arrays.items()}


# -- client side ------------------------------------------------------------------------------

def is_secure(message: Message) -> bool:
    """Whether a train message is (a stage of) a SecAgg+ round."""
    return message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records


def secaggplus_when_asked(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for train messages that carry a SecAgg+ stage; others pass."""
    if message.metadata.message_type == MessageType.TRAIN and is_secure(message):
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def clipping_range(context: Context) -> float | None:
    """The clipping range of this node's current SecAgg+ round (``None`` outside one)."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    value = None if state is None else state.get("clipping_range")
    return None if not value else float(cast(float, value))


def contribution(weighted: Mapping[str, np.ndarray], weight: float, *, metrics: Mapping[str, Scalar] | None = None,
                 context: Context | None = None) -> RecordDict:
    """A train reply's content under SecAgg+: ``weighted`` (arrays already multiplied by the
    node's ``weight``) and ``weight``, to be summed over the nodes; ``metrics`` travel in plaintext.

    Laid out as the legacy ``FitRes`` that ``secaggplus_mod`` reads, with ``num_examples=1``
    (the workflow runs with ``max_weight=1``, so Flower's own weighting is the identity and the
    real weight stays inside the masked sum). Values are sent as float64 (the quantizer's
    arithmetic would otherwise be float32's). With ``context``, raise ``ValueError`` when a value
    exceeds the round's clipping range instead of letting Flower clip it.
    """
    names = list(weighted)
    values = [np.asarray(weighted[name], dtype=np.float64) for name in names]
    layout = json.dumps({"names": names, "shapes": [list(v.shape) for v in values]})
    # flat: Flower's unmasking turns 0-d arrays into scalars and then loses their offset
    arrays = [v.reshape(-1) for v in values] + [np.array([weight], dtype=np.float64)]
    bound = clipping_range(context) if context is not None else None
    if bound is not None:
        outside = sum(int(np.count_nonzero(np.abs(a) > bound)) for a in arrays)
        if outside:
            raise ValueError(f"{outside} contributed values exceed the clipping range {bound}")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples=1,
                    metrics={**(metrics or {}), LAYOUT: layout})
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# -- server side ------------------------------------------------------------------------------

def secure_sum(grid: Grid, round_messages: Mapping[int, RecordDict] | Iterable[Message],
               settings: SecAggSettings | None = None, *, round_index: int = 0) -> SecureSum:
    """Run one SecAgg+ round: each node gets its content (``round_messages``: node id -> content,
    or the Messages a strategy built, by ``dst_node_id``) in the 'collect masked vectors' stage,
    its train handler (behind :func:`secaggplus_when_asked`) replies with a :func:`contribution`,
    and only the sum comes back. Raises :class:`SecureAggregationError` when too few nodes stay.
    """
    settings = settings or SecAggSettings()
    contents = _contents(round_messages)
    settings.check(len(contents))
    capture = _Capture(contents)
    workflow = _OneRoundSecAggPlus(settings, contents)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=capture)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow(grid, context)
    state = workflow.state
    if capture.results is None:
        active = 0 if state is None else len(state.active_node_ids)
        threshold = 0 if state is None else state.threshold
        raise SecureAggregationError(f"SecAgg+ halted with {active} of {len(contents)} nodes active "
                                     f"(reconstruction threshold {threshold}); no sum this round")
    return _unpack(capture.results, contents, settings)


def _contents(round_messages: Mapping[int, RecordDict] | Iterable[Message]) -> dict[int, RecordDict]:
    if isinstance(round_messages, Mapping):
        pairs = list(round_messages.items())
    else:
        pairs = [(m.metadata.dst_node_id, m.content) for m in round_messages]
    contents: dict[int, RecordDict] = {}
    for node, content in pairs:
        if node in contents:
            raise ValueError(f"two messages for node {node}")
        if RECORD_KEY_CONFIGS in content.config_records:
            raise ValueError(f"'{RECORD_KEY_CONFIGS}' is SecAgg+'s record name")
        contents[int(node)] = content
    return contents


def _unpack(results: list[tuple[ClientProxy, FitRes]], contents: Mapping[int, RecordDict],
            settings: SecAggSettings) -> SecureSum:
    """The workflow hands every result the same vector: the sum over contributors divided by
    their number (Flower's mean of ``num_examples=1`` each); multiply back to the sum."""
    contributors = sorted(proxy.node_id for proxy, _ in results)
    layouts = {str(fitres.metrics.get(LAYOUT)) for _, fitres in results}
    if len(layouts) != 1:
        raise SecureAggregationError(f"contributors sent differently laid out arrays: {sorted(layouts)}")
    layout = json.loads(layouts.pop())
    names, shapes = layout["names"], [tuple(shape) for shape in layout["shapes"]]
    mean = parameters_to_ndarrays(results[0][1].parameters)
    sizes = [math.prod(shape) for shape in shapes] + [1]
    if [a.size for a in mean] != sizes:
        raise SecureAggregationError(f"summed arrays of sizes {[a.size for a in mean]}, expected {sizes}")
    summed = [np.asarray(a, dtype=np.float64) * len(results) for a in mean]
    arrays = {name: value.reshape(shape) for name, shape, value in zip(names, shapes, summed)}
    metrics = {proxy.node_id: {k: v for k, v in fitres.metrics.items() if k != LAYOUT} for proxy, fitres in results}
    out = SecureSum(arrays, float(summed[-1][0]), contributors, sorted(set(contents) - set(contributors)), metrics)
    log.info("secure sum over %d of %d nodes (dropped %s), per-entry error < %.3g", len(contributors),
             len(contents), out.dropped, settings.error_bound(len(contributors)))
    return out


class _NodeProxy(ClientProxy):
    """A node id in the shape the legacy workflow wants; it is never called."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - legacy API, unused
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError


class _Capture(LegacyStrategy):
    """The legacy strategy the workflow calls: samples exactly our nodes, keeps the unmasked result."""

    def __init__(self, contents: Mapping[int, RecordDict]) -> None:
        self.nodes = list(contents)
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        # the FitIns are placeholders: _OneRoundSecAggPlus sends each node its own content
        return [(_NodeProxy(node), FitIns(Parameters([], "numpy.ndarray"), {})) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):  # pragma: no cover - unused by the workflow
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # pragma: no cover
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # pragma: no cover
        return None, {}

    def evaluate(self, server_round, parameters):  # pragma: no cover
        return None


class _OneRoundSecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, each node's training content ours, and the set of nodes whose masks are
    removed narrowed to those that distributed key shares (the paper's U2; see the module doc)."""

    def __init__(self, settings: SecAggSettings, contents: Mapping[int, RecordDict]) -> None:
        super().__init__(settings.num_shares, settings.reconstruction_threshold, max_weight=1.0,
                         clipping_range=float(settings.clipping_range),
                         quantization_range=int(settings.quantization_range),
                         modulus_range=int(settings.modulus_range), timeout=settings.timeout)
        self._contents = contents
        self.state: WorkflowState | None = None

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.state = state
        if not super().setup_stage(grid, context, state):
            return False
        # a copy: the workflow adds its stage record to the content it sends
        state.nid_to_fitins = {node: RecordDict(dict(self._contents[node].items())) for node in state.nid_to_fitins}
        return self._narrow(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        super().share_keys_stage(grid, context, state)
        return self._narrow(state)

    def _narrow(self, state: WorkflowState) -> bool:
        """Nodes that left before sharing their keys hold no mask in anyone's vector: forget them."""
        state.sampled_node_ids = set(state.active_node_ids)
        if len(state.active_node_ids) < 2 or len(state.active_node_ids) < state.threshold:
            log.error("SecAgg+: %d nodes left, reconstruction threshold %d", len(state.active_node_ids),
                      state.threshold)
            return False
        return self._check_threshold(state)


__all__ = ["LAYOUT", "SecAggSettings", "SecureAggregationError", "SecureSum", "clipping_range",
           "contribution", "is_secure", "secaggplus_when_asked", "secure_sum"]

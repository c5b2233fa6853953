"""Secure aggregation through Flower's own SecAgg+ (``fedpeptao.flower.secagg``).

A trivial ClientApp behind ``secaggplus_when_asked`` (Flower's ``secaggplus_mod``) contributes a
known random float vector per node, multiplied by a known weight. Checked: the secure sum equals
the plain sum within the quantization bound; nothing the server code receives holds a node's plain
vector (or its weight); nodes that drop after the key exchange, in the unmask stage or before
sharing keys leave a sum over the others; too few nodes halt it. Most tests use an in-process grid
(messages go through Flower's protobuf serde, each node keeps its own Context); one runs the same
apps on Flower's simulation engine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_helpers import InProcessGrid, secagg_stage  # noqa: E402

from fedpeptao.flower.secagg import (  # noqa: E402
    SecAggSettings,
    SecureAggregationError,
    contribution,
    is_secure,
    secaggplus_when_asked,
    secure_sum,
)

SHAPES = {"prompt": (4, 8), "head.weight": (2, 8), "head.bias": (2,), "scale": ()}
SETTINGS = SecAggSettings(num_shares=1.0, reconstruction_threshold=3, clipping_range=4.0, timeout=30.0)
DEFAULTS = SecAggSettings(timeout=60.0)  # all nodes share keys, 2/3 of them rebuild one, c = 8, T = 2**22


def plain(partition: int) -> tuple[dict[str, np.ndarray], float]:
    """Partition ``partition``'s vector and weight, the same in every process."""
    rng = np.random.default_rng(1234 + partition)
    return {name: rng.uniform(-1.0, 1.0, shape) for name, shape in SHAPES.items()}, 0.5 + 0.25 * partition


def weighted(partition: int) -> dict[str, np.ndarray]:
    arrays, weight = plain(partition)
    return {name: weight * a for name, a in arrays.items()}


# -- the ClientApp ------------------------------------------------------------------------------

app = ClientApp()


@app.train(mods=[secaggplus_when_asked])
def train(message: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if not is_secure(message):  # a plain round: the same handler, no mod involved
        return Message(RecordDict({"plain": ConfigRecord({"partition": partition})}), reply_to=message)
    if partition in set(message.content["task"]["drop"]):  # fails after the key exchange
        raise RuntimeError(f"partition {partition} lost its connection")
    _, weight = plain(partition)
    return Message(contribution(weighted(partition), weight, metrics={"partition": partition}, context=context),
                   reply_to=message)


def round_content(drop: Iterable[int] = ()) -> RecordDict:
    return RecordDict({"task": ConfigRecord({"drop": [int(p) for p in drop] or [-1]})})


# -- an in-process grid that records what the server code receives --------------------------------

class WireGrid(InProcessGrid):
    """The project's in-process grid over ``app`` (node ``100 + k`` is partition ``k``), through Flower's
    serde both ways, every reply kept in ``received``. Nodes in ``silent_at[stage]`` do not answer
    that SecAgg+ stage (a timeout)."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(app, {100 + k: {"partition-id": k} for k in range(num_nodes)}, wire=True)
        self.silent_at: dict[str, set[int]] = {}

    @property
    def stages(self) -> list[str]:
        """The SecAgg+ stage of every message sent, in order."""
        return [secagg_stage(message) for message in self.sent]

    def partition(self, node: int) -> int:
        return int(self.contexts[node].node_config["partition-id"])

    def answer(self, node: int, message: Message) -> Message | None:
        return None if node in self.silent_at.get(secagg_stage(message), ()) else super().answer(node, message)


def expected_sum(partitions: Iterable[int]) -> tuple[dict[str, np.ndarray], float]:
    partitions = list(partitions)
    arrays = {name: sum(weighted(p)[name] for p in partitions) for name in SHAPES}
    return arrays, sum(plain(p)[1] for p in partitions)


def assert_sum(result, partitions: list[int], settings: SecAggSettings = SETTINGS) -> None:
    arrays, weight = expected_sum(partitions)
    bound = settings.error_bound(len(partitions)) + 1e-12  # + float64 rounding of the unmasking
    assert result.arrays.keys() == arrays.keys()
    for name, value in arrays.items():
        assert result.arrays[name].shape == value.shape
        assert np.max(np.abs(result.arrays[name] - value)) < bound, name
    assert abs(result.weight_sum - weight) < bound
    # stochastic rounding: an error, but not zero everywhere (the sum did go through quantization)
    assert max(np.max(np.abs(result.arrays[n] - v)) for n, v in arrays.items()) > 0


# -- tests --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _task_identity():
    """The grid stamps messages as Flower's running task would; give the session its identity back."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_secure_sum_equals_plain_sum_within_the_quantization_bound():
    grid = WireGrid(5)
    result = secure_sum(grid, {node: round_content() for node in grid.contexts}, SETTINGS, round_index=3)
    assert result.contributors == sorted(grid.contexts) and result.dropped == []
    assert result.num_contributors == 5
    assert_sum(result, list(range(5)))
    assert result.metrics == {node: {"partition": grid.partition(node)} for node in grid.contexts}
    mean = result.mean()
    arrays, weight = expected_sum(range(5))
    assert np.allclose(mean["prompt"], arrays["prompt"] / weight, atol=1e-4)
    # Flower's four stages, once each to every node
    assert grid.stages == [s for s in Stage.all() for _ in range(5)]
    # the per-entry bound: 2c/T per contribution
    assert SETTINGS.error_bound(5) == pytest.approx(5 * 2 * 4.0 / 2**22)


@pytest.mark.parametrize("levels, modulus", [(2**8, 2**32), (2**30, 2**40)])
def test_quantization_errors_stay_within_the_bound(levels, modulus):
    """With 2**8 levels the rounding errors are plain to see, and still below n * 2c / T; with 2**30
    levels (a modulus past Flower's default) they are a thousand times smaller than by default."""
    settings = SecAggSettings(num_shares=1.0, reconstruction_threshold=3, clipping_range=4.0,
                              quantization_range=levels, modulus_range=modulus, timeout=30.0)
    grid = WireGrid(5)
    result = secure_sum(grid, {node: round_content() for node in grid.contexts}, settings)
    assert_sum(result, list(range(5)), settings)
    arrays, _ = expected_sum(range(5))
    errors = np.concatenate([(result.arrays[n] - v).reshape(-1) for n, v in arrays.items()])
    assert np.max(np.abs(errors)) > settings.quantum / 4  # rounding, not float noise
    assert settings.error_bound(5) == 5 * 2 * 4.0 / levels


def secret_values(partition: int) -> np.ndarray:
    """Everything partition ``partition`` keeps from the server: its weighted arrays and weight."""
    return np.concatenate([a.reshape(-1) for a in weighted(partition).values()] + [[plain(partition)[1]]])


def assert_nothing_plain(replies: list[Message], partition_of: dict[int, int], settings: SecAggSettings) -> None:
    """No reply the server code received holds a node's plain values: no ArrayRecord has an entry,
    no plaintext float and no 8 bytes of the whole serialized reply are one of them, and each
    masked vector is nowhere near the node's quantized vector."""
    c, t, m = settings.clipping_range, settings.quantization_range, settings.modulus_range
    secrets = {p: secret_values(p) for p in set(partition_of.values())}
    every_secret = np.concatenate(list(secrets.values()))
    patterns = [v.tobytes() for v in every_secret.astype(np.float64)]
    masked_seen = 0
    for reply in replies:
        if reply.has_error():
            continue
        content = reply.content
        # secaggplus_mod cleared every array of the train handler's reply
        assert all(len(record) == 0 for record in content.array_records.values())
        for record in [*content.config_records.values(), *content.metric_records.values()]:
            for value in record.values():
                floats = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, float)]
                assert not np.isin(floats, every_secret).any()
        wire = message_to_proto(reply).SerializeToString()
        assert not any(pattern in wire for pattern in patterns)
        configs = content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            masked_seen += 1
            vector = np.concatenate([bytes_to_ndarray(b).reshape(-1) for b in configs[Key.MASKED_PARAMETERS]])
            vector = vector[1:]  # [0] is Flower's weighting factor, T for everyone here
            (quantized,) = quantize([secrets[partition_of[reply.metadata.src_node_id]]], c, t)
            assert vector.shape == quantized.shape and np.all((vector >= 0) & (vector < m))
            # masked entries are uniform on [0, m): (almost) none within a few quanta of the plain one,
            # most beyond t, where no quantized value can be
            assert np.mean(np.abs(vector - quantized) <= 4) < 0.05
            assert np.mean(vector > t) > 0.5
    assert masked_seen > 0


def test_no_plain_vector_reaches_the_server():
    grid = WireGrid(4)
    result = secure_sum(grid, {node: round_content() for node in grid.contexts}, SETTINGS)
    assert_sum(result, list(range(4)))
    assert len(grid.received) == 16 and not any(m.has_error() for m in grid.received)
    assert_nothing_plain(grid.received, {n: grid.partition(n) for n in grid.contexts}, SETTINGS)
    masked = [r for r in grid.received if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 4


def test_node_dropping_after_key_exchange_leaves_the_sum_of_the_others():
    grid = WireGrid(5)
    nodes = sorted(grid.contexts)
    # partition 1 raises in its train handler (the 'collect masked vectors' stage)
    result = secure_sum(grid, {node: round_content(drop=[1]) for node in nodes}, SETTINGS)
    assert result.dropped == [nodes[1]] and result.num_contributors == 4
    assert_sum(result, [0, 2, 3, 4])
    # partition 3 does not answer at all at that stage (a timeout)
    grid = WireGrid(5)
    grid.silent_at[Stage.COLLECT_MASKED_VECTORS] = {nodes[3]}
    result = secure_sum(grid, {node: round_content() for node in nodes}, SETTINGS)
    assert result.dropped == [nodes[3]]
    assert_sum(result, [0, 1, 2, 4])


def test_node_dropping_in_the_unmask_stage_is_still_in_the_sum():
    grid = WireGrid(5)
    nodes = sorted(grid.contexts)
    grid.silent_at[Stage.UNMASK] = {nodes[0]}
    result = secure_sum(grid, {node: round_content() for node in nodes}, SETTINGS)
    assert result.dropped == [] and result.num_contributors == 5
    assert_sum(result, list(range(5)))


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_node_dropping_before_sharing_keys_is_left_out(stage):
    grid = WireGrid(5)
    nodes = sorted(grid.contexts)
    grid.silent_at[stage] = {nodes[2]}
    result = secure_sum(grid, {node: round_content() for node in nodes}, SETTINGS)
    assert result.dropped == [nodes[2]]
    assert_sum(result, [0, 1, 3, 4])


def test_too_few_survivors_halt_the_round():
    grid = WireGrid(4)
    nodes = sorted(grid.contexts)
    # threshold 3: with two of four nodes failing, no key can be rebuilt
    with pytest.raises(SecureAggregationError, match="halted"):
        secure_sum(grid, {node: round_content(drop=[0, 1]) for node in nodes}, SETTINGS)


def test_plain_train_messages_bypass_the_mod_and_settings_are_checked():
    grid = WireGrid(2)
    node = next(iter(grid.contexts))
    message = Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=node, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    reply = app(message=message, context=grid.contexts[node])
    assert reply.content["plain"]["partition"] == 0
    with pytest.raises(ValueError, match="overflow"):
        SecAggSettings(quantization_range=2**22, modulus_range=2**24).check(5)
    with pytest.raises(ValueError, match="at least 2"):
        secure_sum(grid, {node: round_content()}, SETTINGS)
    # a value beyond the clipping range is refused on the node rather than clipped silently
    grid = WireGrid(3)
    contents = {n: round_content() for n in grid.contexts}
    narrow = SecAggSettings(num_shares=1.0, reconstruction_threshold=2, clipping_range=0.5, timeout=30.0)
    with pytest.raises(SecureAggregationError):
        secure_sum(grid, contents, narrow)
    assert any(m.has_error() and "clipping range" in m.error.reason for m in grid.received)


# -- Flower's simulation engine -----------------------------------------------------------------

def test_secure_sum_on_flowers_simulation_engine():
    """The same ClientApp on 4 virtual SuperNodes (Ray), default settings (threshold 3 of 4);
    partition 2 fails after the key exchange."""
    from flwr.simulation import run_simulation  # noqa: PLC0415

    out: dict = {"received": []}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        while len(list(grid.get_node_ids())) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
        try:
            out["result"] = secure_sum(RecordingGrid(grid, out["received"]),
                                       {n: round_content(drop=[2]) for n in nodes}, DEFAULTS)
        except Exception as exc:  # surfaced by the assertion below
            out["error"] = exc

    backend = {"init_args": {"num_cpus": 1, "include_dashboard": False},
               "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(server, app, num_supernodes=4, backend_name="ray", backend_config=backend)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.num_contributors == 3 and len(result.dropped) == 1
    partitions = sorted(int(result.metrics[n]["partition"]) for n in result.contributors)
    assert partitions == [0, 1, 3]
    assert_sum(result, partitions, DEFAULTS)
    # what the engine's grid handed the server code: 4 + 4 + 4 (one an error) + 3 replies, nothing plain
    assert len(out["received"]) == 15 and sum(m.has_error() for m in out["received"]) == 1
    partition_of = {n: int(result.metrics[n]["partition"]) for n in result.contributors}
    assert_nothing_plain([m for m in out["received"] if m.metadata.src_node_id in partition_of], partition_of,
                         DEFAULTS)


class RecordingGrid:
    """Flower's grid with every reply the server code receives kept in ``received``."""

    def __init__(self, grid: Grid, received: list[Message]) -> None:
        self._grid, self.received = grid, received

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

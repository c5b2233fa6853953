"""Any algorithm of :mod:`fedpeptao.algorithms` as a Flower ``Strategy`` over the Message API.

The stock strategies average one ArrayRecord with identical keys from every reply. Our
algorithms need more (per-client messages, server-held per-client state, client-side tasks
before a round), so this strategy is a transport around the run's
:class:`~fedpeptao.engine.rounds.RoundEngine`, the same one the embedded simulator drives:

* the engine's phases run before each round, their client tasks sent as ``query.task`` messages;
* the engine's message for client ``k`` is what travels to it (and is counted there);
* replies go back to the engine (validation, privacy, the algorithm's step, pooled metrics);
  under ``privacy.secure_aggregation`` no reply holds an update: :meth:`configure_train` runs
  Flower's SecAgg+ over the sampled nodes (:func:`~fedpeptao.flower.secagg.secure_sum`) and the
  engine receives only the sum (a halted protocol skips the round, as no replies would);
* the same random stream (``numpy.random.default_rng(cfg.seed)``) draws the clients of each
  round, so with every client online a Flower run samples exactly as the simulator does;
* clients are identified by their ``client-id`` (the partition id), not Flower's node id,
  because the algorithm's state, the seeds and the data all belong to the client;
* a client that errors, or does not answer within the timeout, is left out of that round; the
  round updates the global tensors when at least ``min_replies`` clients answered, and
  otherwise leaves them unchanged. A client that just failed is not asked to evaluate in the
  same round, so a dead node costs one timeout per round, not two;
* every ``checkpoint.every`` rounds the whole server state (algorithm, sampling stream, history)
  goes to a crash-safe checkpoint; a restarted ServerApp continues from the newest one;
* rounds are numbered as everywhere a user reads them, globally from 1: a message's group is its
  round's number, and Flower's console line ``[ROUND n/N]`` counts this start's rounds from 1 (its
  ``start`` loop knows no earlier rounds), so :meth:`FederatedStrategy.start` has it show the run's
  round and total instead (``[ROUND 4/5]`` for the first round after a resume from round 3).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeptao.algorithms import Algorithm
from fedpeptao.algorithms.base import ClientTask
from fedpeptao.config import ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.engine.rounds import SPLITS, EvalReply, RoundEngine, SplitResult, TrainReply
from fedpeptao.experiment import make_privacy, make_run_algorithm
from fedpeptao.flower import records as R
from fedpeptao.flower.logs import global_round_numbers
from fedpeptao.flower.secagg import SecAggSettings, SecureAggregationError, secure_sum
from fedpeptao.privacy.secure import SecureRound, secure_summary
from fedpeptao.report.summary import run_summary
from fedpeptao.utils.state import State

log = logging.getLogger("fedpeptao.flower.server")

Tensors = dict[str, torch.Tensor]


class FederatedStrategy(Strategy):
    """Server side of a run; call :meth:`setup` before ``start`` and :meth:`finish` after."""

    def __init__(self, cfg: ExperimentConfig, *, timeout: float = 600.0, min_replies: int = 1,
                 run_dir: Path | None = None, checkpoint_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout
        # the algorithm is made at setup, from the initial tensors the nodes report
        self.engine = RoundEngine(cfg, None, make_privacy(cfg), cfg.data.metric or "accuracy", run_dir,
                                  checkpoint_dir, min_replies, extra_state=self._checkpoint_section)
        self.clients: dict[int, int] = {}  # client id -> Flower node id
        self.refused: set[int] = set()  # node ids whose initial tensors disagree with the federation's
        self.initial: Tensors = {}
        self.names: dict | None = None  # layer groups and head names, from the first node
        self.run_key = uuid.uuid4().hex[:16]  # nodes keep this run's state under it (kept across restarts)
        self.first_round = 0
        self._grid: Grid | None = None
        self._sampled: dict[int, int] = {}
        self._failed_nodes: set[int] = set()
        self._secure: tuple[SecureRound | None, str] = (None, "")  # the round's sum under secure aggregation

    @property
    def algorithm(self) -> Algorithm | None:
        return self.engine.algorithm

    @property
    def history(self) -> list[dict]:
        return self.engine.history

    @property
    def metric(self) -> str:
        return self.engine.metric

    # -- Strategy interface ----------------------------------------------------------------
    def summary(self) -> None:
        fed = self.cfg.federated
        log.info("FederatedStrategy: %s, %d of %d clients per round, rounds %d..%d, min_replies=%d, timeout=%.0fs",
                 self.cfg.describe(), fed.clients_per_round, fed.num_clients, self.first_round + 1, fed.rounds,
                 self.engine.min_replies, self.timeout)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args, **kwargs):
        """Flower's round loop, its ``[ROUND n/N]`` lines showing the run's global round and total."""
        with global_round_numbers(self.first_round, self.cfg.federated.rounds):
            return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        engine, t = self._engine(), self._round(server_round)
        self._grid = grid
        if engine.stopped or engine.budget_spent(t):
            return []
        self._discover(grid)
        engine.prepare(t, self._run_task)
        self._failed_nodes = set()
        sampled = engine.sample(self._online(grid))
        self._sampled = {cid: self.clients[cid] for cid in sampled}
        messages = engine.train_messages(sampled)
        out = [self._message(self._content(messages[cid], round=t), node, MessageType.TRAIN, t + 1)
               for cid, node in self._sampled.items()]
        if not self.cfg.privacy.secure_aggregation:
            return out
        # SecAgg+: the protocol's four exchanges run here and only the sum comes back; Flower's loop
        # then sends nothing and aggregate_train hands the sum to the engine
        self._secure = self._secure_round(grid, out, t)
        return []

    def _secure_round(self, grid: Grid, messages: list[Message], t: int) -> tuple[SecureRound | None, str]:
        """One SecAgg+ round over the sampled nodes: the sum, by client id; ``(None, why)`` when it halted."""
        settings = SecAggSettings(**self.cfg.privacy.secagg.flower(), timeout=self.timeout)
        if len(messages) < 2:
            return None, f"{len(messages)} client(s) online to sample; SecAgg+ needs 2"
        try:
            result = secure_sum(grid, messages, settings, round_index=t + 1)
        except SecureAggregationError as exc:
            return None, str(exc)
        client_of = {node: cid for cid, node in self._sampled.items()}
        steps, losses, seconds = {}, {}, {}
        for node in result.contributors:
            metrics = result.metrics.get(node, {})
            cid = int(metrics.get("client-id", -1))
            if client_of.get(node) != cid:
                return None, f"node {node} answered for client {cid}, not the client it was sent"
            steps[cid], losses[cid] = int(metrics["num-steps"]), float(metrics["train-loss"])
            seconds[cid] = float(metrics.get("seconds", 0.0))
        contributors = sorted(client_of[node] for node in result.contributors)
        dropped = sorted(client_of[node] for node in result.dropped)
        return SecureRound(result.arrays, result.weight_sum, contributors, dropped, steps, losses, seconds), ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        engine = self._engine()
        if engine.stopped:
            return None, None
        if self.cfg.privacy.secure_aggregation:
            summed, halted = self._secure
            self._secure = (None, "")
            engine.receive_secure(summed, halted)
            parsed = [] if summed is None else summed.contributors
        else:
            parsed = [reply for reply in (self._parse_train(m) for m in replies) if reply is not None]
            engine.receive_training(parsed)
        row = engine.row
        self._failed_nodes = {self._sampled[cid] for cid in row["failed"]}
        metrics = {"num-replies": len(parsed), "num-failed": len(row["failed"]),
                   "num-rejected": len(row["rejected"])}
        if parsed:
            metrics["train-loss"] = row["train_loss"]
        if row.get("skipped"):
            return None, MetricRecord(metrics)
        return R.to_record(self.algorithm.global_shared()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        engine, t = self._engine(), self._round(server_round)
        if engine.stopped or not engine.evaluates(t):
            return []
        online = set(grid.get_node_ids())
        targets = {cid: node for cid, node in sorted(self.clients.items())
                   if node in online and node not in self._failed_nodes}
        return [self._message(self._content(engine.message(cid), round=t), node, MessageType.EVALUATE, t + 1)
                for cid, node in targets.items()]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        engine, t = self._engine(), self._round(server_round)
        if engine.stopped:
            return None
        result = None
        if engine.evaluates(t):
            pooled = engine.receive_evaluation([r for r in (self._parse_evaluation(m) for m in replies)
                                                if r is not None])
            scalars = {k: v for k, v in pooled.items() if isinstance(v, (int, float))}
            result = MetricRecord(scalars) if "accuracy" in pooled else None
        engine.close_round()
        return result

    # -- before and after the rounds --------------------------------------------------------
    def setup(self, grid: Grid, min_nodes: int, wait_timeout: float) -> None:
        """Wait for nodes, learn who is who, take the initial tensors; continue from a checkpoint."""
        self._grid = grid
        nodes = _wait_for_nodes(grid, min_nodes, wait_timeout)
        if len(nodes) < self.engine.min_replies:
            raise RuntimeError(f"only {len(nodes)} SuperNode(s) connected within {wait_timeout:.0f}s; "
                               f"min-replies is {self.engine.min_replies}")
        if len(nodes) < min_nodes:
            log.warning("starting with %d SuperNodes, fewer than min-nodes=%d", len(nodes), min_nodes)
        resumed = self._resume()
        if not self._setup_query(grid, nodes):
            raise RuntimeError("no SuperNode answered the setup query; see the SuperNode logs")
        groups = {int(i): names for i, names in json.loads(self.names["layer-groups"]).items()}
        engine = self.engine
        engine.algorithm = make_run_algorithm(self.cfg, self.initial, groups, json.loads(self.names["head-names"]),
                                              engine.privacy)
        if resumed is not None:
            engine.load_state(resumed)
        engine.start()
        log.info("federation: clients %s on %d SuperNodes", sorted(self.clients), len(self.clients))

    def remaining_rounds(self) -> int:
        return self.cfg.federated.rounds - self.first_round

    def finish(self, grid: Grid) -> None:
        self._grid = grid
        self._engine().finish(self._run_task)

    def global_arrays(self) -> ArrayRecord:
        return R.to_record(self._engine().algorithm.global_shared())

    def run_summary(self) -> dict:
        failed = int(np.sum([len(r["failed"]) for r in self.history]))
        privacy = self.engine.privacy
        secure = ({"secure_aggregation": secure_summary(self.cfg, self.history, "flower")}
                  if self.cfg.privacy.secure_aggregation else {})
        return run_summary(self.cfg, self.metric, self.history, self._engine().algorithm.summary(), runtime="flower",
                           clients=sorted(self.clients), failed_client_rounds=failed,
                           privacy=None if privacy is None else privacy.summary(), **secure)

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_section(self) -> dict[str, State]:
        """Flower's section of a checkpoint: the run key, under which the nodes keep their state."""
        return {"flower": ({}, {"run_key": self.run_key})}

    def _resume(self) -> dict[str, State] | None:
        """The newest checkpoint's sections, if the checkpoint directory holds one (config checked)."""
        if not self.engine.has_checkpoint():
            return None
        sections = self.engine.read_checkpoint()
        self.run_key = str(sections["flower"][1]["run_key"])
        self.first_round = self.engine.first_round
        return sections

    # -- internals ---------------------------------------------------------------------------
    def _engine(self) -> RoundEngine:
        if self.engine.algorithm is None:
            raise RuntimeError("call setup(grid, ...) before running rounds")
        return self.engine

    def _round(self, server_round: int) -> int:
        """The internal index (from 0) of this start's round ``server_round`` (Flower's, from 1)."""
        return self.first_round + server_round - 1

    def _online(self, grid: Grid) -> list[int]:
        online = set(grid.get_node_ids())
        return sorted(cid for cid, node in self.clients.items() if node in online)

    def _config(self, **values: int | bool | str) -> ConfigRecord:
        return R.config_record(self.cfg, self.run_key, **values)

    def _content(self, message: payload.Message, **values: int | str) -> RecordDict:
        return RecordDict({**R.message_records(R.GLOBAL, message), R.CONFIG: self._config(**values)})

    def _message(self, content: RecordDict, node: int, message_type: str, group: int | str) -> Message:
        # A message nobody answered within the phase's timeout is dropped rather than run late.
        return Message(content=content, dst_node_id=node, message_type=message_type, ttl=self.timeout,
                       group_id=str(group))

    def _exchange(self, grid: Grid, messages: list[Message], phase: str) -> list[Message]:
        """Send, wait up to the timeout, keep the replies without errors."""
        replies = list(grid.send_and_receive(messages, timeout=self.timeout)) if messages else []
        ok = [m for m in replies if not m.has_error()]
        for message in replies:
            if message.has_error():
                log.warning("%s: node %s replied with an error: %s", phase, message.metadata.src_node_id,
                            message.error.reason)
        if len(replies) < len(messages):
            log.warning("%s: %d of %d nodes did not reply within %.0fs", phase, len(messages) - len(replies),
                        len(messages), self.timeout)
        return ok

    def _run_task(self, task: ClientTask) -> dict[int, dict]:
        """An algorithm phase's client computation, on the online clients it names."""
        online = self._online(self._grid)
        targets = online if task.clients is None else [k for k in task.clients if k in set(online)]
        public = self.cfg.privacy.public_selection
        asked = targets[:1] if public else targets  # on public data one node computes for all
        messages = []
        for cid in asked:
            spec = {"kind": task.kind, "round": task.round, "stream": task.stream,
                    "options": task.options.get(cid, {}), "public": public}
            messages.append(self._message(RecordDict({R.GLOBAL: R.to_record(task.params),
                                                      R.CONFIG: self._config(**{R.TASK_SPEC: json.dumps(spec)})}),
                                          self.clients[cid], R.TASK, task.kind))
        results = {int(m.content[R.METRICS]["client-id"]): json.loads(str(m.content[R.CONFIG][R.RESULT]))
                   for m in self._exchange(self._grid, messages, task.kind)}
        if public and results:
            return {cid: next(iter(results.values())) for cid in targets}
        return results

    def _setup_query(self, grid: Grid, nodes: list[int]) -> dict[int, MetricRecord]:
        """Ask nodes who they are; returns the metrics of the accepted ones, by client id."""
        messages = [self._message(RecordDict({R.CONFIG: self._config()}), node, R.SETUP, "setup") for node in nodes]
        answers: dict[int, MetricRecord] = {}
        replies = sorted(self._exchange(grid, messages, "setup"),
                         key=lambda m: (int(m.content[R.METRICS]["client-id"]), m.metadata.src_node_id))
        for message in replies:
            node, metrics = message.metadata.src_node_id, message.content[R.METRICS]
            cid = int(metrics["client-id"])
            init = R.from_record(message.content[R.INIT])
            if not self.initial:
                self.initial = init
                self.names = {k: str(v) for k, v in message.content[R.CONFIG].items()}
                self.engine.metric = self.names["metric"]
            problem = _disagreement(self.initial, init)
            if problem is None and cid in answers:
                problem = f"client id {cid} is already served by node {self.clients[cid]}"
            if problem is not None:
                log.error("refusing node %s (client %s): %s; check its node config and the experiment", node, cid,
                          problem)
                self.refused.add(node)
                continue
            if cid in self.clients and self.clients[cid] != node:
                log.info("client %d moved from node %s to node %s", cid, self.clients[cid], node)
            self.clients[cid] = node
            answers[cid] = metrics
        return answers

    def _discover(self, grid: Grid) -> None:
        """Nodes that came online after setup (or restarted under a new id) are asked who they are."""
        known = set(self.clients.values()) | self.refused
        new = sorted(set(grid.get_node_ids()) - known)
        if new:
            log.info("new SuperNodes online: %s", new)
            self._setup_query(grid, new)

    def _parse_train(self, message: Message) -> TrainReply | None:
        node = message.metadata.src_node_id
        if message.has_error():
            log.warning("train: node %s failed: %s", node, message.error.reason)
            return None
        try:
            metrics = message.content[R.METRICS]
            cid = int(metrics["client-id"])
            if self._sampled.get(cid) != node:
                raise ValueError(f"unexpected reply for client {cid}")
            return TrainReply(cid, R.read_message(R.UPDATE, message.content), int(metrics["num-examples"]),
                              int(metrics["num-steps"]), float(metrics["train-loss"]), float(metrics["seconds"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("train: unusable reply from node %s: %s", node, exc)
            return None

    def _parse_evaluation(self, message: Message) -> EvalReply | None:
        """A node's results per split, as the worker computed them: confusion counts, or a generative
        task's answer counts and completion tokens (``<split>-generation-<name>``), and the summed loss."""
        from fedpeptao.generation import GenerationScore  # noqa: PLC0415

        if message.has_error():
            log.warning("evaluate: node %s failed: %s", message.metadata.src_node_id, message.error.reason)
            return None
        try:
            metrics = message.content[R.METRICS]
            reply = EvalReply(int(metrics["client-id"]))
            for split in SPLITS:
                loss_sum = float(metrics[f"{split}-loss-sum"])
                prefix = f"{split}-generation-"
                generation = {key[len(prefix):]: int(value) for key, value in metrics.items() if key.startswith(prefix)}
                if generation:
                    missing = {"examples", "tokens"} - generation.keys()
                    if missing:
                        raise KeyError(f"{split}: generation counts without {', '.join(sorted(missing))}")
                    GenerationScore.from_counts({k: v for k, v in generation.items() if k != "tokens"})  # all known
                    reply.splits[split] = SplitResult(None, loss_sum, generation)
                    continue
                counts = np.asarray(list(metrics[f"{split}-confusion"]), dtype=np.int64)
                side = math.isqrt(len(counts))
                reply.splits[split] = SplitResult(counts.reshape(side, side), loss_sum)
            return reply
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("evaluate: unusable reply from node %s: %s", message.metadata.src_node_id, exc)
            return None


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


def _disagreement(reference: Tensors, other: Tensors) -> str | None:
    """Why a node's initial tensors differ from the federation's (None when identical)."""
    if list(reference) != list(other):
        return "its trainable tensors have different names (another model or head?)"
    for name, tensor in reference.items():
        if tensor.shape != other[name].shape:
            return f"'{name}' has shape {tuple(other[name].shape)}, expected {tuple(tensor.shape)}"
        if not torch.equal(tensor, other[name]):
            return f"'{name}' starts from different values (another seed or model?)"
    return None

"""Any algorithm of :mod:`fedpeptao.algorithms` as a Flower ``Strategy`` over the Message API.

The stock strategies average one ArrayRecord with identical keys from every reply. Our
algorithms need more (per-client messages, server-held per-client state, client-side tasks
before a round), so this strategy holds the run's :class:`~fedpeptao.algorithms.base.Algorithm`
and drives it through the same hooks as the embedded simulator, naming no method:

* ``prepare_round`` before each round, its client tasks sent as ``query.task`` messages;
* ``client_message(k)`` is what travels to client ``k`` and is counted;
* replies are validated runtime-wide, then ``aggregate``;
* the same random stream (``numpy.random.default_rng(cfg.seed)``) draws the clients of each
  round, so with every client online a Flower run samples exactly as the simulator does;
* clients are identified by their ``client-id`` (the partition id), not Flower's node id,
  because the algorithm's state, the seeds and the data all belong to the client;
* a client that errors, or does not answer within the timeout, is left out of that round; the
  round updates the global tensors when at least ``min_replies`` clients answered, and
  otherwise leaves them unchanged. A client that just failed is not asked to evaluate in the
  same round, so a dead node costs one timeout per round, not two;
* every ``checkpoint.every`` rounds the whole server state (algorithm, sampling stream, history)
  goes to a crash-safe checkpoint; a restarted ServerApp continues from the newest one.
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
from fedpeptao.config import ConfigError, ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.core.metrics import score
from fedpeptao.core.server import ClientUpdate
from fedpeptao.core.validation import ValidationPolicy, filter_model_updates
from fedpeptao.experiment import make_privacy, make_run_algorithm
from fedpeptao.flower import records as R
from fedpeptao.report.summary import config_difference, run_summary
from fedpeptao.utils.checkpoint import (capture_rng_state, flatten_state, list_checkpoints, load_latest_checkpoint,
                                        restore_rng_state, save_checkpoint, unflatten_state)
from fedpeptao.utils.round_log import RoundLog, close_row

log = logging.getLogger("fedpeptao.flower.server")

Tensors = dict[str, torch.Tensor]
RESUMABLE_CHANGES = {"federated.rounds", "progress"}


class FederatedStrategy(Strategy):
    """Server side of a run; call :meth:`setup` before ``start`` and :meth:`finish` after."""

    def __init__(self, cfg: ExperimentConfig, *, timeout: float = 600.0, min_replies: int = 1,
                 run_dir: Path | None = None, checkpoint_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.min_replies = min_replies
        self.run_dir = run_dir
        self.checkpoint_dir = checkpoint_dir
        self.metric = cfg.data.metric or "accuracy"  # the clients' data says otherwise at setup
        self.rng = np.random.default_rng(cfg.seed)  # the simulator's sampling stream
        self.clients: dict[int, int] = {}  # client id -> Flower node id
        self.refused: set[int] = set()  # node ids whose initial tensors disagree with the federation's
        self.initial: Tensors = {}
        self.names: dict | None = None  # layer groups and head names, from the first node
        srv = cfg.server
        self.validation = ValidationPolicy(max_norm=srv.max_update_norm) if srv.validate_updates else None
        self.algorithm: Algorithm | None = None
        self.privacy = make_privacy(cfg)  # client-level DP and its accountant (None: off)
        self.stopped = False  # the privacy budget ended the run early
        self.run_key = uuid.uuid4().hex[:16]  # nodes keep this run's state under it (kept across restarts)
        self.history: list[dict] = []
        self.first_round = 0
        self._grid: Grid | None = None
        self._row: dict = {}
        self._sampled: dict[int, int] = {}
        self._population = 0  # clients online when the round sampled (the accountant's N)
        self._failed_nodes: set[int] = set()
        self._started = time.perf_counter()
        self._log: RoundLog | None = None

    # -- Strategy interface ----------------------------------------------------------------
    def summary(self) -> None:
        fed = self.cfg.federated
        log.info("FederatedStrategy: %s, %d of %d clients per round, rounds %d..%d, min_replies=%d, timeout=%.0fs",
                 self.cfg.describe(), fed.clients_per_round, fed.num_clients, self.first_round + 1, fed.rounds,
                 self.min_replies, self.timeout)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        algo, t = self._algo(), self._round(server_round)
        self._grid = grid
        if self.stopped or self._budget_spent(t):
            return []
        self._discover(grid)
        phase_start = time.perf_counter()
        algo.prepare_round(t, self._run_task)
        available = self._online(grid)
        self._row = {"round": t, "sampled": [], "clients": [], "failed": [], "bytes_up": 0, "bytes_down": 0,
                     "slowest_client_s": 0.0, "train_loss": float("nan"), "rejected": [],
                     "phase_s": time.perf_counter() - phase_start}
        self._failed_nodes = set()
        if not available:
            log.warning("round %d: no known client is online", t)
            self._sampled = {}
            return []
        size = min(self.cfg.federated.clients_per_round, len(available))
        self._population = len(available)
        sampled = sorted(int(c) for c in self.rng.choice(np.array(available), size=size, replace=False))
        self._sampled = {cid: self.clients[cid] for cid in sampled}
        messages = []
        for cid, node in self._sampled.items():
            sent = algo.client_message(cid)
            self._row["bytes_down"] += payload.num_bytes(sent)
            messages.append(self._message(self._content(sent, round=t), node, MessageType.TRAIN, t))
        self._row["sampled"] = sampled
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        algo, t = self._algo(), self._round(server_round)
        if self.stopped:
            return None, None
        updates, losses, seconds, examples = [], [], [], {}
        for message in replies:
            parsed = self._parse_train(message)
            if parsed is None:
                continue
            update, metrics = parsed
            updates.append(update)
            examples[str(update.client_id)] = update.num_examples
            losses.append(float(metrics["train-loss"]))
            seconds.append(float(metrics["seconds"]))
            self._row["bytes_up"] += int(metrics["bytes-up"])
        replied = {u.client_id for u in updates}
        for cid in sorted(replied):
            algo.acknowledge(cid)
        failed = sorted(set(self._sampled) - replied)
        self._failed_nodes = {self._sampled[cid] for cid in failed}
        self._row.update({"clients": sorted(replied), "failed": failed,
                          "client_examples": dict(sorted(examples.items())),
                          "slowest_client_s": max(seconds, default=0.0),
                          "train_loss": float(np.mean(losses)) if losses else float("nan")})
        if failed:
            log.warning("round %d: no usable reply from clients %s (error or timeout); left out", t, failed)
        if len(updates) < self.min_replies:
            log.warning("round %d: %d of %d sampled clients replied, fewer than min-replies=%d; global tensors "
                        "unchanged", t, len(updates), len(self._sampled), self.min_replies)
            self._row["skipped"] = True
            return None, MetricRecord({"num-replies": len(updates), "num-failed": len(failed)})
        accepted, rejected = filter_model_updates(sorted(updates, key=lambda u: u.client_id), algo.global_shared(),
                                                  self.validation, log, algo.reply_prefixes)
        self._row["rejected"] = [list(r) for r in rejected]
        if self.privacy is not None:  # one privatised update for the round, even when none was valid
            accepted = [self.privacy.aggregate(t, accepted, algo.global_shared(), self._population, len(self._sampled))]
            self._row["epsilon"] = self.privacy.epsilon()
        if accepted:
            algo.aggregate(t, sorted(self._sampled), accepted)
        else:
            log.warning("round %d: no valid update; global state unchanged", t)
        metrics = {"num-replies": len(updates), "num-failed": len(failed), "num-rejected": len(rejected)}
        if losses:
            metrics["train-loss"] = self._row["train_loss"]
        return R.to_record(algo.global_shared()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        t = self._round(server_round)
        if self.stopped or not self._eval_round(t):
            return []
        online = set(grid.get_node_ids())
        targets = {cid: node for cid, node in sorted(self.clients.items())
                   if node in online and node not in self._failed_nodes}
        return [self._message(self._content(self._algo().client_message(cid), round=t), node,
                              MessageType.EVALUATE, t) for cid, node in targets.items()]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        t = self._round(server_round)
        if self.stopped:
            return None
        result = self._pool_evaluations(replies) if self._eval_round(t) else None
        self._finish_row()
        return result

    # -- before and after the rounds --------------------------------------------------------
    def setup(self, grid: Grid, min_nodes: int, wait_timeout: float) -> None:
        """Wait for nodes, learn who is who, take the initial tensors; continue from a checkpoint."""
        self._grid = grid
        nodes = _wait_for_nodes(grid, min_nodes, wait_timeout)
        if len(nodes) < self.min_replies:
            raise RuntimeError(f"only {len(nodes)} SuperNode(s) connected within {wait_timeout:.0f}s; "
                               f"min-replies is {self.min_replies}")
        if len(nodes) < min_nodes:
            log.warning("starting with %d SuperNodes, fewer than min-nodes=%d", len(nodes), min_nodes)
        resumed = self._resume()
        if not self._setup_query(grid, nodes):
            raise RuntimeError("no SuperNode answered the setup query; see the SuperNode logs")
        groups = {int(i): names for i, names in json.loads(self.names["layer-groups"]).items()}
        self.algorithm = make_run_algorithm(self.cfg, self.initial, groups, json.loads(self.names["head-names"]),
                                            self.privacy)
        if resumed is not None:
            self.algorithm.load_state(resumed["algorithm"])
            if self.privacy is not None:
                self.privacy.load_state(resumed["privacy"])
        self._started = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        if self.run_dir is not None:
            if self.history:
                RoundLog(self.run_dir).rewrite(self.history)
            self._log = RoundLog(self.run_dir, self.cfg.tensorboard, self.first_round)
        log.info("federation: clients %s on %d SuperNodes", sorted(self.clients), len(self.clients))

    def remaining_rounds(self) -> int:
        return self.cfg.federated.rounds - self.first_round

    def finish(self, grid: Grid) -> None:
        self._grid = grid
        self._algo().finish(self._run_task)
        if self._log is not None:
            self._log.close()

    def global_arrays(self) -> ArrayRecord:
        return R.to_record(self._algo().global_shared())

    def run_summary(self) -> dict:
        failed = int(np.sum([len(r["failed"]) for r in self.history]))
        return run_summary(self.cfg, self.metric, self.history, self._algo().summary(), runtime="flower",
                           clients=sorted(self.clients), failed_client_rounds=failed,
                           privacy=None if self.privacy is None else self.privacy.summary())

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> dict | None:
        """The newest checkpoint's state, if the checkpoint directory holds one (config checked)."""
        if self.checkpoint_dir is None or not list_checkpoints(self.checkpoint_dir):
            return None
        round_index, tensors, meta = load_latest_checkpoint(self.checkpoint_dir)
        difference = config_difference(meta.get("config", {}), self.cfg.model_dump(mode="json"), RESUMABLE_CHANGES)
        if difference:
            raise ConfigError(f"{self.checkpoint_dir}: its checkpoint was written with another config ({difference})")
        state = unflatten_state(tensors, meta["state"])
        restore_rng_state(state["rng"], self.rng)
        self.history, self.run_key = list(state["history"]), str(state["run_key"])
        self.first_round = round_index + 1
        log.info("continuing from the checkpoint of round %d in %s", round_index, self.checkpoint_dir)
        return state

    def _save_checkpoint(self, round_index: int) -> None:
        state = {"algorithm": self._algo().state(), "rng": capture_rng_state(self.rng), "history": self.history,
                 "run_key": self.run_key, "privacy": None if self.privacy is None else self.privacy.state()}
        tensors, skeleton = flatten_state(state)
        save_checkpoint(self.checkpoint_dir, round_index, tensors,
                        {"state": skeleton, "config": self.cfg.model_dump(mode="json")}, keep=self.cfg.checkpoint.keep)

    def _budget_spent(self, t: int) -> bool:
        """Stop before round ``t`` when it would pass ``privacy.target_epsilon``, state saved."""
        reason = None if self.privacy is None else self.privacy.stop_reason(t)
        if reason is None:
            return False
        log.warning(reason)
        self.stopped = True
        if self.checkpoint_dir is not None and self.history:
            self._save_checkpoint(self.history[-1]["round"])
        return True

    # -- internals ---------------------------------------------------------------------------
    def _algo(self) -> Algorithm:
        if self.algorithm is None:
            raise RuntimeError("call setup(grid, ...) before running rounds")
        return self.algorithm

    def _round(self, server_round: int) -> int:
        """Flower counts this start's rounds from 1; ours count the whole run's from 0."""
        return self.first_round + server_round - 1

    def _online(self, grid: Grid) -> list[int]:
        online = set(grid.get_node_ids())
        return sorted(cid for cid, node in self.clients.items() if node in online)

    def _config(self, **values: int | bool | str) -> ConfigRecord:
        return R.config_record(self.cfg, self.run_key, **values)

    def _content(self, tensors: Tensors, **values: int | str) -> RecordDict:
        return RecordDict({R.GLOBAL: R.to_record(tensors), R.CONFIG: self._config(**values)})

    def _message(self, content: RecordDict, node: int, message_type: str, group: int | str) -> Message:
        # A message nobody answered within the phase's timeout is dropped rather than run late.
        return Message(content=content, dst_node_id=node, message_type=message_type, ttl=self.timeout,
                       group_id=str(group))

    def _eval_round(self, t: int) -> bool:
        fed = self.cfg.federated
        return (t + 1) % fed.eval_every == 0 or t == fed.rounds - 1

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
                self.metric = self.names["metric"]
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

    def _parse_train(self, message: Message) -> tuple[ClientUpdate, MetricRecord] | None:
        node = message.metadata.src_node_id
        if message.has_error():
            log.warning("train: node %s failed: %s", node, message.error.reason)
            return None
        try:
            metrics = message.content[R.METRICS]
            cid = int(metrics["client-id"])
            if self._sampled.get(cid) != node:
                raise ValueError(f"unexpected reply for client {cid}")
            update = ClientUpdate(cid, R.from_record(message.content[R.UPDATE]), int(metrics["num-examples"]),
                                  int(metrics["num-steps"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("train: unusable reply from node %s: %s", node, exc)
            return None
        return update, metrics

    def _pool_evaluations(self, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool every client's predictions (as confusion counts) per split, as the simulator pools them."""
        totals: dict[str, np.ndarray] = {}
        losses, per_client = {"": 0.0, "val-": 0.0}, {}
        for message in replies:
            if message.has_error():
                log.warning("evaluate: node %s failed: %s", message.metadata.src_node_id, message.error.reason)
                continue
            metrics = message.content[R.METRICS]
            cid = int(metrics["client-id"])
            self._algo().acknowledge(cid)
            for prefix in ("", "val-"):
                n = int(metrics[f"{prefix}num-examples"])
                if n == 0:
                    continue
                counts = np.asarray(list(metrics[f"{prefix}confusion"]), dtype=np.int64)
                side = math.isqrt(len(counts))
                counts = counts.reshape(side, side)
                totals[prefix] = counts if prefix not in totals else totals[prefix] + counts
                losses[prefix] += float(metrics[f"{prefix}loss-sum"])
                if not prefix:
                    per_client[str(cid)] = float(np.trace(counts) / n)
        if "" not in totals:
            log.warning("evaluate: no client reported results")
            return None
        result = {}
        for prefix, key in (("", ""), ("val-", "val_")):
            if prefix in totals:
                preds, labels = R.expand_confusion(totals[prefix])
                result.update({f"{key}accuracy": score("accuracy", preds, labels),
                               f"{key}metric": score(self.metric, preds, labels),
                               f"{key}loss" if key else "eval_loss": losses[prefix] / len(labels)})
        self._row.update(result)
        self._row.update({"client_accuracy": per_client, "eval_examples": int(totals[""].sum())})
        return MetricRecord(result)

    def _finish_row(self) -> None:
        row = self._row
        row["shared_tensors"] = len(self._algo().shared)
        close_row(row, self.history[-1] if self.history else {}, time.perf_counter() - self._started)
        self.history.append(row)
        if self._log is not None:
            self._log.write(row)
        t, every = row["round"], self.cfg.checkpoint.every
        if self.checkpoint_dir is not None and ((every and (t + 1) % every == 0) or t == self.cfg.federated.rounds - 1):
            self._save_checkpoint(t)


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

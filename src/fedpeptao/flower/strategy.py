"""FedPepTAO (FedAvg, and every baseline of ``fedpeptao.baselines.methods.METHODS``) as a Flower
``Strategy`` over the Message API.

The stock strategies average one ArrayRecord with identical keys from every reply. FedPepTAO
needs more: server-held control variates per client and server momentum (the
:class:`~fedpeptao.core.federation.Aggregator` also used by the embedded simulator), only the
selected layers on the wire, and a one-off layer scoring and ratio estimation before the selective
step starts. This strategy keeps that Aggregator and mirrors the simulator's round loop:

* a baseline's server rule (FedOpt's ``m``/``v``, SCAFFOLD's ``c``) runs here in the simulator's
  :class:`~fedpeptao.baselines.methods.RuleAggregator`, and what the rule sends down (SCAFFOLD: the
  prompts and ``c``) is what travels and is counted; its device side and per-device state (SCAFFOLD's
  ``c_k``) are the clients';
* the same random stream (``numpy.random.default_rng(cfg.seed)``) draws the clients of each round
  and the clients that estimate the ratio, so with every client online a Flower run samples
  exactly as the simulator does;
* clients are identified by their ``client-id`` (the partition id), not Flower's node id, because
  the control variates, the seeds and the data all belong to the client;
* a client that errors, or does not answer within the timeout, is left out of that round; the
  round updates the global prompts when at least ``min_replies`` clients answered, and otherwise
  leaves them unchanged. A client that just failed is not asked to evaluate in the same round, so a
  dead node costs one timeout per round, not two.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeptao.baselines.methods import Method, RuleAggregator, get_method, method_rule
from fedpeptao.config import ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.core.federation import Aggregator
from fedpeptao.core.metrics import metric_for_task, score
from fedpeptao.core.scoring import combine_scores, rank_layers
from fedpeptao.core.server import ClientUpdate
from fedpeptao.core.validation import ValidationPolicy
from fedpeptao.flower import records as R
from fedpeptao.flower.build import choose_layers, head_names, layer_names
from fedpeptao.experiment import server_step_config
from fedpeptao.utils.round_log import RoundLog

log = logging.getLogger("fedpeptao.flower.server")

Tensors = dict[str, torch.Tensor]


class FedPepTAOStrategy(Strategy):
    """Server side of a run of ``method`` (default: ``cfg.algorithm``); call :meth:`setup` before
    ``start`` and :meth:`finish` after. ``cfg`` must already carry a native method's overrides."""

    def __init__(self, cfg: ExperimentConfig, *, method: Method | None = None, timeout: float = 600.0,
                 min_replies: int = 1, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.method = method or get_method(cfg.algorithm)
        self.rule = method_rule(self.method, cfg)  # native methods: FedAvg's, which sends the tensors as they are
        self.timeout = timeout
        self.min_replies = min_replies
        self.run_dir = run_dir
        self.metric = metric_for_task(cfg.data.task)
        self.rng = np.random.default_rng(cfg.seed)  # the simulator's sampling stream
        self.clients: dict[int, int] = {}  # client id -> Flower node id
        self.sizes: dict[int, int] = {}  # client id -> training examples
        self.refused: set[int] = set()  # node ids whose initial tensors disagree with the federation's
        self.initial: Tensors = {}
        self.aggregator: Aggregator | None = None
        self.scores: list[float] | None = None
        self.ranking: list[int] | None = None
        self.selection: dict | None = None
        # After the switch to FedPepTAO every client's personal layers restart from `base`
        # (the warmed-up global tensors); `synced` are the clients known to have it.
        self.base: Tensors | None = None
        self.base_version = -1
        self.synced: set[int] = set()
        self.history: list[dict] = []
        self._row: dict = {}
        self._sampled: dict[int, int] = {}
        self._failed_nodes: set[int] = set()
        self._started = time.perf_counter()
        self._log: RoundLog | None = None

    # -- Strategy interface ----------------------------------------------------------------
    def summary(self) -> None:
        cfg = self.cfg
        log.info("FedPepTAOStrategy: method=%s (algorithm=%s), %d of %d clients per round, %d rounds, "
                 "min_replies=%d, timeout=%.0fs", self.method.name, cfg.algorithm, cfg.federated.clients_per_round,
                 cfg.federated.num_clients, cfg.federated.rounds, self.min_replies, self.timeout)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        agg = self._agg()
        t = server_round - 1
        self._discover(grid)
        if t == self.switch_round():
            self._switch(grid, t)
        online = set(grid.get_node_ids())
        available = sorted(cid for cid, node in self.clients.items() if node in online)
        self._row = {"round": t, "sampled": [], "clients": [], "failed": [], "bytes_up": 0, "bytes_down": 0,
                     "slowest_client_s": 0.0, "train_loss": float("nan"), "rejected": []}
        self._failed_nodes = set()
        if not available:
            log.warning("round %d: no known client is online", t)
            self._sampled = {}
            return []
        size = min(self.cfg.federated.clients_per_round, len(available))
        sampled = sorted(int(c) for c in self.rng.choice(np.array(available), size=size, replace=False))
        self._sampled = {cid: self.clients[cid] for cid in sampled}
        sent = self.rule.down(agg.broadcast())
        down = payload.num_bytes(sent)
        global_record = R.to_record(sent)
        messages = []
        for cid, node in self._sampled.items():
            content = self._content(global_record, round=t)
            if self._needs_base(cid):
                content[R.BASE] = R.to_record(self.base)
                self._row["bytes_down"] += payload.num_bytes(self.base)
            self._row["bytes_down"] += down
            messages.append(self._message(content, node, MessageType.TRAIN, server_round))
        self._row["sampled"] = sampled
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        agg = self._agg()
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
        failed = sorted(set(self._sampled) - replied)
        self._failed_nodes = {self._sampled[cid] for cid in failed}
        self.synced |= replied  # a client that answered has adopted the base it was sent
        self._row.update({"clients": sorted(replied), "failed": failed,
                          "client_examples": dict(sorted(examples.items())),
                          "slowest_client_s": max(seconds, default=0.0),
                          "train_loss": float(np.mean(losses)) if losses else float("nan")})
        if failed:
            log.warning("round %d: no usable reply from clients %s (error or timeout); left out", server_round - 1,
                        failed)
        if len(updates) < self.min_replies:
            log.warning("round %d: %d of %d sampled clients replied, fewer than min-replies=%d; global prompts "
                        "unchanged", server_round - 1, len(updates), len(self._sampled), self.min_replies)
            self._row["skipped"] = True
            return None, MetricRecord({"num-replies": len(updates), "num-failed": len(failed)})
        agg.aggregate(sorted(updates, key=lambda u: u.client_id))
        self._row["rejected"] = [list(r) for r in agg.rejected]
        metrics = {"num-replies": len(updates), "num-failed": len(failed), "num-rejected": len(agg.rejected)}
        if losses:
            metrics["train-loss"] = self._row["train_loss"]
        return R.to_record(agg.broadcast()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if not self._eval_round(server_round - 1):
            return []
        online = set(grid.get_node_ids())
        targets = {cid: node for cid, node in sorted(self.clients.items())
                   if node in online and node not in self._failed_nodes}
        global_record = R.to_record(self._agg().broadcast())
        messages = []
        for cid, node in targets.items():
            content = self._content(global_record, round=server_round - 1)
            if self._needs_base(cid):
                content[R.BASE] = R.to_record(self.base)
            messages.append(self._message(content, node, MessageType.EVALUATE, server_round))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        result = None
        if self._eval_round(server_round - 1):
            result = self._pool_evaluations(replies)
        self._finish_row()
        return result

    # -- before and after the rounds --------------------------------------------------------
    def setup(self, grid: Grid, min_nodes: int, wait_timeout: float) -> None:
        """Wait for nodes, learn who is who, take the initial tensors and (FedPepTAO) the layer scores."""
        nodes = _wait_for_nodes(grid, min_nodes, wait_timeout)
        if len(nodes) < self.min_replies:
            raise RuntimeError(f"only {len(nodes)} SuperNode(s) connected within {wait_timeout:.0f}s; "
                               f"min-replies is {self.min_replies}")
        if len(nodes) < min_nodes:
            log.warning("starting with %d SuperNodes, fewer than min-nodes=%d", len(nodes), min_nodes)
        scoring = self.cfg.algorithm == "fedpeptao"
        answers = self._setup_query(grid, nodes, score=scoring)
        if not answers:
            raise RuntimeError("no SuperNode answered the setup query; see the SuperNode logs")
        if scoring:
            scored = [(cid, m) for cid, m in sorted(answers.items()) if "scores" in m]
            if not scored:
                raise RuntimeError("no client could score layers (each needs at least 2 training examples)")
            combined = combine_scores([torch.tensor(list(m["scores"]), dtype=torch.float64) for _, m in scored],
                                      [int(m["num-train"]) for _, m in scored])
            self.scores, self.ranking = combined.tolist(), rank_layers(combined)
        srv = self.cfg.server
        self.aggregator = Aggregator(
            params=dict(self.initial), shared=list(self.initial),
            validation=ValidationPolicy(max_norm=srv.max_update_norm) if srv.validate_updates else None,
            averaging=srv.aggregation, trim_ratio=srv.trim_ratio)
        if not self.method.native:
            self.aggregator = RuleAggregator.wrap(self.aggregator, self.rule)
        self._started = time.perf_counter()
        self._log = None if self.run_dir is None else RoundLog(self.run_dir, self.cfg.tensorboard)
        log.info("federation: clients %s on %d SuperNodes", sorted(self.clients), len(self.clients))

    def finish(self, grid: Grid) -> None:
        """Like the simulator: a run that ended inside the warm-up still reports its layer selection."""
        if self.cfg.algorithm == "fedpeptao" and self.selection is None:
            self._switch(grid, self.cfg.federated.rounds)
        if self._log is not None:
            self._log.close()

    def switch_round(self) -> int:
        """The round FedPepTAO's selective step starts (-1: never, plain FedAvg)."""
        if self.cfg.algorithm != "fedpeptao":
            return -1
        sel = self.cfg.selection
        return sel.warmup_rounds if sel.ratio == "auto" and sel.layers is None else 0

    def global_arrays(self) -> ArrayRecord:
        return R.to_record(self._agg().broadcast())

    # -- internals ---------------------------------------------------------------------------
    def _agg(self) -> Aggregator:
        if self.aggregator is None:
            raise RuntimeError("call setup(grid, ...) before running rounds")
        return self.aggregator

    def _config(self, **values: int | bool) -> ConfigRecord:
        return R.config_record(self.cfg, self.method.name, **values)

    def _content(self, global_record: ArrayRecord, **values: int) -> RecordDict:
        config = self._config(**{R.BASE_VERSION: self.base_version}, **values)
        return RecordDict({R.GLOBAL: global_record, R.CONFIG: config})

    def _message(self, content: RecordDict, node: int, message_type: str, server_round: int | str) -> Message:
        # A message nobody answered within the phase's timeout is dropped rather than run late.
        return Message(content=content, dst_node_id=node, message_type=message_type, ttl=self.timeout,
                       group_id=str(server_round))

    def _needs_base(self, cid: int) -> bool:
        return self.base is not None and cid not in self.synced

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

    def _setup_query(self, grid: Grid, nodes: list[int], score: bool) -> dict[int, MetricRecord]:
        """Ask nodes who they are; returns the metrics of the accepted ones, by client id."""
        messages = [self._message(RecordDict({R.CONFIG: self._config(**{R.SCORE: score})}), node,
                                  R.SETUP, "setup") for node in nodes]
        answers: dict[int, MetricRecord] = {}
        replies = sorted(self._exchange(grid, messages, "setup"),
                         key=lambda m: (int(m.content[R.METRICS]["client-id"]), m.metadata.src_node_id))
        for message in replies:
            node, metrics = message.metadata.src_node_id, message.content[R.METRICS]
            cid = int(metrics["client-id"])
            init = R.from_record(message.content[R.INIT])
            if not self.initial:
                self.initial = init
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
            self.sizes[cid] = int(metrics["num-train"])
            answers[cid] = metrics
        return answers

    def _discover(self, grid: Grid) -> None:
        """Nodes that came online after setup (or restarted under a new id) are asked who they are."""
        known = set(self.clients.values()) | self.refused
        new = sorted(set(grid.get_node_ids()) - known)
        if new:
            log.info("new SuperNodes online: %s", new)
            self._setup_query(grid, new, score=False)

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
        """Pool every client's predictions (as confusion counts), as the simulator pools them."""
        total, loss, per_client = None, 0.0, {}
        for message in replies:
            if message.has_error():
                log.warning("evaluate: node %s failed: %s", message.metadata.src_node_id, message.error.reason)
                continue
            metrics = message.content[R.METRICS]
            cid, n = int(metrics["client-id"]), int(metrics["num-examples"])
            self.synced.add(cid)
            if n == 0:
                continue
            counts = np.asarray(list(metrics["confusion"]), dtype=np.int64)
            side = math.isqrt(len(counts))
            counts = counts.reshape(side, side)
            total = counts if total is None else total + counts
            loss += float(metrics["loss-sum"])
            per_client[str(cid)] = float(np.trace(counts) / n)
        if total is None:
            log.warning("evaluate: no client reported results")
            return None
        preds, labels = R.expand_confusion(total)
        result = {"accuracy": score("accuracy", preds, labels), "metric": score(self.metric, preds, labels),
                  "eval_loss": loss / len(labels)}
        self._row.update(result)
        self._row.update({"client_accuracy": per_client, "eval_examples": len(labels)})
        return MetricRecord(result)

    def _finish_row(self) -> None:
        row, last = self._row, self.history[-1] if self.history else {}
        row["shared_tensors"] = len(self._agg().shared)
        row["train_time_s"] = last.get("train_time_s", 0.0) + row.get("slowest_client_s", 0.0)
        row["total_bytes"] = last.get("total_bytes", 0) + row.get("bytes_up", 0) + row.get("bytes_down", 0)
        row["elapsed_s"] = time.perf_counter() - self._started
        self.history.append(row)
        if self._log is not None:
            self._log.write(row)

    # -- FedPepTAO layer selection -----------------------------------------------------------
    def _switch(self, grid: Grid, t: int) -> None:
        """The simulator's switch: select layers, freeze the warmed-up tensors as every client's base."""
        agg = self._agg()
        ratio, layers = choose_layers(self.cfg.selection, self.ranking, lambda: self._estimate_ratio(grid))
        self.selection = {"scores": self.scores, "ranking": self.ranking, "ratio": ratio, "layers": layers}
        shared = layer_names(agg.params, layers)
        if self.cfg.selection.share_head:
            shared += head_names(agg.params)
        self.base = dict(agg.params)
        self.base_version = t
        # Before any training the warmed-up tensors are the initial ones every client already has.
        self.synced = set(self.clients) if t == 0 else set()
        agg.use_fedpeptao(shared, server_step_config(self.cfg))
        log.info("FedPepTAO from round %d: sharing layers %s (ratio %.3f)", t, layers, ratio)
        if self.run_dir is not None:
            (self.run_dir / "selection.json").write_text(json.dumps(self.selection, indent=2))

    def _estimate_ratio(self, grid: Grid) -> float:
        """A few clients' Hessian eigen-density ratios at the warmed-up tensors, averaged (SPEC 2.2)."""
        sel = self.cfg.selection
        online = set(grid.get_node_ids())
        available = sorted(cid for cid, node in self.clients.items() if node in online)
        if not available:
            raise RuntimeError("no client online to estimate the layer ratio")
        chosen = [int(c) for c in self.rng.choice(np.array(available), size=min(sel.hessian_clients, len(available)),
                                                  replace=False)]
        full = R.to_record(self._agg().params)
        messages = [self._message(RecordDict({R.GLOBAL: full, R.CONFIG: self._config(
            **{R.PROBE_SEED: self.cfg.seed + index})}), self.clients[cid], R.HESSIAN, "hessian")
            for index, cid in enumerate(chosen)]
        ratios = {int(m.content[R.METRICS]["client-id"]): float(m.content[R.METRICS]["ratio"])
                  for m in self._exchange(grid, messages, "hessian")}
        values = [ratios[cid] for cid in chosen if cid in ratios]
        if not values:
            raise RuntimeError("no client returned a Hessian ratio estimate")
        return sum(values) / len(values)


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

"""The server side of a run, written once: a round from sampling to its closed metrics row.

Both runtimes are transports around one :class:`RoundEngine`. The embedded simulator hands the
engine's messages to an in-process :class:`~fedpeptao.engine.worker.ClientWorker`; the Flower
strategy wraps them in Flower messages. Either way a round reads::

    if engine.budget_spent(t): stop              # privacy.target_epsilon reached, state saved
    engine.prepare(t, run_task)                  # the algorithm's phases (FedPepTAO's selection)
    sampled = engine.sample(t, online)           # the run's seeded sampling stream
    messages = engine.train_messages(sampled)    # each client's Message (bytes counted)
    ... the transport delivers them and collects TrainReply's ...
    engine.receive_training(replies)             # acknowledge, validate, privacy, algorithm step
    # or, under privacy.secure_aggregation, only the sum (Flower's SecAgg+ or privacy.secure.sum_of):
    engine.receive_secure(summed)                # acknowledge, privacy, the step on the population's mean
    if engine.evaluates(t):
        ... deliver engine.message(k) to the evaluated clients, collect EvalReply's ...
        engine.receive_evaluation(replies)       # pooled metrics, one way
    engine.close_round()                         # totals, metrics.jsonl, checkpoint cadence
    ... after the last round: engine.finish(run_task)

Checkpoint and resume (with the config check and the changes a resume may make) live here too,
so the two runtimes cannot drift apart in what they save or accept.

Rounds are numbered two ways. Inside, ``t`` counts from 0 (the seeds, the algorithm's
``round_index``, FedPepTAO's warm-up); everywhere a user reads a round (the ``round`` of a
metrics row, checkpoint folders, log lines) it is ``t + 1``, the global 1-based round: round 1
is the first round of training, and a checkpoint of round ``n`` holds the state after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fedpeptao.algorithms.base import Algorithm, ClientTask
from fedpeptao.config import ConfigError, ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.core.aggregation import ClientUpdate, RoundUpdates
from fedpeptao.core.metrics import expand_confusion, score
from fedpeptao.core.payload import Message
from fedpeptao.core.validation import ValidationPolicy, filter_updates
from fedpeptao.generation import GenerationScore
from fedpeptao.privacy.engine import ClientPrivacy
from fedpeptao.privacy.secure import (SecureRound, extras_sums, layout_problem, masked_bytes, mean_update,
                                      summed_tensors)
from fedpeptao.report.summary import config_difference
from fedpeptao.utils.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from fedpeptao.utils.round_log import RoundLog, close_row
from fedpeptao.utils.state import State, add_prefix, join, restore_rng_state, rng_state, split, take_prefix

log = logging.getLogger("fedpeptao.server")

RunTask = Callable[[ClientTask], dict[int, dict]]
#: what a resumed run may change: everything else must equal the checkpoint's config
RESUMABLE_CHANGES = frozenset({"federated.rounds", "progress"})
SPLITS = ("test", "validation")


@dataclass
class TrainReply:
    """One client's answer to a training message: what it sent, and how its round went."""

    client_id: int
    sent: Message
    num_examples: int
    num_steps: int
    loss: float
    seconds: float


@dataclass
class SplitResult:
    """One client's evaluation on one split, as counts that pool by adding: ``[true, predicted]``
    counts (classification) or generated answers' counts (:class:`~fedpeptao.generation.GenerationScore`'s,
    plus the completion ``tokens`` the loss is summed over), and the summed loss."""

    confusion: np.ndarray | None
    loss_sum: float
    generation: dict[str, int] | None = None

    @property
    def count(self) -> int:
        return int(self.confusion.sum()) if self.generation is None else int(self.generation["examples"])

    @property
    def loss_weight(self) -> int:
        """What the loss is a sum over: examples, or completion tokens."""
        return self.count if self.generation is None else int(self.generation["tokens"])


@dataclass
class EvalReply:
    """One client's evaluation with its own tensors: a :class:`SplitResult` per split it holds."""

    client_id: int
    splits: dict[str, SplitResult] = field(default_factory=dict)


class RoundEngine:
    """Owns the rounds of one run on the server side; see the module docstring for the flow."""

    def __init__(self, cfg: ExperimentConfig, algorithm: Algorithm | None, privacy: ClientPrivacy | None,
                 metric: str, run_dir: Path | None = None, checkpoint_dir: Path | None = None,
                 min_replies: int = 1, extra_state: Callable[[], Mapping[str, State]] = dict) -> None:
        self.cfg = cfg
        self.algorithm = algorithm  # Flower learns the initial tensors from the nodes: set later
        self.privacy = privacy
        self.metric = metric
        self.run_dir = run_dir
        self.checkpoint_dir = checkpoint_dir  # None: no checkpoints
        #: the transport's own sections of a checkpoint (the simulator's clients, Flower's run key)
        self.extra_state = extra_state
        self.min_replies = min_replies
        srv = cfg.server
        self.validation = ValidationPolicy(max_norm=srv.max_update_norm) if srv.validate_updates else None
        self.rng = np.random.default_rng(cfg.seed)  # the sampling stream (the same in both runtimes)
        self.history: list[dict] = []
        self.row: dict[str, Any] = {}
        self.t = 0  # the open round's index from 0 (internal); its row's "round" is t + 1
        self.stopped = False  # the privacy budget ended the run early
        self._population = cfg.federated.num_clients  # clients online when the round sampled
        self._started = time.perf_counter()
        self._log: RoundLog | None = None

    # -- the round --------------------------------------------------------------------------
    def start(self) -> None:
        """Open ``metrics.jsonl`` (rows of a resumed run's later rounds are dropped) and the clock."""
        self._started = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        if self.run_dir is not None:
            if self.history:
                RoundLog(self.run_dir).rewrite(self.history)
            self._log = RoundLog(self.run_dir, self.cfg.tensorboard, len(self.history) + 1)

    @property
    def first_round(self) -> int:
        """The index (from 0) of the next round to run: the number of rounds done."""
        return len(self.history)

    def budget_spent(self, t: int) -> bool:
        """Stop before round ``t`` when it would pass ``privacy.target_epsilon``, state saved."""
        reason = None if self.privacy is None else self.privacy.stop_reason(t)
        if reason is None:
            return False
        log.warning("%s; the state after round %d is saved", reason, t)
        self.stopped = True
        if self.history:
            self.save_checkpoint(self.history[-1]["round"])
        return True

    def prepare(self, t: int, run_task: RunTask | None) -> None:
        """Open round ``t``'s row (``round`` = ``t + 1``) and run the algorithm's phases before it
        (timed; none without ``run_task``)."""
        self.t = t
        self.row = {"round": t + 1, "sampled": [], "clients": [], "failed": [], "bytes_up": 0, "bytes_down": 0,
                    "slowest_client_s": 0.0, "train_loss": float("nan"), "rejected": []}
        began = time.perf_counter()
        if run_task is not None:
            self.algorithm.prepare_round(t, run_task)
        self.row["phase_s"] = time.perf_counter() - began

    def sample(self, available: Sequence[int]) -> list[int]:
        """This round's clients among ``available`` (sorted), from the run's seeded stream."""
        self._population = len(available)
        if not available:
            log.warning("round %d: no known client is online", self.row["round"])
            return []
        size = min(self.cfg.federated.clients_per_round, len(available))
        sampled = sorted(int(k) for k in self.rng.choice(np.asarray(available), size=size, replace=False))
        self.row["sampled"] = sampled
        return sampled

    def message(self, k: int) -> Message:
        """What client ``k`` receives now (for training or evaluation)."""
        return self.algorithm.client_message(k)

    def train_messages(self, sampled: Sequence[int]) -> dict[int, Message]:
        messages = {k: self.message(k) for k in sampled}
        self.row["bytes_down"] = sum(payload.message_bytes(m) for m in messages.values())
        return messages

    def receive_training(self, replies: Sequence[TrainReply]) -> None:
        """The round's replies (a sampled client without one failed): acknowledged, validated,
        privatised (central DP), then the algorithm's server step, unless fewer than
        ``min_replies`` came back."""
        t, algo, row = self.t, self.algorithm, self.row
        replies = sorted(replies, key=lambda r: r.client_id)
        for reply in replies:
            algo.acknowledge(reply.client_id)
        replied = [r.client_id for r in replies]
        row.update({"clients": replied, "failed": sorted(set(row["sampled"]) - set(replied)),
                    "bytes_up": sum(payload.message_bytes(r.sent) for r in replies),
                    "client_examples": {str(r.client_id): r.num_examples for r in replies},
                    "slowest_client_s": max((r.seconds for r in replies), default=0.0),
                    "train_loss": float(np.nanmean([r.loss for r in replies])) if replies else float("nan")})
        if row["failed"]:
            log.warning("round %d: no usable reply from clients %s (error or timeout); left out", row["round"],
                        row["failed"])
        if len(replies) < self.min_replies:
            log.warning("round %d: %d of %d sampled clients replied, fewer than min-replies=%d; global tensors "
                        "unchanged", row["round"], len(replies), len(row["sampled"]), self.min_replies)
            row["skipped"] = True
            return
        updates = [ClientUpdate(r.client_id, r.sent.model, r.num_examples, r.num_steps, r.sent.extras)
                   for r in replies]
        updates, rejected = filter_updates(updates, algo.global_shared(), self.validation, log, algo.extras_problem)
        row["rejected"] = [list(r) for r in rejected]
        learned: RoundUpdates = updates
        if self.privacy is not None:  # the population's privatised mean, even when no update was valid
            learned = self.privacy.aggregate(t, updates, algo.global_shared(), self._population, len(row["sampled"]))
            row["epsilon"] = self.privacy.epsilon()
        elif not updates:
            log.warning("round %d: no valid update; global state unchanged", row["round"])
            return
        algo.aggregate(t, row["sampled"], learned)

    def receive_secure(self, summed: SecureRound | None, halted: str = "") -> None:
        """Secure aggregation (``privacy.secure_aggregation``): the round's sum instead of replies,
        from Flower's SecAgg+ or the simulator's :func:`~fedpeptao.privacy.secure.sum_of`; ``None``
        when the protocol halted (``halted`` says why): nothing was revealed, the round is skipped.
        The contributors are acknowledged and the algorithm's step receives a
        :class:`~fedpeptao.core.aggregation.PopulationUpdate` built from the sum (privatised under
        DP), never one client's update; the row counts ``contributors`` and ``dropped``."""
        t, algo, row = self.t, self.algorithm, self.row
        contributors = [] if summed is None else sorted(summed.contributors)
        for k in contributors:
            algo.acknowledge(k)
        reference = algo.global_shared()
        row.update({"clients": contributors, "failed": sorted(set(row["sampled"]) - set(contributors)),
                    "contributors": len(contributors), "dropped": len(row["sampled"]) - len(contributors),
                    "bytes_up": len(contributors) * masked_bytes(summed) if summed else 0,
                    "slowest_client_s": max(summed.seconds.values(), default=0.0) if summed else 0.0,
                    "train_loss": float(np.nanmean(list(summed.losses.values())))
                    if summed and summed.losses else float("nan")})
        if summed is None:
            log.warning("round %d: secure aggregation halted (%s); nothing revealed, global tensors unchanged",
                        row["round"], halted or "no sum")
            row["skipped"] = True
            return
        if row["failed"]:
            log.warning("round %d: clients %s are not in the secure sum (error, timeout or dropped out)",
                        row["round"], row["failed"])
        problem = layout_problem(summed, reference) or self._summed_extras_problem(summed, reference)
        if len(contributors) < self.min_replies or problem is not None:
            log.warning("round %d: %s; global tensors unchanged", row["round"], problem or
                        f"{len(contributors)} of {len(row['sampled'])} sampled clients in the sum, fewer than "
                        f"min-replies={self.min_replies}")
            row["skipped"] = True
            return
        if self.privacy is not None:
            learned = self.privacy.aggregate_sum(t, summed_tensors(summed, reference), len(contributors), reference,
                                                 self._population, len(row["sampled"]), summed.mean_steps())
            row["epsilon"] = self.privacy.epsilon()
        else:
            learned = mean_update(summed, reference)
        algo.aggregate(t, row["sampled"], learned)

    def _summed_extras_problem(self, summed: SecureRound, reference: Mapping[str, Tensor]) -> str | None:
        """The algorithm's check of the summed extras (a sum is laid out like one reply's extras);
        under DP none may be in the sum (clipping and noise cover the model change only)."""
        extras = extras_sums(summed, reference)
        if extras and self.privacy is not None:
            return f"the sum carries extras {sorted(extras)}, which DP does not cover"
        problem = self.algorithm.extras_problem(ClientUpdate(-1, {}, 0, 0, extras=extras))
        return None if problem is None else f"the summed extras: {problem}"

    def evaluates(self, t: int) -> bool:
        """Whether round ``t`` ends with an evaluation (every ``eval_every`` rounds, and the last)."""
        fed = self.cfg.federated
        return (t + 1) % fed.eval_every == 0 or t == fed.rounds - 1

    def receive_evaluation(self, replies: Sequence[EvalReply]) -> dict[str, float]:
        """Acknowledge the evaluated clients and pool their results into the row."""
        for reply in replies:
            self.algorithm.acknowledge(reply.client_id)
        pooled = pool_evaluations(replies, self.metric)
        if "accuracy" not in pooled:
            log.warning("evaluate: no client reported results")
        pooled.update(group_evaluations(replies, self.trained_clients(), self.metric))
        self.row.update(pooled)
        return pooled

    def trained_clients(self) -> set[int]:
        """Every client that has sent a training reply in this run (this round's included)."""
        return {int(k) for row in [*self.history, self.row] for k in row.get("clients", ())}

    def close_round(self) -> dict[str, Any]:
        """Running totals, the row to ``metrics.jsonl``, and a checkpoint when one is due."""
        row, t = self.row, self.t
        row["shared_tensors"] = len(self.algorithm.shared)
        close_row(row, self.history[-1] if self.history else {}, time.perf_counter() - self._started)
        self.history.append(row)
        if self._log is not None:
            self._log.write(row)
        every = self.cfg.checkpoint.every
        if (every and (t + 1) % every == 0) or t == self.cfg.federated.rounds - 1:
            self.save_checkpoint(row["round"])
        return row

    def finish(self, run_task: RunTask) -> None:
        """After the last round: the algorithm's phases due then (a run that ended inside
        FedPepTAO's warm-up still selects its layers), and the log closed."""
        self.algorithm.prepare_round(self.cfg.federated.rounds, run_task)
        if self._log is not None:
            self._log.close()

    # -- checkpoint and resume ---------------------------------------------------------------
    def state(self) -> State:
        """The engine's own section of a checkpoint: every RNG (the sampling stream's included,
        torch's as ``rng/...`` tensors), the history, the accountant and the config, as JSON."""
        rng_tensors, rng_meta = rng_state(self.rng)
        return add_prefix("rng", rng_tensors), {
            "rng": rng_meta, "history": self.history, "config": self.cfg.model_dump(mode="json"),
            "privacy": None if self.privacy is None else self.privacy.state()}

    def save_checkpoint(self, round_number: int) -> Path | None:
        """The checkpoint of round ``round_number`` (from 1: the state after that round): the
        sections ``engine``, ``algorithm`` and the transport's (:attr:`extra_state`) joined into
        one State and written crash-safe; nothing without a checkpoint directory."""
        if self.checkpoint_dir is None:
            return None
        tensors, meta = join({"engine": self.state(), "algorithm": self.algorithm.state(), **self.extra_state()})
        return save_checkpoint(self.checkpoint_dir, round_number, tensors, meta, keep=self.cfg.checkpoint.keep)

    def has_checkpoint(self) -> bool:
        return self.checkpoint_dir is not None and bool(list_checkpoints(self.checkpoint_dir))

    def read_checkpoint(self) -> dict[str, State]:
        """The newest valid checkpoint's sections (``engine``, ``algorithm``, the transport's); the
        RNGs and the history are restored at once. Refused when it was written with another config
        (continuing it would mix two experiments)."""
        number, tensors, meta = load_latest_checkpoint(self.checkpoint_dir)
        sections = split((tensors, meta))
        engine_tensors, engine = sections["engine"]
        difference = config_difference(engine["config"], self.cfg.model_dump(mode="json"), RESUMABLE_CHANGES)
        if difference:
            raise ConfigError(f"{self.checkpoint_dir}: its checkpoint was written with another config ({difference}); "
                              f"resume with the config it was written with")
        restore_rng_state((take_prefix(engine_tensors, "rng"), engine["rng"]), self.rng)
        self.history = list(engine["history"])
        log.info("continuing after round %d (its checkpoint in %s)", number, self.checkpoint_dir)
        return sections

    def load_state(self, sections: Mapping[str, State]) -> None:
        """The algorithm's and the accountant's part of a checkpoint (after :meth:`read_checkpoint`)."""
        self.algorithm.load_state(*sections["algorithm"])
        if self.privacy is not None:
            self.privacy.load_state(sections["engine"][1]["privacy"])


#: the two groups every evaluation also reports: clients that have trained at least once (their
#: personal tensors and the shared ones both learned) and clients that never did (cross-device: most)
GROUPS = ("trained", "untrained")


def group_evaluations(replies: Sequence[EvalReply], trained: set[int], metric: str) -> dict[str, Any]:
    """The test metric pooled over each group's clients (``trained_metric``, ``untrained_accuracy``,
    ...) and each group's client count; pooled the same way as the whole, so the two groups'
    predictions together give the pooled figure."""
    row: dict[str, Any] = {}
    for group in GROUPS:
        members = [r for r in replies if (r.client_id in trained) == (group == "trained")]
        pooled = pool_evaluations(members, metric) if members else {}
        row[f"{group}_clients"] = len(members)
        if "accuracy" in pooled:
            row.update({f"{group}_accuracy": pooled["accuracy"], f"{group}_metric": pooled["metric"],
                        f"{group}_examples": pooled["eval_examples"]})
    return row


def pool_evaluations(replies: Sequence[EvalReply], metric: str) -> dict[str, Any]:
    """Every client's predictions pooled per split (as confusion counts, which give accuracy, F1
    and MCC exactly), the mean loss over the pooled examples, and each evaluated client's test
    accuracy (``{client id: accuracy}``)."""
    pooled: dict[str, list[SplitResult]] = {}
    per_client: dict[str, float] = {}  # by client id (a Flower node may serve any id)
    for reply in sorted(replies, key=lambda r: r.client_id):
        for split, result in reply.splits.items():
            if result.count == 0:
                continue
            pooled.setdefault(split, []).append(result)
            if split == "test":
                per_client[str(reply.client_id)] = split_metrics([result], "accuracy")["accuracy"]
    row: dict[str, Any] = {}
    for split, prefix in (("test", ""), ("validation", "val_")):
        if split in pooled:
            values = split_metrics(pooled[split], metric)
            row.update({f"{prefix}{name}" if name != "loss" or prefix else "eval_loss": value
                        for name, value in values.items()})
    if "test" in pooled:
        row.update({"client_accuracy": per_client, "eval_examples": sum(r.count for r in pooled["test"])})
    return row


def split_metrics(results: Sequence[SplitResult], metric: str) -> dict[str, float]:
    """``accuracy``, ``metric`` and ``loss`` of clients' results on one split, pooled: classes from
    the summed confusion counts; generated answers from the summed counts (``accuracy`` is the
    exact match, and ``exact_match`` / ``choice_accuracy`` are reported too)."""
    loss = sum(r.loss_sum for r in results) / max(sum(r.loss_weight for r in results), 1)
    if results[0].generation is None:
        preds, labels = expand_confusion(sum(r.confusion for r in results))
        return {"accuracy": score("accuracy", preds, labels), "metric": score(metric, preds, labels), "loss": loss}
    counts = {key: sum(r.generation[key] for r in results) for key in results[0].generation if key != "tokens"}
    values = GenerationScore.from_counts(counts).metrics()
    return {"accuracy": values["exact_match"], "metric": values.get(metric, values["exact_match"]), **values,
            "loss": loss}

"""The device side of a run, written once: what a client does on a message.

A :class:`ClientWorker` holds one model (the frozen backbone and the tuning), the data, and the
algorithm's device hooks. It trains, evaluates and runs an algorithm's phase task for the
clients it is handed, each with the :class:`~fedpeptao.core.federation.ClientState` it keeps.
The embedded simulator hands it every client of a round (one worker, one backbone, many
states); a Flower ClientApp hands it its own client. The worker is also the executor that
decides which clients share a forward/backward pass (:meth:`ClientWorker.passes`): slot mode
is entered only below it, so algorithms and the maths in ``core/`` see one client's tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from fedpeptao.algorithms.base import Algorithm, ClientTask, ClientWork
from fedpeptao.config import ExperimentConfig
from fedpeptao.core.client import LocalJob, local_train, predict
from fedpeptao.core.federation import ClientState, batch_order_seed, round_seed
from fedpeptao.core.metrics import confusion
from fedpeptao.core.payload import Message
from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.engine.rounds import EvalReply, SplitResult, TrainReply
from fedpeptao.experiment import Federation
from fedpeptao.generation import completion_loss, evaluate_generation
from fedpeptao.models.slots import ClientView, batch_refusal
from fedpeptao.privacy.engine import ClientPrivacy
from fedpeptao.utils.device import to_device

log = logging.getLogger("fedpeptao.client")


@dataclass
class Job:
    """One client's part of a call: who, what it received, and what it keeps (updated in place)."""

    client_id: int
    message: Message
    state: ClientState


class ClientWorker:
    """Train, evaluate and run phase tasks for clients on one shared model."""

    def __init__(self, cfg: ExperimentConfig, fed: Federation, algorithm: Algorithm,
                 privacy: ClientPrivacy | None = None, public: tuple[EncodedDataset, np.ndarray] | None = None,
                 partition_of: Callable[[int], int] = int) -> None:
        self.cfg = cfg
        self.fed = fed
        self.model = fed.model
        self.algorithm = algorithm  # only its device hooks run here
        self.privacy = privacy  # local DP noises a reply here, before it leaves the device
        self.public = public  # privacy.selection=public: phase tasks read this public data instead
        self.partition_of = partition_of  # client id -> its slice of the data (a node: its own)
        # Evaluation pools a pass's clients whenever the tuning can give each example its client's
        # tensors (no order to keep there); training shares passes as `execution` says.
        refusal = batch_refusal(self.model)
        self.pooled_eval = refusal is None and cfg.clients_per_pass > 1
        wanted = cfg.execution == "batched" or (cfg.execution == "auto" and self.model.device.type != "cpu")
        self.batched = wanted and self.pooled_eval
        if wanted and refusal is not None:
            log.info("execution=%s: %s (tuning %s) cannot give each client its own tensors in one pass, "
                     "so clients train one at a time", cfg.execution, refusal, cfg.tuning.name)

    def passes(self, clients: Sequence[int], shared: bool | None = None) -> list[list[int]]:
        """``clients`` in groups that share passes (``clients_per_pass``; one each unless ``shared``,
        by default whether training is batched)."""
        size = self.cfg.clients_per_pass if (self.batched if shared is None else shared) else 1
        clients = list(clients)
        return [clients[i:i + size] for i in range(0, len(clients), size)]

    # -- training ---------------------------------------------------------------------------
    def train(self, round_index: int, jobs: Sequence[Job]) -> list[TrainReply]:
        """One local round for each job's client, a pass's clients together; states updated."""
        by_client = {job.client_id: job for job in jobs}
        replies = []
        for group in self.passes([job.client_id for job in jobs]):
            replies += self._train_pass(round_index, [by_client[k] for k in group])
        return replies

    def _train_pass(self, round_index: int, jobs: Sequence[Job]) -> list[TrainReply]:
        algo, fed, seed = self.algorithm, self.fed, self.cfg.seed
        starts = [algo.client_start(job.message, job.state) for job in jobs]
        if len(jobs) == 1:  # alone: the model itself trains, no slots
            self.model.load_trainable(starts[0])
            views = [self.model]
        else:  # each client's tensors in its own view of the shared model
            views = [ClientView(self.model, start) for start in starts]
        seeds = [round_seed(seed, round_index, job.client_id) for job in jobs]
        with ExitStack() as stack:
            extras = [stack.enter_context(algo.client_training(view, job.message, job.state))
                      for view, job in zip(views, jobs)]
            torch.manual_seed(seeds[0])  # dropout: one stream for the pass
            local = [LocalJob(view, fed.train_parts[self.partition_of(job.client_id)], np.random.default_rng(s),
                              job.state.optimizer, extra) for view, job, s, extra in zip(views, jobs, seeds, extras)]
            results = local_train(self.model, fed.train_data, local, fed.local_cfg,
                                  batch_order_seed(seed, round_index))
        replies = []
        for job, view, result in zip(jobs, views, results):
            state, params = job.state, view.trainable_state()
            state.params, state.optimizer = params, result.optimizer_state
            state.rounds_trained += 1
            trained = {n: params[n] for n in job.message.model}
            sent = algo.client_reply(job.message, trained, result.num_steps, state)
            if self.privacy is not None:  # local DP: noised before it leaves the device
                sent = self.privacy.device_reply(sent, job.message.model, job.client_id, round_index)
            replies.append(TrainReply(job.client_id, sent, result.num_examples, result.num_steps,
                                      result.mean_loss, result.seconds))
        return replies

    # -- evaluation -------------------------------------------------------------------------
    def splits(self) -> list[tuple[str, EncodedDataset, list[np.ndarray]]]:
        fed = self.fed
        return [("test", fed.eval_data, fed.eval_parts), ("validation", fed.val_data, fed.val_parts)]

    def holds_eval_data(self, client_id: int) -> bool:
        index = self.partition_of(client_id)
        return any(len(parts[index]) for _, _, parts in self.splits())

    def evaluate(self, jobs: Sequence[Job]) -> list[EvalReply]:
        """Each job's client with its own tensors (what it would train from on this message) on its
        test and validation examples; several clients per pass where the tuning allows."""
        tensors = {job.client_id: self.algorithm.client_start(job.message, job.state) for job in jobs}
        replies = {job.client_id: EvalReply(job.client_id) for job in jobs}
        score = self._generated if self.model.task.generative else self._classified
        for group in self.passes(list(tensors), self.pooled_eval):
            for split, data, parts in self.splits():
                members = [k for k in group if len(parts[self.partition_of(k)])]
                if not members:
                    continue
                indices = [parts[self.partition_of(k)] for k in members]
                own = [tensors[k] for k in members]
                if len(members) > 1:
                    own = to_device(own, self.model.device)
                for k, result in zip(members, score(data, indices, own)):
                    replies[k].splits[split] = result
        return [replies[job.client_id] for job in jobs]

    def _classified(self, data: EncodedDataset, parts: list[np.ndarray], tensors: list) -> list[SplitResult]:
        """Each client's confusion counts and summed loss on its examples ``parts[k]``."""
        return [SplitResult(confusion(preds, data.labels[part], self.fed.num_labels), loss_sum)
                for part, (preds, loss_sum) in zip(parts, predict(self.model, data, parts, tensors))]

    def _generated(self, data, parts: list[np.ndarray], tensors: list) -> list[SplitResult]:
        """Each client's greedy answers scored against the references, and its summed completion loss."""
        gen = self.cfg.generation
        scores = evaluate_generation(self.model, self.fed.backbone.tokenizer, data, parts, tensors,
                                     gen.max_new_tokens, gen.batch_size, self.cfg.model.max_length)
        losses = completion_loss(self.model, data, parts, tensors, gen.batch_size)
        return [SplitResult(None, loss_sum, {**score.counts(), "tokens": tokens})
                for score, (loss_sum, tokens) in zip(scores, losses)]

    # -- an algorithm phase's task ----------------------------------------------------------
    def run_task(self, task: ClientTask, clients: Sequence[int]) -> dict[int, dict]:
        """``task`` on each of ``clients`` (a pass's clients together), every one at ``task.params``;
        on public data (``privacy.selection=public``) computed once, standing for every client."""
        cfg, model = self.cfg, self.model
        clients = [int(k) for k in clients]

        def work(k: int, data: EncodedDataset, indices: np.ndarray) -> ClientWork:
            return ClientWork(k, model, data, indices, round_seed(cfg.seed, task.round, k, task.stream),
                              cfg.client.batch_size)

        if self.public is not None:
            model.load_trainable(task.params)
            result = self.algorithm.run_tasks(task, [work(clients[0], *self.public)])[0]
            return {k: result for k in clients}
        results = {}
        for group in self.passes(clients):
            model.load_trainable(task.params)
            works = [work(k, self.fed.train_data, self.fed.train_parts[self.partition_of(k)]) for k in group]
            results.update(zip(group, self.algorithm.run_tasks(task, works)))
        return results

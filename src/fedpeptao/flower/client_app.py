"""The ClientApp: one SuperNode is one federated client, running any algorithm's device side.

Each handler rebuilds (or reuses, within one process) the model, data and algorithm from the
experiment the server sent, restores this client's own tensors, optimiser state and algorithm
state, and calls the same code as the embedded simulator: the algorithm's device hooks
(``client_start``, ``client_training``, ``client_reply``, ``run_task``) around
:func:`~fedpeptao.core.federation.client_round` and :func:`~fedpeptao.core.client.predict`.
State lives in ``context.state`` (and on the node's disk), never in module globals, because one
Flower worker may serve many clients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeptao.algorithms import Algorithm
from fedpeptao.algorithms.base import ClientTask, ClientWork
from fedpeptao.config import ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.core.client import predict
from fedpeptao.core.federation import ClientState, batch_order_seed, client_round, round_seed
from fedpeptao.experiment import Federation, make_privacy
from fedpeptao.flower import records as R
from fedpeptao.flower.build import cached_federation, cached_public_data, resolve_data_path
from fedpeptao.flower.logs import route_to_flower
from fedpeptao.flower.node_state import ClientStore, StoredClient
from fedpeptao.flower.settings import NodeSettings

app = ClientApp()


@dataclass
class ClientJob:
    """Everything one handler call works with."""

    cfg: ExperimentConfig
    fed: Federation
    algorithm: Algorithm  # only its device side runs here
    node: NodeSettings
    train_part: np.ndarray
    eval_part: np.ndarray
    val_part: np.ndarray
    store: ClientStore
    build_key: tuple[str, str | None, str | None]  # what the cached federation was built from

    def load(self, before: int) -> StoredClient:
        """This client's state from before round ``before``, or the fresh initialisation."""
        return self.store.load(before) or StoredClient(ClientState(params=dict(self.fed.initial)))

    def work(self, task: ClientTask) -> ClientWork:
        seed = round_seed(self.cfg.seed, task.round, self.node.client_id, task.stream)
        return ClientWork(self.node.client_id, self.fed.model, self.fed.train_data, self.train_part, seed,
                          self.cfg.client.batch_size)


def _job(message: Message, context: Context) -> ClientJob:
    route_to_flower()
    config = message.content[R.CONFIG]
    cfg = ExperimentConfig.model_validate_json(str(config[R.EXPERIMENT]))
    node = NodeSettings.from_node_config(context.node_config, cfg)
    torch.set_num_threads(node.num_threads)
    data_path = resolve_data_path(node.data_path) if node.data_path is not None else None
    build_key = (R.experiment_json(cfg), node.model_path, data_path)
    fed, algorithm = cached_federation(*build_key)
    index = 0 if node.partition is None else node.partition
    directory = None
    if node.state_dir is not None:  # per run and client, so a new run never picks up an old one's state
        directory = node.state_dir / f"run-{config[R.RUN_KEY]}" / f"client-{node.client_id}"
    keep = max(2, cfg.checkpoint.every + 1)  # back to the server's last checkpoint
    return ClientJob(cfg, fed, algorithm, node, fed.train_parts[index], fed.eval_parts[index], fed.val_parts[index],
                     ClientStore(context.state, directory, keep), build_key)


def _reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


@app.query("setup")
def setup(message: Message, context: Context) -> Message:
    """Identity, data sizes, initial tensors and the names of the tuning's layer groups and head."""
    job = _job(message, context)
    model = job.fed.model
    metrics = {"client-id": job.node.client_id, "num-train": len(job.train_part), "num-eval": len(job.eval_part),
               "num-labels": job.fed.num_labels}
    names = ConfigRecord({"layer-groups": json.dumps({str(i): n for i, n in model.layer_groups().items()}),
                          "head-names": json.dumps(model.head_names()), "metric": job.fed.metric})
    return _reply(message, **{R.INIT: R.to_record(job.fed.initial), R.METRICS: MetricRecord(metrics),
                              R.CONFIG: names})


@app.query("task")
def task(message: Message, context: Context) -> Message:
    """A client-side computation of an algorithm's phase (layer scores, a Hessian ratio, ...)."""
    job = _job(message, context)
    spec = json.loads(str(message.content[R.CONFIG][R.TASK_SPEC]))
    params = R.from_record(message.content[R.GLOBAL])
    work_task = ClientTask(spec["kind"], None, params, int(spec["round"]), int(spec["stream"]),
                           {job.node.client_id: spec.get("options", {})})
    job.fed.model.load_trainable(params)
    work = job.work(work_task)
    if spec.get("public"):  # privacy.selection=public: this node computes on the public data for all
        work.data, work.indices = cached_public_data(*job.build_key)
    result = job.algorithm.run_task(work_task, work)
    return _reply(message, **{R.CONFIG: ConfigRecord({R.RESULT: json.dumps(result)}),
                              R.METRICS: MetricRecord({"client-id": job.node.client_id})})


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training, seeded exactly as the simulator seeds this client in this round,
    inside the algorithm's device hooks with this client's own previous state."""
    job = _job(message, context)
    round_index = int(message.content[R.CONFIG][R.ROUND])
    stored = job.load(before=round_index)
    algo, client = job.algorithm, stored.state
    received = R.from_record(message.content[R.GLOBAL])
    start = algo.client_start(received, client)
    with algo.client_training(job.fed.model, received, client) as extra_loss:
        update, result = client_round(job.fed.model, client, start, list(algo.model_part(received)),
                                      job.fed.train_data, job.train_part, job.fed.local_cfg,
                                      round_seed(job.cfg.seed, round_index, job.node.client_id), extra_loss,
                                      batch_order_seed(job.cfg.seed, round_index))
    sent = algo.client_reply(received, update, result.num_steps, client)
    privacy = make_privacy(job.cfg)
    if privacy is not None:  # local DP: noised here, before the reply leaves the node
        sent = privacy.device_reply(sent, algo.model_part(received), job.node.client_id, round_index)
    job.store.save(StoredClient(client, round_index))
    metrics = {"client-id": job.node.client_id, "num-examples": result.num_examples, "num-steps": result.num_steps,
               "train-loss": float(result.mean_loss), "seconds": float(result.seconds),
               "bytes-up": payload.num_bytes(sent)}
    return _reply(message, **{R.UPDATE: R.to_record(sent), R.METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Own tensors plus the global shared ones on this client's eval data: counts, not scores,
    so the server can pool predictions as the simulator does."""
    job = _job(message, context)
    round_index = int(message.content[R.CONFIG][R.ROUND])
    stored = job.load(before=round_index + 1)
    received = R.from_record(message.content[R.GLOBAL])
    kept = dict(stored.state.algo_state)
    start = job.algorithm.client_start(received, stored.state)
    if stored.state.algo_state != kept:  # the device kept something of this message
        job.store.save(StoredClient(stored.state, round_index))
    job.fed.model.load_trainable(start)
    metrics = {"client-id": job.node.client_id}
    for prefix, data, part in (("", job.fed.eval_data, job.eval_part), ("val-", job.fed.val_data, job.val_part)):
        metrics.update({f"{prefix}num-examples": len(part), f"{prefix}loss-sum": 0.0,
                        f"{prefix}confusion": [0] * job.fed.num_labels ** 2})
        if len(part):
            preds, loss_sum = predict(job.fed.model, data, part)
            metrics.update({f"{prefix}loss-sum": float(loss_sum),
                            f"{prefix}confusion": R.confusion(preds, data.labels[part], job.fed.num_labels)})
    return _reply(message, **{R.METRICS: MetricRecord(metrics)})

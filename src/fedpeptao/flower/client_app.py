"""The ClientApp: one SuperNode is one federated client, running any algorithm's device side.

Each handler rebuilds (or reuses, within one process) the model, data and algorithm from the
experiment the server sent, restores this client's own tensors, optimiser state and algorithm
state, and hands the message to a :class:`~fedpeptao.engine.worker.ClientWorker`: the same
device side as the embedded simulator's, serving this node's one client.
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

from fedpeptao.algorithms.base import ClientTask
from fedpeptao.config import ExperimentConfig
from fedpeptao.core.federation import ClientState
from fedpeptao.engine.rounds import SPLITS
from fedpeptao.engine.worker import ClientWorker, Job
from fedpeptao.experiment import Federation, make_privacy
from fedpeptao.flower import records as R
from fedpeptao.flower.build import cached_federation, cached_public_data, resolve_data_path
from fedpeptao.flower.logs import route_to_flower
from fedpeptao.flower.node_state import ClientStore, StoredClient
from fedpeptao.flower.secagg import contribution, is_secure, secaggplus_when_asked
from fedpeptao.flower.settings import NodeSettings
from fedpeptao.privacy.secure import device_contribution

app = ClientApp()


@dataclass
class ClientJob:
    """Everything one handler call works with."""

    cfg: ExperimentConfig
    fed: Federation
    worker: ClientWorker  # the same device side as the simulator's, for this node's one client
    node: NodeSettings
    store: ClientStore

    def load(self, before: int) -> StoredClient:
        """This client's state from before round ``before``, or the fresh initialisation."""
        return self.store.load(before) or StoredClient(ClientState(params=dict(self.fed.initial)))


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
    public = cached_public_data(*build_key) if cfg.privacy.public_selection else None
    worker = ClientWorker(cfg, fed, algorithm, make_privacy(cfg), public, partition_of=lambda _client: index)
    directory = None
    if node.state_dir is not None:  # per run and client, so a new run never picks up an old one's state
        directory = node.state_dir / f"run-{config[R.RUN_KEY]}" / f"client-{node.client_id}"
    keep = max(2, cfg.checkpoint.every + 1)  # back to the server's last checkpoint
    return ClientJob(cfg, fed, worker, node, ClientStore(context.state, directory, keep))


def _reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


@app.query("setup")
def setup(message: Message, context: Context) -> Message:
    """Identity, data sizes, initial tensors and the names of the tuning's layer groups and head."""
    job = _job(message, context)
    model, index = job.fed.model, job.worker.partition_of(job.node.client_id)
    metrics = {"client-id": job.node.client_id, "num-train": len(job.fed.train_parts[index]),
               "num-eval": len(job.fed.eval_parts[index]), "num-labels": job.fed.num_labels}
    names = ConfigRecord({"layer-groups": json.dumps({str(i): n for i, n in model.layer_groups().items()}),
                          "head-names": json.dumps(model.head_names()), "metric": job.fed.metric})
    return _reply(message, **{R.INIT: R.to_record(job.fed.initial), R.METRICS: MetricRecord(metrics),
                              R.CONFIG: names})


@app.query("task")
def task(message: Message, context: Context) -> Message:
    """A client-side computation of an algorithm's phase (layer scores, a Hessian ratio, ...)."""
    job = _job(message, context)
    cid = job.node.client_id
    spec = json.loads(str(message.content[R.CONFIG][R.TASK_SPEC]))
    work_task = ClientTask(spec["kind"], [cid], R.from_record(message.content[R.GLOBAL]), int(spec["round"]),
                           int(spec["stream"]), {cid: spec.get("options", {})})
    result = job.worker.run_task(work_task, [cid])[cid]
    return _reply(message, **{R.CONFIG: ConfigRecord({R.RESULT: json.dumps(result)}),
                              R.METRICS: MetricRecord({"client-id": cid})})


@app.train(mods=[secaggplus_when_asked])
def train(message: Message, context: Context) -> Message:
    """One round of local training, seeded exactly as the simulator seeds this client in this round,
    inside the algorithm's device hooks with this client's own previous state.

    In a SecAgg+ round (``privacy.secure_aggregation``) Flower's mod runs the protocol's stages and
    calls this handler in its 'collect masked vectors' stage; the reply is then the client's
    :func:`~fedpeptao.privacy.secure.device_contribution` (weighted change and weight, which the mod
    quantizes and masks) with plaintext metrics only (client id, steps, loss, seconds). A
    contribution that cannot be summed raises: the node leaves the round."""
    job = _job(message, context)
    round_index = int(message.content[R.CONFIG][R.ROUND])
    stored = job.load(before=round_index)
    received = R.read_message(R.GLOBAL, message.content)
    (reply,) = job.worker.train(round_index, [Job(job.node.client_id, received, stored.state)])
    job.store.save(StoredClient(stored.state, round_index + 1))  # the index is from 0, stored rounds from 1
    if is_secure(message):
        if not job.cfg.privacy.secure_aggregation:
            raise ValueError("a SecAgg+ round for an experiment without privacy.secure_aggregation")
        given = device_contribution(job.cfg.privacy, job.worker.privacy, reply.client_id, round_index,
                                    reply.sent.model, received.model, num_examples=reply.num_examples,
                                    num_steps=reply.num_steps, loss=reply.loss, seconds=reply.seconds,
                                    extras=reply.sent.extras)
        return Message(contribution(given.arrays, given.weight, metrics=given.metrics(), context=context),
                       reply_to=message)
    if job.cfg.privacy.secure_aggregation:  # never send one client's update in plaintext
        raise ValueError("privacy.secure_aggregation: a plain train message; this node replies only in SecAgg+ "
                         "rounds")
    metrics = {"client-id": reply.client_id, "num-examples": reply.num_examples, "num-steps": reply.num_steps,
               "train-loss": float(reply.loss), "seconds": float(reply.seconds)}
    return _reply(message, **R.message_records(R.UPDATE, reply.sent), **{R.METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Own tensors plus the global shared ones on this client's eval data: counts, not scores,
    so the server pools predictions as the simulator does. Per split: the confusion counts
    (``<split>-confusion``), or for a generative task the generated answers' counts and the
    completion tokens its loss sums over (``<split>-generation-<name>``, one integer each); and the
    summed loss (``<split>-loss-sum``). A split the client holds no examples of reports zeros."""
    job = _job(message, context)
    round_index = int(message.content[R.CONFIG][R.ROUND])
    stored = job.load(before=round_index + 1)
    kept = dict(stored.state.algo_state)
    (reply,) = job.worker.evaluate([Job(job.node.client_id, R.read_message(R.GLOBAL, message.content),
                                        stored.state)])
    if stored.state.algo_state != kept:  # the device kept something of this message
        job.store.save(StoredClient(stored.state, round_index + 1))
    metrics: dict = {"client-id": job.node.client_id}
    generative = job.fed.model.task.generative
    for split in SPLITS:
        result = reply.splits.get(split)
        if generative:
            from fedpeptao.generation import GenerationScore  # noqa: PLC0415

            counts = result.generation if result is not None else {**GenerationScore().counts(), "tokens": 0}
            metrics.update({f"{split}-generation-{name}": int(value) for name, value in counts.items()})
        else:
            counts = result.confusion if result is not None else np.zeros((job.fed.num_labels,) * 2, dtype=np.int64)
            metrics[f"{split}-confusion"] = counts.reshape(-1).tolist()
        metrics[f"{split}-loss-sum"] = 0.0 if result is None else float(result.loss_sum)
    return _reply(message, **{R.METRICS: MetricRecord(metrics)})

"""The FedPepTAO ClientApp: one SuperNode is one federated client.

Each handler rebuilds (or reuses, within one process) the model and data from the experiment and
method the server sent, restores this client's personal tensors, optimiser state and rule state,
and calls the same core functions as the embedded simulator: :func:`~fedpeptao.core.federation.client_round`
for training (inside the device side of the method's rule, as ``BaselineSimulation`` does),
:func:`~fedpeptao.core.selection.client_layer_scores` and
:func:`~fedpeptao.core.selection.client_hvp` for layer selection,
:func:`~fedpeptao.core.client.predict` for evaluation. State lives in ``context.state`` (and on the
node's disk), never in module globals, because one Flower worker may serve many clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeptao.baselines.methods import get_method, method_rule
from fedpeptao.baselines.optimizers import FedAvgRule
from fedpeptao.config import ExperimentConfig
from fedpeptao.core import payload
from fedpeptao.core.client import predict
from fedpeptao.core.federation import HESSIAN_STREAM, SCORE_STREAM, ClientState, client_round, round_seed
from fedpeptao.core.hessian import estimate_ratio
from fedpeptao.core.selection import client_hvp, client_layer_scores
from fedpeptao.flower import records as R
from fedpeptao.flower.build import Federation, cached_federation, resolve_data_path
from fedpeptao.flower.logs import route_to_flower
from fedpeptao.flower.node_state import ClientStore, StoredClient
from fedpeptao.flower.settings import NodeSettings

app = ClientApp()

HESSIAN_BATCH = 32  # the simulator's batch for Hessian-vector products


@dataclass
class ClientJob:
    """Everything one handler call works with."""

    cfg: ExperimentConfig
    fed: Federation
    node: NodeSettings
    train_part: np.ndarray
    eval_part: np.ndarray
    store: ClientStore
    rule: FedAvgRule  # the method's rule; only its device side runs here

    def load(self) -> StoredClient:
        """This client's saved state, or the fresh initialisation every client starts from."""
        return self.store.load() or StoredClient(ClientState(params=dict(self.fed.initial)))

    def adopt_base(self, stored: StoredClient, message: Message) -> bool:
        """After the switch to FedPepTAO, personal layers restart from the warmed-up global tensors (once)."""
        version = int(message.content[R.CONFIG].get(R.BASE_VERSION, -1))
        if R.BASE not in message.content or version <= stored.base_version:
            return False
        stored.state.params = R.from_record(message.content[R.BASE])
        stored.base_version = version
        return True


def _job(message: Message, context: Context) -> ClientJob:
    route_to_flower()
    config = message.content[R.CONFIG]
    cfg = ExperimentConfig.model_validate_json(str(config[R.EXPERIMENT]))
    method = get_method(str(config.get(R.METHOD, "")) or cfg.algorithm)
    node = NodeSettings.from_node_config(context.node_config, cfg)
    torch.set_num_threads(node.num_threads)
    data_path = resolve_data_path(node.data_path) if node.data_path is not None else None
    fed = cached_federation(R.experiment_json(cfg), node.model_path, data_path, method.model)
    index = 0 if node.partition is None else node.partition
    directory = None
    if node.state_dir is not None:  # per run and client, so a new run never picks up an old one's state
        directory = node.state_dir / f"run-{context.run_id}" / f"client-{node.client_id}"
    return ClientJob(cfg, fed, node, fed.train_parts[index], fed.eval_parts[index],
                     ClientStore(context.state, directory), method_rule(method, cfg))


def _reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


@app.query("setup")
def setup(message: Message, context: Context) -> Message:
    """Identity, data sizes, initial tensors and (if asked) layer scores of the pretrained model."""
    job = _job(message, context)
    metrics: dict = {"client-id": job.node.client_id, "num-train": len(job.train_part),
                     "num-eval": len(job.eval_part), "num-labels": job.fed.num_labels}
    if bool(message.content[R.CONFIG].get(R.SCORE, False)) and len(job.train_part) >= 2:
        job.fed.model.load_trainable(job.fed.initial)
        scores = client_layer_scores(job.fed.model, job.fed.train_data, job.train_part,
                                     job.cfg.selection.score_batch_size,
                                     round_seed(job.cfg.seed, 0, job.node.client_id, SCORE_STREAM))
        metrics["scores"] = [float(s) for s in scores]
    return _reply(message, **{R.INIT: R.to_record(job.fed.initial), R.METRICS: MetricRecord(metrics)})


@app.query("hessian")
def hessian(message: Message, context: Context) -> Message:
    """This client's share ratio from the Hessian eigen-density at the given global tensors."""
    job = _job(message, context)
    job.fed.model.load_trainable(R.from_record(message.content[R.GLOBAL]))
    hvp = client_hvp(job.fed.model, job.fed.train_data, job.train_part, HESSIAN_BATCH,
                     round_seed(job.cfg.seed, 0, job.node.client_id, HESSIAN_STREAM))
    ratio = estimate_ratio([hvp], num_iters=job.cfg.selection.lanczos_iters,
                           seed=int(message.content[R.CONFIG][R.PROBE_SEED]))
    return _reply(message, **{R.METRICS: MetricRecord({"client-id": job.node.client_id, "ratio": float(ratio)})})


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training, seeded exactly as the simulator seeds this client in this round,
    inside the device side of the method's rule with this client's own previous tensors and rule state."""
    job = _job(message, context)
    stored = job.load()
    job.adopt_base(stored, message)
    received = R.from_record(message.content[R.GLOBAL])
    round_index = int(message.content[R.CONFIG][R.ROUND])
    with job.rule.device_training(job.fed.model, received, stored.state.params, stored.rule_state) as extra_loss:
        update, result = client_round(job.fed.model, stored.state, job.rule.received_model(received),
                                      job.fed.train_data, job.train_part, job.fed.local_cfg,
                                      round_seed(job.cfg.seed, round_index, job.node.client_id), extra_loss)
    sent, stored.rule_state = job.rule.device_upload(received, update, result.num_steps, stored.rule_state)
    job.store.save(stored)
    metrics = {"client-id": job.node.client_id, "num-examples": result.num_examples, "num-steps": result.num_steps,
               "train-loss": float(result.mean_loss), "seconds": float(result.seconds),
               "bytes-up": payload.num_bytes(sent)}
    return _reply(message, **{R.UPDATE: R.to_record(sent), R.METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Personal tensors plus the global shared ones on this client's eval data: counts, not scores,
    so the server can pool predictions as the simulator does."""
    job = _job(message, context)
    stored = job.load()
    if job.adopt_base(stored, message):
        job.store.save(stored)
    metrics = {"client-id": job.node.client_id, "num-examples": len(job.eval_part), "loss-sum": 0.0,
               "confusion": [0] * job.fed.num_labels ** 2}
    if len(job.eval_part):
        job.fed.model.load_trainable({**stored.state.params, **R.from_record(message.content[R.GLOBAL])})
        preds, loss_sum = predict(job.fed.model, job.fed.eval_data, job.eval_part)
        metrics.update({"loss-sum": float(loss_sum),
                        "confusion": R.confusion(preds, job.fed.eval_data.labels[job.eval_part], job.fed.num_labels)})
    return _reply(message, **{R.METRICS: MetricRecord(metrics)})

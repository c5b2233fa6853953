"""The embedded simulator: every client in one process around ONE frozen backbone.

Per client we keep only its trainable tensors, optimiser state and the algorithm's per-device
state (:class:`~fedpeptao.core.federation.ClientState`), and only for clients that have been
contacted; the backbone, the tokenised data and the model object are shared. A client's turn is:
load its tensors into the shared model, train, read them back.

The simulator drives any algorithm x tuning through the protocol of
:mod:`fedpeptao.algorithms.base` and names no method: sampling, validation, evaluation, byte and
time accounting, checkpoints and resume are the same for all of them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedpeptao.algorithms import Algorithm
from fedpeptao.algorithms.base import ClientTask, ClientWork
from fedpeptao.config import ConfigError, ExperimentConfig, load_config, save_config
from fedpeptao.core import payload
from fedpeptao.core.client import predict, predict_batched
from fedpeptao.core.federation import (ClientState, batch_order_seed, client_round, client_rounds_batched,
                                       round_seed)
from fedpeptao.core.metrics import score
from fedpeptao.core.server import ClientUpdate
from fedpeptao.core.validation import ValidationPolicy, filter_model_updates
from fedpeptao.experiment import (build_federation, device_algorithm, make_privacy, public_selection_data,
                                  write_model_card)
from fedpeptao.models.loading import Backbone
from fedpeptao.models.slots import ClientView, batch_refusal
from fedpeptao.report.summary import config_difference, run_summary
from fedpeptao.utils.checkpoint import (capture_rng_state, flatten_state, load_latest_checkpoint, restore_rng_state,
                                        save_checkpoint, unflatten_state)
from fedpeptao.utils.device import describe_device, to_device
from fedpeptao.utils.round_log import RoundLog, close_row

log = logging.getLogger("fedpeptao.server")


class Simulation:
    """Build everything from a config, then :meth:`run` the rounds."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, backbone: Backbone | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.fed = build_federation(cfg, backbone)
        fed = self.fed
        self.model, self.metric = fed.model, fed.metric
        self.train_data, self.eval_data = fed.train_data, fed.eval_data
        self.train_parts, self.eval_parts = fed.train_parts, fed.eval_parts
        self.privacy = make_privacy(cfg)  # client-level DP and its accountant (None: off)
        self.public = public_selection_data(cfg, fed)  # selection on public data (privacy.selection=public)
        self.algorithm: Algorithm = device_algorithm(cfg, fed, self.privacy)
        # A client that was never contacted holds nothing of its own: it starts from `fed.initial`.
        self.clients: dict[int, ClientState] = {}
        srv = cfg.server
        self.validation = ValidationPolicy(max_norm=srv.max_update_norm) if srv.validate_updates else None
        self.rng = np.random.default_rng(cfg.seed)
        self.history: list[dict] = []
        self.rejected: list[tuple[int, str]] = []
        # Evaluation pools the clients of a pass whenever the tuning can give each example its
        # client's tensors (no order to keep there); training shares passes as `execution` says.
        refusal = batch_refusal(self.model)
        self.pooled_eval = refusal is None and cfg.clients_per_pass > 1
        wanted = cfg.execution == "batched" or (cfg.execution == "auto" and self.model.device.type != "cpu")
        self.batched = wanted and self.pooled_eval
        if wanted and refusal is not None:
            log.info("execution=%s: %s (tuning %s) cannot give each client its own tensors in one pass, "
                     "so clients train one at a time", cfg.execution, refusal, cfg.tuning.name)

    def client(self, k: int) -> ClientState:
        """Client ``k``'s state, created (sharing the initial tensors) on first contact."""
        state = self.clients.get(k)
        if state is None:
            state = self.clients[k] = ClientState(params=self.fed.initial)
        return state

    # -- client work ------------------------------------------------------------------------
    def run_task(self, task: ClientTask) -> dict[int, dict]:
        """A phase's client computation, on every client asked (in client order; a pass's clients
        together when training is batched)."""
        clients = range(self.cfg.federated.num_clients) if task.clients is None else task.clients
        if self.public is not None:  # computed once, on public data, standing for every client asked
            self.model.load_trainable(task.params)
            first = int(next(iter(clients)))
            work = ClientWork(first, self.model, self.public[0], self.public[1],
                              round_seed(self.cfg.seed, task.round, first, task.stream), self.cfg.client.batch_size)
            result = self.algorithm.run_task(task, work)
            return {int(k): result for k in clients}
        results = {}
        for group in self.passes([int(k) for k in clients]):
            self.model.load_trainable(task.params)
            works = [ClientWork(k, self.model, self.train_data, self.train_parts[k],
                                round_seed(self.cfg.seed, task.round, k, task.stream), self.cfg.client.batch_size)
                     for k in group]
            results.update(zip(group, self.algorithm.run_tasks(task, works)))
        return results

    def train_client(self, k: int, message: dict, round_index: int) -> tuple[ClientUpdate, float, float]:
        """Client ``k``'s round on ``message``: (what it sends, local seconds, mean loss)."""
        algo, client = self.algorithm, self.client(k)
        start = algo.client_start(message, client)
        with algo.client_training(self.model, message, client) as extra_loss:
            update, result = client_round(self.model, client, start, list(algo.model_part(message)), self.train_data,
                                          self.train_parts[k], self.fed.local_cfg,
                                          round_seed(self.cfg.seed, round_index, k), extra_loss,
                                          batch_order_seed(self.cfg.seed, round_index))
        return self._reply(k, message, update, result, round_index)

    def train_clients(self, ks: list[int], messages: dict[int, dict], round_index: int
                      ) -> dict[int, tuple[ClientUpdate, float, float]]:
        """Clients ``ks`` in shared passes over the backbone (one :meth:`train_client` if alone)."""
        if len(ks) == 1:
            return {ks[0]: self.train_client(ks[0], messages[ks[0]], round_index)}
        algo, clients = self.algorithm, [self.client(k) for k in ks]
        views = [ClientView(self.model, algo.client_start(messages[k], c)) for k, c in zip(ks, clients)]
        with ExitStack() as stack:
            extras = [stack.enter_context(algo.client_training(view, messages[k], c))
                      for k, view, c in zip(ks, views, clients)]
            trained = client_rounds_batched(self.model, clients, views, extras, list(algo.model_part(messages[ks[0]])),
                                            self.train_data, [self.train_parts[k] for k in ks], self.fed.local_cfg,
                                            [round_seed(self.cfg.seed, round_index, k) for k in ks],
                                            batch_order_seed(self.cfg.seed, round_index))
        return {k: self._reply(k, messages[k], update, result, round_index)
                for k, (update, result) in zip(ks, trained)}

    def _reply(self, k: int, message: dict, update: dict, result, round_index: int
               ) -> tuple[ClientUpdate, float, float]:
        algo = self.algorithm
        sent = algo.client_reply(message, update, result.num_steps, self.client(k))
        if self.privacy is not None:  # local DP: noised before it leaves the device
            sent = self.privacy.device_reply(sent, algo.model_part(message), k, round_index)
        algo.acknowledge(k)
        return ClientUpdate(k, sent, result.num_examples, result.num_steps), result.seconds, result.mean_loss

    def passes(self, clients: list[int], shared: bool | None = None) -> list[list[int]]:
        """``clients`` in groups that share passes (``clients_per_pass``; one each unless ``shared``,
        by default whether training is batched)."""
        size = self.cfg.clients_per_pass if (self.batched if shared is None else shared) else 1
        return [clients[i:i + size] for i in range(0, len(clients), size)]

    # -- rounds ----------------------------------------------------------------------------
    def train_round(self, round_index: int) -> dict:
        fed, algo = self.cfg.federated, self.algorithm
        sampled = [int(k) for k in np.sort(self.rng.choice(fed.num_clients, size=fed.clients_per_round,
                                                          replace=False))]
        messages = {k: algo.client_message(k) for k in sampled}
        down = sum(payload.num_bytes(m) for m in messages.values())
        trained = {}
        for group in self.passes(sampled):
            trained.update(self.train_clients(group, messages, round_index))
        updates, slowest, up, losses = [], 0.0, 0, []
        for k in sampled:
            update, seconds, loss = trained[k]
            up += payload.num_bytes(update.params)
            slowest = max(slowest, seconds)
            losses.append(loss)
            updates.append(update)
        self.aggregate(round_index, sampled, updates)
        return {"clients": sampled, "bytes_up": up, "bytes_down": down, "slowest_client_s": slowest,
                "train_loss": float(np.nanmean(losses)), "rejected": [list(r) for r in self.rejected]}

    def aggregate(self, round_index: int, sampled: list[int], updates: list[ClientUpdate]) -> None:
        """Runtime-wide validation of the shared model tensors, then the algorithm's server step."""
        updates, self.rejected = filter_model_updates(updates, self.algorithm.global_shared(), self.validation, log,
                                                     self.algorithm.reply_prefixes)
        if self.privacy is not None:  # one privatised update for the round, even when none was valid
            updates = [self.privacy.aggregate(round_index, updates, self.algorithm.global_shared(),
                                              self.cfg.federated.num_clients, len(sampled))]
        if not updates:
            log.warning("round %d: no valid update; global state unchanged", round_index)
            return
        self.algorithm.aggregate(round_index, sampled, updates)

    def evaluate(self) -> dict:
        """Each client with its own personal tensors plus the global shared ones, on its test and
        validation examples (several clients per pass when batched); predictions pooled over
        clients per split."""
        fed = self.fed
        splits = [("test", fed.eval_data, self.eval_parts), ("validation", fed.val_data, fed.val_parts)]
        pooled = {"test": ([], []), "validation": ([], [])}
        accuracy, losses = {}, {"test": 0.0, "validation": 0.0}
        evaluated = [k for k in range(self.cfg.federated.num_clients) if any(len(parts[k]) for _, _, parts in splits)]
        for group in self.passes(evaluated, self.pooled_eval):
            tensors = {k: self.personal_tensors(k) for k in group}
            for name, data, parts in splits:
                members = [k for k in group if len(parts[k])]
                if not members:
                    continue
                results = self.predict(data, [parts[k] for k in members], [tensors[k] for k in members])
                for k, (p, loss) in zip(members, results):
                    pooled[name][0].append(p)
                    pooled[name][1].append(data.labels[parts[k]])
                    losses[name] += loss
                    if name == "test":
                        accuracy[k] = score("accuracy", p, data.labels[parts[k]])
        row = pooled_metrics(*pooled["test"], losses["test"], self.metric)
        row["client_accuracy"] = [accuracy.get(k) for k in range(self.cfg.federated.num_clients)]
        if pooled["validation"][0]:
            val = pooled_metrics(*pooled["validation"], losses["validation"], self.metric)
            row.update({f"val_{key.removeprefix('eval_')}": value for key, value in val.items()})
        return row

    def personal_tensors(self, k: int) -> dict:
        """The tensors client ``k`` evaluates with: what it would train from on the current message."""
        algo = self.algorithm
        client = self.clients.get(k) or ClientState(params=self.fed.initial)
        tensors = algo.client_start(algo.client_message(k), client)
        if client.algo_state:  # the device kept something of this message
            self.clients[k] = client
        algo.acknowledge(k)
        return tensors

    def predict(self, data, parts: list[np.ndarray], tensors: list[dict]) -> list[tuple[np.ndarray, float]]:
        """Predictions and summed losses of several clients' models (pooled in shared batches if the
        tuning allows)."""
        if self.pooled_eval and len(parts) > 1:
            return predict_batched(self.model, data, parts, to_device(tensors, self.model.device))
        results = []
        for part, own in zip(parts, tensors):
            self.model.load_trainable(own)
            results.append(predict(self.model, data, part))
        return results

    def run(self) -> list[dict]:
        """Run the remaining rounds (all of them, or those after a resumed checkpoint)."""
        cfg, fed = self.cfg, self.cfg.federated
        first = len(self.history)
        start = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        bar = tqdm(range(first, fed.rounds), desc=f"{cfg.describe()} rounds", disable=not cfg.progress,
                   dynamic_ncols=True, initial=first, total=fed.rounds)
        log_rows = None if self.run_dir is None else RoundLog(self.run_dir, cfg.tensorboard, first)
        for t in bar:
            reason = None if self.privacy is None else self.privacy.stop_reason(t)
            if reason is not None:
                log.warning("%s; the state of round %d is saved", reason, t)
                if log_rows is not None and self.history:
                    self.save_checkpoint(t - 1)
                break
            phase_start = time.perf_counter()
            self.algorithm.prepare_round(t, self.run_task)
            phase_s = time.perf_counter() - phase_start
            row = {"round": t, **self.train_round(t), "phase_s": phase_s}
            if self.privacy is not None:
                row["epsilon"] = self.privacy.epsilon()
            if (t + 1) % fed.eval_every == 0 or t == fed.rounds - 1:
                row.update(self.evaluate())
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", loss=f"{row['train_loss']:.3f}",
                                **({"eps": f"{row['epsilon']:.2f}"} if "epsilon" in row else {}))
            row["shared_tensors"] = len(self.algorithm.shared)
            close_row(row, self.history[-1] if self.history else {}, time.perf_counter() - start)
            self.history.append(row)
            if log_rows is not None:
                log_rows.write(row)
                every = cfg.checkpoint.every
                if (every and (t + 1) % every == 0) or t == fed.rounds - 1:
                    self.save_checkpoint(t)
        if log_rows is not None:
            log_rows.close()
        self.algorithm.finish(self.run_task)
        return self.history

    # -- checkpoint and resume ---------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly: the algorithm, every contacted client, RNG, history."""
        return {
            "algorithm": self.algorithm.state(),
            "clients": {str(k): {"params": c.params, "optimizer": c.optimizer, "rounds_trained": c.rounds_trained,
                                 "algo_state": c.algo_state} for k, c in sorted(self.clients.items())},
            "rng": capture_rng_state(self.rng), "history": self.history,
            "privacy": None if self.privacy is None else self.privacy.state(),
        }

    def load_state(self, state: dict) -> None:
        self.algorithm.load_state(state["algorithm"])
        self.clients = {int(k): ClientState(**c) for k, c in state["clients"].items()}
        restore_rng_state(state["rng"], self.rng)
        self.history = list(state["history"])
        if self.privacy is not None:
            self.privacy.load_state(state["privacy"])

    def save_checkpoint(self, round_index: int) -> Path:
        tensors, skeleton = flatten_state(self.state())
        meta = {"state": skeleton, "config": self.cfg.model_dump(mode="json")}
        return save_checkpoint(self.run_dir, round_index, tensors, meta, keep=self.cfg.checkpoint.keep)

    def resume(self) -> int:
        """Load the newest valid checkpoint of ``run_dir``; returns the round it ended.

        A checkpoint written by another method or config is refused: continuing it with this
        one's algorithm would silently mix two experiments.
        """
        round_index, tensors, meta = load_latest_checkpoint(self.run_dir)
        difference = config_difference(meta.get("config", {}), self.cfg.model_dump(mode="json"), RESUMABLE_CHANGES)
        if difference:
            raise ConfigError(f"{self.run_dir}: its checkpoint was written with another config ({difference}); "
                              f"resume with the config it was written with")
        self.load_state(unflatten_state(tensors, meta["state"]))
        # Rows written after that checkpoint belong to rounds that will be run again.
        RoundLog(self.run_dir).rewrite(self.history)
        return round_index

    def summary(self) -> dict:
        majority = float(np.bincount(self.fed.eval_set.labels).max() / len(self.fed.eval_set))
        return run_summary(self.cfg, self.metric, self.history, self.algorithm.summary(), runtime="simulator",
                           splits=self.fed.splits,
                           majority_rate=majority,
                           trainable_parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                           params_per_message=sum(t.numel() for t in self.algorithm.global_shared().values()),
                           privacy=None if self.privacy is None else self.privacy.summary(),
                           compute=self.compute())

    def compute(self) -> dict:
        """Where and how the clients ran: the device, the backbone's precision, and whether they
        shared forward/backward passes (``execution=auto`` decides by device)."""
        return {"device": describe_device(self.model.device), "precision": self.cfg.precision,
                "execution": "batched" if self.batched else "sequential",
                "clients_per_pass": self.cfg.clients_per_pass if self.batched else 1}

    def client_model(self, k: int) -> dict:
        """Client ``k``'s tensors exactly as it would use them: its own, with the global shared ones."""
        client = self.clients[k]
        copy = ClientState(params=dict(client.params), algo_state=dict(client.algo_state))
        return self.algorithm.client_start(self.algorithm.client_message(k), copy)

    def save_final(self) -> None:
        """``global.safetensors``, ``clients/<k>.safetensors`` for every client that trained,
        ``model.json`` (what the tensors belong to) and ``summary.json``; nothing pickled."""
        if self.run_dir is None:
            return
        params = self.algorithm.params
        save_file({k: v.contiguous() for k, v in params.items()}, self.run_dir / "global.safetensors")
        trained = [k for k, c in sorted(self.clients.items()) if c.rounds_trained]
        (self.run_dir / "clients").mkdir(exist_ok=True)
        for k in trained:
            save_file({n: t.contiguous() for n, t in self.client_model(k).items()},
                      self.run_dir / "clients" / f"{k}.safetensors")
        personal = sorted(set(self.model.trainable_names()) - set(self.algorithm.shared))
        write_model_card(self.run_dir, self.cfg, self.fed, trained, personal)
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2))


def pooled_metrics(preds: list[np.ndarray], labels: list[np.ndarray], loss_sum: float, metric: str) -> dict:
    """Accuracy, the run's metric and the mean loss over every client's predictions of one split."""
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    return {"accuracy": score("accuracy", preds, labels), "metric": score(metric, preds, labels),
            "eval_loss": loss_sum / len(labels)}


def check_run_dir(cfg: ExperimentConfig) -> Path:
    """The run directory this config will write to; refuses one that already holds a run."""
    name = cfg.run_name or f"{cfg.describe()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty; choose another run_name "
                              f"or resume it with --resume")
    return run_dir


def run_experiment(cfg: ExperimentConfig, backbone: Backbone | None = None) -> tuple[Simulation, Path]:
    """Validate inputs and build everything first; only then create the run directory and train."""
    run_dir = check_run_dir(cfg)
    sim = Simulation(cfg, None, backbone)
    if cfg.progress:
        layout = sim.fed.train_set.layout
        print(f"metric: {sim.metric} ({'data.metric' if cfg.data.metric else f'task layout {layout}' if layout else 'default'})",
              file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    sim.run_dir = run_dir
    sim.run()
    sim.save_final()
    return sim, run_dir


RESUMABLE_CHANGES = {"federated.rounds", "progress"}


def resume_experiment(run_dir: Path, overrides: list[str] = ()) -> tuple[Simulation, Path]:
    """Continue a run from its newest valid checkpoint (``overrides`` may extend the rounds)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key not in RESUMABLE_CHANGES:
            raise ValueError(f"{key}: cannot change when resuming (only {', '.join(sorted(RESUMABLE_CHANGES))})")
    cfg = load_config(config_path, overrides)
    sim = Simulation(cfg, run_dir)
    sim.resume()
    sim.run()
    sim.save_final()
    save_config(cfg, config_path)
    return sim, run_dir

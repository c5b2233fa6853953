"""The embedded simulator: every client in one process around ONE frozen backbone.

Per client we keep only its trainable tensors, optimiser state and the algorithm's per-device
state (:class:`~fedpeptao.core.federation.ClientState`), and only for clients that have been
contacted; the backbone, the tokenised data and the model object are shared. A client's turn is:
load its tensors into the shared model, train, read them back.

The simulator is a transport: the round (sampling, validation, privacy, the algorithm's step,
evaluation cadence, metrics, checkpoints) is :class:`~fedpeptao.engine.rounds.RoundEngine`'s,
and what a client does on a message is :class:`~fedpeptao.engine.worker.ClientWorker`'s, exactly
as under Flower; here the messages are in-process calls.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedpeptao.algorithms import Algorithm
from fedpeptao.algorithms.base import ClientTask
from fedpeptao.config import ExperimentConfig, load_config, save_config
from fedpeptao.core.federation import QUANTIZE_STREAM, ClientState, round_seed
from fedpeptao.engine.rounds import RESUMABLE_CHANGES, RoundEngine
from fedpeptao.engine.worker import ClientWorker, Job
from fedpeptao.experiment import (build_federation, device_algorithm, make_privacy, public_selection_data,
                                  write_model_card)
from fedpeptao.models.loading import Backbone
from fedpeptao.privacy.secure import (ContributionRefused, SecureAggregationFailed, SecureRound, device_contribution,
                                      secure_summary, sum_of)
from fedpeptao.report.summary import run_summary
from fedpeptao.utils.device import describe_device
from fedpeptao.utils.state import State, join, split

log = logging.getLogger("fedpeptao.server")


class Simulation:
    """Build everything from a config, then :meth:`run` the rounds: the in-process transport
    between one :class:`~fedpeptao.engine.rounds.RoundEngine` and one
    :class:`~fedpeptao.engine.worker.ClientWorker` that serves every client."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, backbone: Backbone | None = None):
        self.cfg = cfg
        self.fed = build_federation(cfg, backbone)
        fed = self.fed
        self.model, self.metric = fed.model, fed.metric
        self.train_data, self.eval_data = fed.train_data, fed.eval_data
        self.train_parts, self.eval_parts = fed.train_parts, fed.eval_parts
        self.privacy = make_privacy(cfg)  # client-level DP and its accountant (None: off)
        self.algorithm: Algorithm = device_algorithm(cfg, fed, self.privacy)
        self.worker = ClientWorker(cfg, fed, self.algorithm, self.privacy, public_selection_data(cfg, fed))
        self.engine = RoundEngine(cfg, self.algorithm, self.privacy, fed.metric, run_dir, checkpoint_dir=run_dir,
                                  extra_state=self._clients_state)
        # A client that was never contacted holds nothing of its own: it starts from `fed.initial`.
        self.clients: dict[int, ClientState] = {}

    @property
    def run_dir(self) -> Path | None:
        return self.engine.run_dir

    @run_dir.setter
    def run_dir(self, path: Path | None) -> None:
        self.engine.run_dir = self.engine.checkpoint_dir = path

    @property
    def history(self) -> list[dict]:
        return self.engine.history

    @property
    def batched(self) -> bool:
        return self.worker.batched

    def client(self, k: int) -> ClientState:
        """Client ``k``'s state, created (sharing the initial tensors) on first contact."""
        state = self.clients.get(k)
        if state is None:
            state = self.clients[k] = ClientState(params=self.fed.initial)
        return state

    # -- one round: the engine's messages delivered in-process --------------------------------
    def run_task(self, task: ClientTask) -> dict[int, dict]:
        """A phase's client computation, on every client asked (in client order)."""
        clients = range(self.cfg.federated.num_clients) if task.clients is None else task.clients
        return self.worker.run_task(task, list(clients))

    def train_round(self, round_index: int, run_task=None) -> dict:
        """Sample, train and aggregate round ``round_index`` (its phases first, given ``run_task``);
        returns the round's row, still open for evaluation."""
        engine = self.engine
        engine.prepare(round_index, run_task)
        sampled = engine.sample(range(self.cfg.federated.num_clients))
        messages = engine.train_messages(sampled)
        replies = self.worker.train(round_index, [Job(k, messages[k], self.client(k)) for k in sampled])
        if self.cfg.privacy.secure_aggregation:
            engine.receive_secure(*self.secure_sum(round_index, messages, replies))
        else:
            engine.receive_training(replies)
        return engine.row

    def secure_sum(self, round_index: int, messages, replies) -> tuple[SecureRound | None, str]:
        """Secure aggregation without the cryptography: each device's contribution formed as a Flower
        node forms it (:func:`~fedpeptao.privacy.secure.device_contribution`), then only their sum
        (:func:`~fedpeptao.privacy.secure.sum_of`, seeded) goes to the engine; ``(None, why)`` when
        fewer than the reconstruction threshold contributed (SecAgg+ would reveal nothing)."""
        settings = self.cfg.privacy
        contributions = []
        for reply in replies:
            try:
                contributions.append(device_contribution(
                    settings, self.privacy, reply.client_id, round_index, reply.sent.model,
                    messages[reply.client_id].model, num_examples=reply.num_examples, num_steps=reply.num_steps,
                    loss=reply.loss, seconds=reply.seconds, extras=reply.sent.extras))
            except ContributionRefused as exc:
                log.warning("round %d: %s; it leaves the round", round_index + 1, exc)
        sampled = sorted(messages)
        threshold = settings.secagg.threshold(len(sampled))
        if len(contributions) < threshold:
            return None, (f"{len(contributions)} of {len(sampled)} clients contributed, reconstruction threshold "
                          f"{threshold}")
        rng = np.random.default_rng(round_seed(self.cfg.seed, round_index, 0, QUANTIZE_STREAM))
        dropped = sorted(set(sampled) - {c.client_id for c in contributions})
        try:
            return sum_of(contributions, settings.secagg, rng, dropped), ""
        except SecureAggregationFailed as exc:
            return None, str(exc)

    def evaluate(self) -> dict:
        """Every client holding test or validation examples, with its own personal tensors plus
        the global shared ones (several clients per pass where the tuning allows); pooled."""
        targets = [k for k in range(self.cfg.federated.num_clients) if self.worker.holds_eval_data(k)]
        jobs = [Job(k, self.engine.message(k), self.clients.get(k) or ClientState(params=self.fed.initial))
                for k in targets]
        replies = self.worker.evaluate(jobs)
        for job in jobs:  # a device that kept something of this message (FedPepTAO's base) keeps it
            if job.client_id not in self.clients and job.state.algo_state:
                self.clients[job.client_id] = job.state
        return self.engine.receive_evaluation(replies)

    def run(self) -> list[dict]:
        """Run the remaining rounds (all of them, or those after a resumed checkpoint)."""
        cfg, fed, engine = self.cfg, self.cfg.federated, self.engine
        engine.start()
        first = engine.first_round
        bar = tqdm(range(first, fed.rounds), desc=f"{cfg.describe()} rounds", disable=not cfg.progress,
                   dynamic_ncols=True, initial=first, total=fed.rounds)
        for t in bar:
            if engine.budget_spent(t):
                break
            row = self.train_round(t, self.run_task)
            if engine.evaluates(t):
                self.evaluate()
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", loss=f"{row['train_loss']:.3f}",
                                **({"eps": f"{row['epsilon']:.2f}"} if "epsilon" in row else {}))
            engine.close_round()
        engine.finish(self.run_task)
        return self.history

    # -- checkpoint and resume ---------------------------------------------------------------
    def _clients_state(self) -> dict[str, State]:
        """The simulator's section of a checkpoint: every contacted client's state, under
        ``clients/<k>/`` (a tensor two clients share is stored once)."""
        return {"clients": join({str(k): c.state() for k, c in sorted(self.clients.items())})}

    def save_checkpoint(self, round_number: int) -> Path | None:
        return self.engine.save_checkpoint(round_number)

    def resume(self) -> int:
        """Load the newest valid checkpoint of ``run_dir`` (same config); returns the round it
        ended with (from 1)."""
        sections = self.engine.read_checkpoint()
        self.engine.load_state(sections)
        self.clients = {int(k): ClientState.from_state(*s) for k, s in split(sections["clients"]).items()}
        return self.history[-1]["round"]

    def summary(self) -> dict:
        majority = float(np.bincount(self.fed.eval_set.labels).max() / len(self.fed.eval_set))
        return run_summary(self.cfg, self.metric, self.history, self.algorithm.summary(), runtime="simulator",
                           splits=self.fed.splits,
                           majority_rate=majority,
                           trainable_parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                           params_per_message=sum(t.numel() for t in self.algorithm.global_shared().values()),
                           privacy=None if self.privacy is None else self.privacy.summary(),
                           compute=self.compute(), **self._secure_summary())

    def _secure_summary(self) -> dict:
        if not self.cfg.privacy.secure_aggregation:
            return {}
        return {"secure_aggregation": secure_summary(self.cfg, self.history, "simulator")}

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

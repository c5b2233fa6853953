"""The embedded simulator: every client in one process around ONE frozen backbone.

Per client we keep only its trainable tensors and optimiser state (:class:`ClientState`); the
backbone, the tokenised data and the model object are shared. A client's turn is: load its
tensors into the shared model, train, read them back. Memory therefore grows with the prompt
size per client, not with the model size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedpeptao.config import ExperimentConfig, load_config, save_config
from fedpeptao.experiment import build_federation, server_step_config
from fedpeptao.core import payload
from fedpeptao.core.client import predict
from fedpeptao.core.federation import HESSIAN_STREAM, SCORE_STREAM, Aggregator, ClientState, client_round, round_seed
from fedpeptao.core.hessian import estimate_ratio
from fedpeptao.core.metrics import score
from fedpeptao.core.scoring import combine_scores, rank_layers, select_layers
from fedpeptao.core.selection import client_hvp, client_layer_scores
from fedpeptao.core.server import ClientUpdate, ServerState
from fedpeptao.core.validation import ValidationPolicy
from fedpeptao.models.registry import Backbone
from fedpeptao.utils.checkpoint import (capture_rng_state, flatten_state, load_latest_checkpoint, restore_rng_state,
                                        save_checkpoint, unflatten_state)
from fedpeptao.utils.round_log import RoundLog


@dataclass
class Selection:
    scores: list[float]
    ranking: list[int]
    ratio: float
    layers: list[int]


class Simulation:
    """Build everything from a config, then :meth:`run` the rounds."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path | None = None, backbone: Backbone | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        built = build_federation(cfg, backbone)
        self.backbone, self.head, self.model = built.backbone, built.head, built.model
        self.train_set, self.eval_set, self.metric = built.train_set, built.eval_set, built.metric
        self.train_data, self.eval_data = built.train_data, built.eval_data
        self.train_parts, self.eval_parts = built.train_parts, built.eval_parts
        fed = cfg.federated
        initial = built.initial
        # Clients start from the same tensors; a client gets its own copy when it first trains.
        self.clients = [ClientState(params=initial) for _ in range(fed.num_clients)]
        srv = cfg.server
        self.aggregator = Aggregator(
            params=dict(initial), shared=self.model.trainable_names(),
            validation=ValidationPolicy(max_norm=srv.max_update_norm) if srv.validate_updates else None,
            averaging=srv.aggregation, trim_ratio=srv.trim_ratio)
        self.local_cfg = built.local_cfg
        self.selection: Selection | None = None
        self.rng = np.random.default_rng(cfg.seed)
        self.history: list[dict] = []
        self.scores: list[float] | None = None
        self.ranking: list[int] | None = None

    # -- FedPepTAO layer selection ---------------------------------------------------------
    def score_layers(self) -> tuple[list[float], list[int]]:
        """Every client scores the layers of the pretrained model with fresh prompts; size-weighted."""
        self.model.load_trainable(self.aggregator.params)
        per_client = [client_layer_scores(self.model, self.train_data, part, self.cfg.selection.score_batch_size,
                                          round_seed(self.cfg.seed, 0, k, SCORE_STREAM))
                      for k, part in enumerate(self.train_parts) if len(part) >= 2]
        sizes = [len(part) for part in self.train_parts if len(part) >= 2]
        combined = combine_scores(per_client, sizes)
        return combined.tolist(), rank_layers(combined)

    def estimate_ratio(self) -> float:
        """Hessian eigen-density of a few clients' losses at the warmed-up global prompts."""
        sel = self.cfg.selection
        self.model.load_trainable(self.aggregator.params)
        chosen = self.rng.choice(len(self.train_parts), size=min(sel.hessian_clients, len(self.train_parts)), replace=False)
        hvps = [client_hvp(self.model, self.train_data, self.train_parts[k], 32, round_seed(self.cfg.seed, 0, int(k), HESSIAN_STREAM))
                for k in chosen]
        return estimate_ratio(hvps, num_iters=sel.lanczos_iters, seed=self.cfg.seed)

    def select(self, scores: list[float], ranking: list[int]) -> Selection:
        sel = self.cfg.selection
        num_layers = len(ranking)
        if sel.layers is not None:
            bad = [i for i in sel.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"selection.layers: {bad} outside 0..{num_layers - 1}")
            layers, ratio = sorted(set(sel.layers)), len(set(sel.layers)) / num_layers
        else:
            ratio = self.estimate_ratio() if sel.ratio == "auto" else float(sel.ratio)
            layers = select_layers(ranking, ratio)
        return Selection(scores, ranking, ratio, layers)

    def _switch_to_fedpeptao(self) -> None:
        self.selection = self.select(self.scores, self.ranking)
        shared = self.model.layer_names(self.selection.layers)
        if self.cfg.selection.share_head:
            shared += self.model.head_names()
        # Every device continues from the warmed-up global tensors; from now on the unselected
        # layers are personal and never leave the device.
        warmed = dict(self.aggregator.params)
        for client in self.clients:
            client.params = warmed
        self.aggregator.use_fedpeptao(shared, server_step_config(self.cfg))
        if self.run_dir is not None:
            (self.run_dir / "selection.json").write_text(json.dumps(self.selection.__dict__, indent=2))

    def switch_round(self) -> int:
        """The round FedPepTAO's selective step starts: after the warm-up when the ratio is estimated."""
        if self.cfg.algorithm != "fedpeptao":
            return -1
        sel = self.cfg.selection
        return sel.warmup_rounds if sel.ratio == "auto" and sel.layers is None else 0

    # -- rounds ----------------------------------------------------------------------------
    def train_round(self, round_index: int) -> dict:
        fed = self.cfg.federated
        sampled = np.sort(self.rng.choice(fed.num_clients, size=fed.clients_per_round, replace=False))
        global_shared = self.aggregator.broadcast()
        down = payload.num_bytes(global_shared)
        updates, slowest, up, losses = [], 0.0, 0, []
        for k in sampled:
            update, result = client_round(self.model, self.clients[k], global_shared, self.train_data,
                                          self.train_parts[k], self.local_cfg, round_seed(self.cfg.seed, round_index, int(k)))
            up += payload.num_bytes(update)
            slowest = max(slowest, result.seconds)
            losses.append(result.mean_loss)
            updates.append(ClientUpdate(int(k), update, result.num_examples, result.num_steps))
        self.aggregator.aggregate(updates)
        return {"clients": sampled.tolist(), "bytes_up": up, "bytes_down": down * len(sampled),
                "slowest_client_s": slowest, "train_loss": float(np.nanmean(losses)),
                "rejected": [list(r) for r in self.aggregator.rejected]}

    def evaluate(self) -> dict:
        """Each client with its own personal tensors plus the global shared ones; predictions pooled."""
        shared = self.aggregator.broadcast()
        preds, labels, per_client, loss = [], [], [], 0.0
        for client, part in zip(self.clients, self.eval_parts):
            if len(part) == 0:
                per_client.append(None)
                continue
            self.model.load_trainable({**client.params, **shared})
            p, l = predict(self.model, self.eval_data, part)
            preds.append(p)
            labels.append(self.eval_data.labels[part])
            per_client.append(score("accuracy", p, labels[-1]))
            loss += l
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        return {"accuracy": score("accuracy", preds, labels), "metric": score(self.metric, preds, labels),
                "eval_loss": loss / len(labels), "client_accuracy": per_client}

    def run(self) -> list[dict]:
        """Run the remaining rounds (all of them, or those after a resumed checkpoint)."""
        cfg, fed = self.cfg, self.cfg.federated
        first = len(self.history)
        last = self.history[-1] if self.history else {}
        train_time, total_bytes = last.get("train_time_s", 0.0), last.get("total_bytes", 0)
        start = time.perf_counter() - last.get("elapsed_s", 0.0)
        if cfg.algorithm == "fedpeptao" and self.scores is None:
            self.scores, self.ranking = self.score_layers()
        switch = self.switch_round()
        bar = tqdm(range(first, fed.rounds), desc=f"{cfg.algorithm} rounds", disable=not cfg.progress,
                   dynamic_ncols=True, initial=first, total=fed.rounds)
        log = None if self.run_dir is None else RoundLog(self.run_dir, cfg.tensorboard, first)
        for t in bar:
            if t == switch:
                self._switch_to_fedpeptao()
            row = {"round": t, **self.train_round(t)}
            train_time += row["slowest_client_s"]
            total_bytes += row["bytes_up"] + row["bytes_down"]
            if (t + 1) % fed.eval_every == 0 or t == fed.rounds - 1:
                row.update(self.evaluate())
                bar.set_postfix(acc=f"{row['accuracy']:.3f}", loss=f"{row['train_loss']:.3f}")
            row.update({"shared_tensors": len(self.aggregator.shared), "train_time_s": train_time,
                        "total_bytes": total_bytes, "elapsed_s": time.perf_counter() - start})
            self.history.append(row)
            if log is not None:
                log.write(row)
                every = cfg.checkpoint.every
                if (every and (t + 1) % every == 0) or t == fed.rounds - 1:
                    self.save_checkpoint(t)
        if log is not None:
            log.close()
        if cfg.algorithm == "fedpeptao" and self.selection is None:  # rounds ended inside the warm-up
            self._switch_to_fedpeptao()
        return self.history

    # -- checkpoint and resume ---------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue exactly: server, every client, selection, RNG, history."""
        agg = self.aggregator
        return {
            "aggregator": {"params": agg.params, "shared": agg.shared, "algorithm": agg.algorithm,
                           "server_state": None if agg.server_state is None else agg.server_state.to_tensors()},
            "clients": [{"params": c.params, "optimizer": c.optimizer, "rounds_trained": c.rounds_trained}
                        for c in self.clients],
            "selection": None if self.selection is None else self.selection.__dict__,
            "scores": self.scores, "ranking": self.ranking,
            "rng": capture_rng_state(self.rng), "history": self.history,
        }

    def load_state(self, state: dict) -> None:
        agg = state["aggregator"]
        self.aggregator.params = agg["params"]
        self.aggregator.shared = list(agg["shared"])
        if agg["algorithm"] == "fedpeptao":
            self.aggregator.algorithm = "fedpeptao"
            self.aggregator.step_config = server_step_config(self.cfg)
            self.aggregator.server_state = ServerState.from_tensors(agg["server_state"])
        self.clients = [ClientState(**c) for c in state["clients"]]
        self.selection = None if state["selection"] is None else Selection(**state["selection"])
        self.scores, self.ranking = state["scores"], state["ranking"]
        restore_rng_state(state["rng"], self.rng)
        self.history = list(state["history"])

    def save_checkpoint(self, round_index: int) -> Path:
        tensors, skeleton = flatten_state(self.state())
        meta = {"state": skeleton, "config": self.cfg.model_dump(mode="json")}
        return save_checkpoint(self.run_dir, round_index, tensors, meta, keep=self.cfg.checkpoint.keep)

    def resume(self) -> int:
        """Load the newest valid checkpoint of ``run_dir``; returns the round it ended."""
        round_index, tensors, meta = load_latest_checkpoint(self.run_dir)
        self.load_state(unflatten_state(tensors, meta["state"]))
        # Rows written after that checkpoint belong to rounds that will be run again.
        RoundLog(self.run_dir).rewrite(self.history)
        return round_index

    def summary(self) -> dict:
        evaluated = [r for r in self.history if "accuracy" in r]
        best = max(evaluated, key=lambda r: r["metric"])
        target = self.cfg.federated.target_accuracy
        reached = next((r for r in evaluated if target is not None and r["metric"] >= target), None)
        majority = float(np.bincount(self.eval_set.labels).max() / len(self.eval_set))
        return {
            "algorithm": self.cfg.algorithm, "model": self.cfg.model.name, "task": self.cfg.data.task,
            "metric": self.metric, "final_metric": evaluated[-1]["metric"], "final_accuracy": evaluated[-1]["accuracy"],
            "best_metric": best["metric"], "best_round": best["round"], "majority_rate": majority,
            "target": target, "rounds_to_target": None if reached is None else reached["round"] + 1,
            "seconds_to_target": None if reached is None else reached["train_time_s"],
            "total_mb": self.history[-1]["total_bytes"] / 1e6, "elapsed_s": self.history[-1]["elapsed_s"],
            "shared_layers": None if self.selection is None else self.selection.layers,
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }

    def save_final(self) -> None:
        if self.run_dir is None:
            return
        save_file({k: v.contiguous() for k, v in self.aggregator.params.items()}, self.run_dir / "global.safetensors")
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2))


def check_run_dir(cfg: ExperimentConfig) -> Path:
    """The run directory this config will write to; refuses one that already holds a run."""
    name = cfg.run_name or f"{cfg.algorithm}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty; choose another run_name "
                              f"or resume it with --resume")
    return run_dir


def run_experiment(cfg: ExperimentConfig, backbone: Backbone | None = None) -> tuple[Simulation, Path]:
    """Validate inputs and build everything first; only then create the run directory and train."""
    run_dir = check_run_dir(cfg)
    sim = Simulation(cfg, None, backbone)
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

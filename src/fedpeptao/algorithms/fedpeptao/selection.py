"""FedPepTAO's layer selection (SPEC section 2): which layers travel, and when that is decided.

A component the algorithm composes and drives from its ``prepare_round``; it owns the policy:

1. **scores** (before round 0): every client with >= 2 examples scores the layers of the
   pretrained model with fresh tuning tensors (task ``score_layers``); the server combines them
   by data size (under central DP: a privatised mean of normalised scores) and ranks the layers.
2. **warm-up** (rounds ``0 .. warmup_rounds - 1``, counted inside ``federated.rounds`` as the
   reference does): nothing is decided, every trainable tensor travels. Only with
   ``ratio = "auto"``; a fixed ratio or an explicit layer list decides at round 0.
3. **Hessian ratio** (at the switch): the clients sampled in the last warm-up round (at most
   ``hessian_clients`` of them) estimate the share ratio from their loss Hessian's eigen-density
   at the warmed-up tensors (task ``hessian_ratio``; the reference's choice).
4. **switch**: the top ``ceil(r L)`` scored layers (and the head, ``share_head``) travel from
   then on. A run that ends inside its warm-up still decides, after its last round.

The layers are the tuning's per-layer groups (deep prompts' key/values, LoRA's or adapters'
matrices), so FedPepTAO on any tuning that has them takes this same path. The maths stays in
``core``: the scores (:mod:`fedpeptao.core.scoring`), the Hessian density
(:mod:`fedpeptao.core.hessian`) and the device-side measurements that feed them a client's batch
(:mod:`fedpeptao.core.selection`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedpeptao.algorithms.base import ClientTask, ClientWork, RunTask, ServerContext
from fedpeptao.algorithms.fedpeptao.settings import FedPepTAOSettings
from fedpeptao.core.federation import HESSIAN_STREAM, SCORE_STREAM
from fedpeptao.core.hessian import ratio_of_runs, slq_runs_lockstep
from fedpeptao.core.scoring import combine_scores, rank_layers, select_layers
from fedpeptao.core.selection import client_hvp, lanczos_device, layer_scores_of

SCORE_TASK, HESSIAN_TASK = "score_layers", "hessian_ratio"


def private_scores(scores: Sequence[float]) -> list[float]:
    """A client's layer scores as released under DP: centred and scaled to unit L2 norm, so that
    one client's vector is bounded (its ranking of the layers unchanged) whatever the scale of
    the eigenvalue terms."""
    values = torch.tensor(list(scores), dtype=torch.float64)
    values = values - values.mean()
    norm = float(values.norm())
    return (values / norm if norm > 0 else values).tolist()


class LayerSelection:
    """Scores, warm-up, Hessian ratio and switch, with their state (checkpointed with the algorithm)."""

    def __init__(self, settings: FedPepTAOSettings, ctx: ServerContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.scores: list[float] | None = None
        self.ranking: list[int] | None = None
        self.choice: dict[str, Any] | None = None  # scores, ranking, ratio and layers, once decided
        self.last_sampled: list[int] = []  # the clients of the last aggregated round

    # -- server ---------------------------------------------------------------------------
    def prepare(self, round_index: int, run_task: RunTask, params: Mapping[str, Tensor]) -> bool:
        """Before round ``round_index``, at the global tensors ``params``: the layers scored (once);
        True when this is the switch, the layers now chosen (``round_index = rounds``: after the
        last round, so a run that ended inside its warm-up decides too)."""
        if self.scores is None:
            self._score(run_task, params)
        if self.choice is not None or round_index < min(self.settings.switch_round(), self.ctx.rounds):
            return False
        ratio, layers = self._layers(run_task, params)
        self.choice = {"scores": self.scores, "ranking": self.ranking, "ratio": ratio, "layers": layers}
        return True

    def record(self, sampled: Sequence[int]) -> None:
        """The clients of the round just aggregated (the Hessian ratio is the last warm-up round's)."""
        self.last_sampled = [int(k) for k in sampled]

    def shared_names(self) -> list[str]:
        """The tensors that travel once the layers are chosen: their groups, and the head (``share_head``)."""
        names = [n for i in self.choice["layers"] for n in self.ctx.layer_groups.get(i, [])]
        return names + self.ctx.head_names if self.settings.share_head else names

    def _score(self, run_task: RunTask, params: Mapping[str, Tensor]) -> None:
        results = run_task(ClientTask(SCORE_TASK, None, dict(params), 0, SCORE_STREAM))
        scored = [(k, r) for k, r in sorted(results.items()) if "scores" in r]
        if not scored:
            raise RuntimeError("no client could score layers (each needs at least 2 training examples)")
        if self.ctx.private_mean is not None:
            combined = self.ctx.private_mean([private_scores(r["scores"]) for _, r in scored], 1.0, len(results))
            combined = torch.tensor(combined, dtype=torch.float64)
        else:
            combined = combine_scores([torch.tensor(list(r["scores"]), dtype=torch.float64) for _, r in scored],
                                      [int(r["num_train"]) for _, r in scored])
        self.scores, self.ranking = combined.tolist(), rank_layers(combined)

    def _layers(self, run_task: RunTask, params: Mapping[str, Tensor]) -> tuple[float, list[int]]:
        s, num_layers = self.settings, len(self.ranking)
        if s.layers is not None:
            bad = [i for i in s.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"method.layers: {bad} outside 0..{num_layers - 1}")
            return len(set(s.layers)) / num_layers, sorted(set(s.layers))
        ratio = self._estimate_ratio(run_task, params) if s.ratio == "auto" else float(s.ratio)
        return ratio, select_layers(self.ranking, ratio)

    def _estimate_ratio(self, run_task: RunTask, params: Mapping[str, Tensor]) -> float:
        """The last warm-up round's clients' Hessian ratios at the warmed-up tensors, averaged."""
        chosen = (self.last_sampled or list(range(self.ctx.num_clients)))[:self.settings.hessian_clients]
        task = ClientTask(HESSIAN_TASK, chosen, dict(params), 0, HESSIAN_STREAM,
                          {k: {"probe_seed": self.ctx.seed + i} for i, k in enumerate(chosen)})
        results = run_task(task)
        values = [float(results[k]["ratio"]) for k in chosen if "ratio" in results.get(k, {})]
        if not values:
            raise RuntimeError("no client returned a Hessian ratio estimate")
        if self.ctx.private_mean is not None:  # each ratio lies in [0, 1]: bound 1
            mean = self.ctx.private_mean([[min(max(v, 0.0), 1.0)] for v in values], 1.0, len(chosen))
            return float(min(max(mean[0], 0.0), 1.0))
        return sum(values) / len(values)

    def state(self) -> dict[str, Any]:
        """JSON only (scores, ranking, choice, last clients): the algorithm's meta carries it."""
        return {"scores": self.scores, "ranking": self.ranking, "choice": self.choice,
                "last_sampled": self.last_sampled}

    def load_state(self, meta: Mapping[str, Any]) -> None:
        self.scores, self.ranking, self.choice = meta["scores"], meta["ranking"], meta["choice"]
        self.last_sampled = list(meta["last_sampled"])

    # -- device ---------------------------------------------------------------------------
    def run_tasks(self, task: ClientTask, works: Sequence[ClientWork]) -> list[dict[str, Any]]:
        """One pass's clients, all on the same tensors (``task.params``): layer scoring in one
        forward pass, and the Hessian ratio with every Lanczos iteration's products in one
        double-backward pass (each client's Hessian is its own block of one batched loss)."""
        first = works[0]
        if task.kind == HESSIAN_TASK:
            s = self.settings
            hvps, dim = client_hvp(first.model, first.data, [w.indices for w in works],
                                   s.hessian_batch_size or first.batch_size, [w.seed for w in works],
                                   self._hessian_names())
            runs = slq_runs_lockstep(hvps, dim, s.lanczos_iters, s.hessian_probes,
                                     [self._probe_seed(task, w) for w in works], device=lanczos_device(first.model))
            return [{"ratio": float(ratio_of_runs(own))} for own in runs]
        if task.kind != SCORE_TASK:
            raise ValueError(f"fedpeptao asks clients for no task {task.kind!r}")
        scorable = [w for w in works if len(w.indices) >= 2]  # a client with fewer cannot score
        scores = iter(layer_scores_of(first.model, first.data, [w.indices for w in scorable],
                                      self.settings.score_batch_size, [w.seed for w in scorable]) if scorable else [])
        return [{"scores": next(scores).tolist(), "num_train": len(w.indices)} if len(w.indices) >= 2 else {}
                for w in works]

    def _hessian_names(self) -> list[str]:
        """The tensors the Hessian is taken over: every per-layer group of the tuning."""
        return [n for i in sorted(self.ctx.layer_groups) for n in self.ctx.layer_groups[i]]

    def _probe_seed(self, task: ClientTask, work: ClientWork) -> int:
        return int(task.options.get(work.client_id, {}).get("probe_seed", self.ctx.seed))

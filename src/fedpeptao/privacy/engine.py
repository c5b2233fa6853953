"""Client-level DP for a run: what the server does with the updates, what a device does with its
reply, and the ledger, in one object both runtimes hold (:class:`ClientPrivacy`).

Central mode (trusted server): each validated update's change ``y_k - x`` is clipped to ``C``;
the server adds ``N(0, (z C)^2)`` to the sum and divides by the *expected* number of clients
(``federated.clients_per_round``, public), as DP-FedAvg does. Local mode: the device clips and
noises its own change before it leaves (:meth:`ClientPrivacy.device_reply`); the server only
averages. Either way the algorithm receives no client's update, only the population's: a
:class:`~fedpeptao.core.aggregation.PopulationUpdate`, ``x + privatised mean change`` with the
rounded mean of the clients' step counts (treated as public, see docs/privacy.md), so its server
step (FedAvg, FedOpt, FedPepTAO's control variates and momentum) is post-processing of
privatised quantities only.

Under secure aggregation (:mod:`fedpeptao.privacy.secure`) the server never sees an update, so
each device clips its own (:meth:`ClientPrivacy.device_share`): ``central`` then adds the noise to
the sum the server learns; ``distributed`` has every device add its share ``N(0, (z C)^2 / n)``
(``n = federated.clients_per_round``), so the sum of ``m`` surviving shares has std
``z C sqrt(m / n)``, and the ledger records that multiplier, ``z sqrt(m / n)``
(:meth:`ClientPrivacy.aggregate_sum`).

Adaptive clipping (Andrew et al., 2021): the server also counts the updates that were not
clipped, noised with std ``sigma_b``; the clip moves as ``C <- C exp(-eta (b - gamma))``. The two
releases together cost what one Gaussian of multiplier ``z`` does when the update noise uses
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedpeptao.core.aggregation import ClientUpdate, PopulationUpdate
from fedpeptao.core.federation import COUNT_STREAM, PRIVACY_STREAM, round_seed
from fedpeptao.core.payload import Message
from fedpeptao.privacy.accountant import ACCOUNTANT, PrivacyAccountant, solve_noise_multiplier
from fedpeptao.privacy.mechanism import Tensors, change, clip, gaussian_noise, noisy_sum, privatise_locally
from fedpeptao.privacy.settings import PrivacySettings

RELEASE_ROUND = 1_000_000  # seeds of selection releases: apart from every round's


def resolve_noise_multiplier(settings: PrivacySettings, num_clients: int, per_round: int, rounds: int,
                             releases: int) -> float:
    """``privacy.noise_multiplier``, or the one solved for ``privacy.target_epsilon`` over the run."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    return solve_noise_multiplier(settings.mode, num_clients, per_round, rounds, releases,
                                  float(settings.target_epsilon), settings.resolved_delta(num_clients))


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """Andrew et al.'s ``z_delta``; ``ValueError`` naming the key when ``sigma_b`` is too small."""
    if z == 0:
        return 0.0
    if 2 * count_stddev <= z:
        raise ValueError(f"privacy.clipped_count_stddev: adaptive clipping needs it above noise_multiplier / 2 "
                         f"({z / 2:.3g}), got {count_stddev:.3g}")
    return (z ** -2 - (2 * count_stddev) ** -2) ** -0.5


class ClientPrivacy:
    """The run's DP mechanism and accountant (server side) and the device's noise (local mode)."""

    def __init__(self, settings: PrivacySettings, num_clients: int, per_round: int, seed: int,
                 noise_multiplier: float) -> None:
        self.settings = settings
        self.num_clients, self.per_round, self.seed = num_clients, per_round, seed
        self.noise_multiplier = noise_multiplier
        self.clip_norm = settings.initial_clip_norm if settings.adaptive else float(settings.clip_norm)
        self.count_stddev = settings.resolved_count_stddev(per_round)
        self.update_multiplier = self._update_multiplier()
        self.accountant = PrivacyAccountant(settings.resolved_delta(num_clients))
        self.releases = 0

    @property
    def mode(self) -> str:
        return self.settings.mode

    def _update_multiplier(self) -> float:
        """The noise multiplier of the update sum (smaller under adaptive clipping, see above)."""
        if self.settings.adaptive:
            return update_noise_multiplier(self.noise_multiplier, self.count_stddev)
        return self.noise_multiplier

    # -- budget ----------------------------------------------------------------------------
    def round_event(self, population: int, sample: int, multiplier: float | None = None
                    ) -> tuple[str, int, int, float]:
        """A round's ledger event; ``multiplier``: the noise actually present, when not ``z``."""
        kind = "round" if self.settings.sampled_rounds else "local"
        z = self.noise_multiplier if multiplier is None else float(multiplier)
        return kind, int(population), int(min(sample, population)), z

    def distributed_multiplier(self, contributors: int) -> float:
        """The multiplier of the noise in a distributed round's sum when ``contributors`` of the
        ``per_round`` expected devices added their share: ``z sqrt(m / n)``."""
        return self.noise_multiplier * math.sqrt(min(contributors, self.per_round) / self.per_round)

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    def would_exceed(self, population: int, sample: int) -> float | None:
        """The epsilon after one more round, when that passes ``privacy.target_epsilon`` (else None)."""
        target = self.settings.target_epsilon
        if target is None:
            return None
        multiplier = None
        if self.mode == "distributed":  # the worst case: only the reconstruction threshold's shares survive
            multiplier = self.distributed_multiplier(self.settings.secagg.threshold(min(sample, self.per_round)))
        after = self.accountant.epsilon([self.round_event(population, sample, multiplier)])
        return after if after > target else None

    def stop_reason(self, round_index: int) -> str | None:
        """Why round ``round_index`` must not run (it would pass the target epsilon); None: it may."""
        after = self.would_exceed(self.num_clients, self.per_round)
        if after is None:
            return None
        return (f"stopping before round {round_index + 1}: it would take epsilon to {after:.3f}, past "
                f"privacy.target_epsilon={self.settings.target_epsilon:g}")

    # -- server ----------------------------------------------------------------------------
    def aggregate(self, round_index: int, updates: Sequence[ClientUpdate], reference: Mapping[str, Tensor],
                  population: int, sample: int) -> PopulationUpdate:
        """The round's privatised mean (and the round recorded in the ledger)."""
        self.accountant.record(self.round_event(population, sample))
        changes = [change(u.params, reference) for u in updates]
        if self.mode == "local":  # already private: average what arrived
            mean = {n: sum(c[n] for c in changes) / max(1, len(changes)) for n in reference}
            count = len(changes)
        else:
            clipped = [clip(c, self.clip_norm) for c in changes]
            like = {n: r.to(torch.promote_types(r.dtype, torch.float32)) for n, r in reference.items()}
            total = noisy_sum([c for c, _ in clipped], like, self.update_multiplier * self.clip_norm,
                              round_seed(self.seed, round_index, self.num_clients, PRIVACY_STREAM))
            mean = {n: t / self.per_round for n, t in total.items()}
            count = self.per_round
            if self.settings.adaptive:
                self._adapt([norm for _, norm in clipped], round_index)
        params = {n: (ref + mean[n].to(ref.device)).to(ref.dtype) for n, ref in reference.items()}
        steps = max(1, round(float(np.mean([u.num_steps for u in updates])))) if updates else 1
        return PopulationUpdate(params, count, steps)

    def aggregate_sum(self, round_index: int, total: Mapping[str, Tensor], contributors: int,
                      reference: Mapping[str, Tensor], population: int, sample: int, num_steps: int
                      ) -> PopulationUpdate:
        """Secure aggregation: the round's privatised mean from the sum of ``contributors`` device
        contributions (each already clipped by :meth:`device_share`, or noised locally), never one of
        them; the round recorded with the noise actually in it."""
        multiplier = self.distributed_multiplier(contributors) if self.mode == "distributed" else None
        self.accountant.record(self.round_event(population, sample, multiplier))
        like = {n: r.to(torch.promote_types(r.dtype, torch.float64)) for n, r in reference.items()}
        if self.mode == "local":  # already private: average what arrived
            mean = {n: total[n].to(like[n]) / max(1, contributors) for n in reference}
            count = contributors
        else:
            if self.mode == "central":  # the server adds the noise to the sum it learned
                noise = gaussian_noise(like, self.update_multiplier * self.clip_norm,
                                       round_seed(self.seed, round_index, self.num_clients, PRIVACY_STREAM))
                summed = {n: total[n].to(like[n]) + noise[n] for n in reference}
            else:  # distributed: the devices' shares are in the sum already
                summed = {n: total[n].to(like[n]) for n in reference}
            mean = {n: t / self.per_round for n, t in summed.items()}
            count = self.per_round
        params = {n: (ref.to(mean[n].dtype) + mean[n].to(ref.device)).to(ref.dtype) for n, ref in reference.items()}
        return PopulationUpdate(params, count, max(1, int(num_steps)))

    def _adapt(self, norms: Sequence[float], round_index: int) -> None:
        unclipped = sum(1.0 for n in norms if n <= self.clip_norm)
        rng = np.random.default_rng(round_seed(self.seed, round_index, self.num_clients, COUNT_STREAM))
        share = (unclipped + rng.normal(0.0, self.count_stddev)) / self.per_round
        self.clip_norm *= math.exp(-self.settings.clip_lr * (share - self.settings.target_quantile))

    def private_mean(self, vectors: Sequence[np.ndarray], bound: float, count: int) -> np.ndarray:
        """A selection release (central mode): every vector clipped to ``bound`` in L2, summed,
        ``N(0, (z bound)^2)`` added, divided by ``count`` (the clients asked); counted in the ledger."""
        self.accountant.record(("release", count, count, self.noise_multiplier))
        total = np.zeros(len(vectors[0]) if vectors else 0, dtype=np.float64)
        for v in vectors:
            v = np.asarray(v, dtype=np.float64)
            norm = float(np.linalg.norm(v))
            total = total + (v * min(1.0, bound / norm) if norm > 0 else v)
        rng = np.random.default_rng(round_seed(self.seed, RELEASE_ROUND + self.releases, self.num_clients,
                                               PRIVACY_STREAM))
        self.releases += 1
        return (total + rng.normal(0.0, self.noise_multiplier * bound, size=total.shape)) / max(1, count)

    # -- device ----------------------------------------------------------------------------
    def device_share(self, delta: Mapping[str, Tensor], client_id: int, round_index: int) -> Tensors:
        """Under secure aggregation, what a device contributes of its change ``delta``: ``central``:
        clipped to ``C``; ``distributed``: clipped, plus its share ``N(0, (z C)^2 / n)`` of the
        noise (seeded per client and round, as local DP's); ``local``: unchanged (the worker noised it)."""
        if self.mode == "local":
            return dict(delta)
        clipped, _ = clip(delta, self.clip_norm)
        if self.mode != "distributed":
            return clipped
        std = self.update_multiplier * self.clip_norm / math.sqrt(self.per_round)
        noise = gaussian_noise(clipped, std, round_seed(self.seed, round_index, client_id, PRIVACY_STREAM))
        return {n: clipped[n] + noise[n] for n in clipped}

    def device_reply(self, reply: Message, received: Mapping[str, Tensor], client_id: int, round_index: int
                     ) -> Message:
        """Local mode: the reply's model tensors clipped and noised on the device, around the
        ``received`` ones (else the reply unchanged)."""
        if self.mode != "local":
            return reply
        private = privatise_locally(reply.model, received, self.clip_norm, self.noise_multiplier,
                                    round_seed(self.seed, round_index, client_id, PRIVACY_STREAM))
        return Message(private, reply.extras)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"clip_norm": self.clip_norm, "releases": self.releases, "noise_multiplier": self.noise_multiplier,
                "accountant": self.accountant.state()}

    def load_state(self, state: Mapping) -> None:
        self.clip_norm, self.releases = float(state["clip_norm"]), int(state["releases"])
        self.noise_multiplier = float(state["noise_multiplier"])  # as solved for the run, not its extension
        self.update_multiplier = self._update_multiplier()
        self.accountant.load_state(state["accountant"])

    def summary(self) -> dict:
        s = self.settings
        return {"mode": s.mode, "epsilon": self.epsilon(), "delta": self.accountant.delta,
                "noise_multiplier": self.noise_multiplier, "clip_norm": "adaptive" if s.adaptive else s.clip_norm,
                "final_clip_norm": self.clip_norm, "selection": s.selection, "accountant": ACCOUNTANT,
                "rounds_accounted": sum(1 for e in self.accountant.events if e[0] != "release"),
                "selection_releases": self.releases}

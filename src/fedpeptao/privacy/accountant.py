"""Client-level privacy accounting with Google's ``dp-accounting`` (Renyi DP), nothing hand-written.

How the runtimes really sample: each round draws ``m`` of the ``N`` online clients uniformly
*without replacement* (the same stream in the simulator and under Flower), so a round is a
``SampledWithoutReplacementDpEvent`` (Wang, Balle and Kasiviswanathan, 2019), which the RDP
accountant supports under the *replace-one* neighbouring relation: two federations differ in
one client's data, everything else (and ``N``) public. Replacing one client moves the sum of
clipped updates by up to ``2 C``, so Gaussian noise of std ``z C`` is a Gaussian mechanism with
noise multiplier ``z / 2`` relative to that sensitivity; that is what the accountant is given.

* ``central`` rounds: sampled Gaussian (amplified by the sampling); ``distributed`` rounds too, with
  the multiplier of the noise actually in the sum (``z sqrt(m / n)`` when ``m`` of the ``n``
  expected devices contributed their share);
* ``local`` rounds: the server sees who took part, so no amplification: each round counts as a
  full Gaussian release for a client that takes part in every round (the worst case);
* selection releases (FedPepTAO's layer scores and Hessian ratio, when privatised): a Gaussian
  release by every client asked, without sampling.

The ledger is a list of JSON events, so a checkpoint restores the accountant exactly.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable

import dp_accounting
from dp_accounting.rdp import RdpAccountant

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
ACCOUNTANT = "RDP (dp-accounting), replace-one client, fixed-size sampling without replacement"
MAX_NOISE_MULTIPLIER = 1e3

Event = tuple[str, int, int, float]  # (kind, population, sample, noise multiplier z)


def dp_event(event: Event) -> dp_accounting.DpEvent:
    """The library's event for one of ours (the noise multiplier halved: sensitivity ``2 C``)."""
    kind, population, sample, z = event
    gaussian = dp_accounting.GaussianDpEvent(z / 2.0)
    if kind == "round" and sample < population:
        return dp_accounting.SampledWithoutReplacementDpEvent(population, sample, gaussian)
    return gaussian


def epsilon_of(events: Iterable[Event], delta: float) -> float:
    """The epsilon at ``delta`` of all ``events`` composed (0 for none, inf for a noiseless one)."""
    events = list(events)
    if not events:
        return 0.0
    if any(e[3] <= 0 for e in events):
        return math.inf
    accountant = RdpAccountant(neighboring_relation=REPLACE_ONE)
    accountant.compose(composed(events))
    return float(accountant.get_epsilon(delta))


def composed(events: Iterable[Event]) -> dp_accounting.DpEvent:
    """One library event for many: equal events self-composed, so each is evaluated once."""
    counts = Counter(tuple(e) for e in events)
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(dp_event(e), n) for e, n in sorted(counts.items())])


def planned_events(mode: str, num_clients: int, per_round: int, rounds: int, releases: int, z: float) -> list[Event]:
    """What a whole run will release with noise multiplier ``z``."""
    kind = "round" if mode in ("central", "distributed") else "local"
    return [(kind, num_clients, per_round, z)] * rounds + [("release", num_clients, num_clients, z)] * releases


@functools.lru_cache(maxsize=64)
def solve_noise_multiplier(mode: str, num_clients: int, per_round: int, rounds: int, releases: int,
                           target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier whose whole run stays within ``(target_epsilon, delta)``.

    Raises ``ValueError`` naming ``privacy.target_epsilon`` when even ``z = 1000`` cannot reach it.
    """
    def eps(z: float) -> float:
        return epsilon_of(planned_events(mode, num_clients, per_round, rounds, releases, z), delta)

    if eps(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(f"privacy.target_epsilon: {target_epsilon:g} cannot be reached in {rounds} rounds at delta "
                         f"{delta:g} with any noise multiplier up to {MAX_NOISE_MULTIPLIER:g}; allow a larger "
                         f"epsilon or fewer rounds")
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(neighboring_relation=REPLACE_ONE),
        lambda value: composed(planned_events(mode, num_clients, per_round, rounds, releases, value)),
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-3)
    while eps(z) > target_epsilon:  # the solver's tolerance may land a hair above the target
        z *= 1.0001
    return float(z)


class PrivacyAccountant:
    """The run's ledger and its epsilon at ``delta``."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.events: list[Event] = []

    def record(self, event: Event) -> None:
        self.events.append(tuple(event))

    def epsilon(self, extra: Iterable[Event] = ()) -> float:
        return epsilon_of([*self.events, *extra], self.delta)

    def state(self) -> dict:
        return {"delta": self.delta, "events": [list(e) for e in self.events]}

    def load_state(self, state: dict) -> None:
        self.delta = float(state["delta"])
        self.events = [(str(k), int(p), int(s), float(z)) for k, p, s, z in state["events"]]

"""Where FedPepTAO's server step turns against its clients: the step measured against K local steps.

A direct check of :func:`fedpeptao.core.server.fedpeptao_step` (float64), as the issue that found it
describes: ``N`` clients, ``S`` sampled per round, each client's update ``K`` steps of ``eta_l`` along
one direction every client agrees on, plus noise. Printed per round: the ratio of the server's step
along that direction to the clients' mean update along it (1: the server takes the clients' step;
below 0: it steps against every client). Rows for the published correction (``c - c_k`` with the
``c_k`` just updated from this round's update, SPEC section 3) and for the stable one
(``method.correction=previous``: the ``c - c_k`` the client held before this round, as SCAFFOLD's
clients use it).

The first-contact ratio of the published form, with ``c`` and ``v`` still about zero, is
``1 + eta_s (1 - beta) - eta_s (1 - S/N) / (K eta_l)``: below zero once ``K eta_l`` falls under about
``eta_s``; the column ``first contact (formula)`` prints it.

    .venv/bin/python benchmarks/stability.py [--clients 1000] [--sampled 50] [--rounds 6] [--steps 1,3,10,25]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedpeptao.core.aggregation import ClientUpdate
from fedpeptao.core.server import ServerState, ServerStepConfig, fedpeptao_step, first_contact_ratio

DIM = 64


def step_ratios(num_clients: int, sampled: int, rounds: int, steps: int, correction: str, local_lr: float,
                server_lr: float, noise: float = 0.5, seed: int = 0) -> list[float]:
    """Each round's server step along the common direction over the clients' mean update along it."""
    rng = np.random.default_rng(seed)
    direction = torch.ones(DIM, dtype=torch.float64) / DIM ** 0.5
    theta = torch.zeros(DIM, dtype=torch.float64)
    cfg = ServerStepConfig(num_clients=num_clients, local_lr=local_lr, server_lr=server_lr, correction=correction)
    state = ServerState(server_lr=server_lr)
    ratios = []
    for _ in range(rounds):
        clients = rng.choice(num_clients, sampled, replace=False)
        updates = []
        for cid in clients:
            gradient = direction + noise * torch.as_tensor(rng.standard_normal(DIM)) / DIM ** 0.5
            updates.append(ClientUpdate(int(cid), {"x": theta - steps * local_lr * gradient}, 10, steps))
        mean_update = float((theta - sum(u.params["x"] for u in updates) / sampled) @ direction)
        new = fedpeptao_step({"x": theta}, updates, state, cfg)["x"]
        ratios.append(float((theta - new) @ direction) / mean_update)
        theta = new
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sampled", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", default="1,3,10,25")
    parser.add_argument("--local-lr", type=float, default=0.02)
    parser.add_argument("--server-lr", type=float, default=0.05)
    args = parser.parse_args()
    print(f"N = {args.clients} clients, {args.sampled} per round, eta_l = {args.local_lr}, eta_s = {args.server_lr}, "
          f"beta = 0.9, float64; ratio of the server's step to the clients' mean update, per round\n")
    header = " | ".join(f"round {t}" for t in range(1, args.rounds + 1))
    print(f"| correction | K local steps | first contact (formula) | {header} |")
    print("|---|---|---|" + "---|" * args.rounds)
    for correction in ("published", "previous"):
        for steps in (int(k) for k in args.steps.split(",")):
            ratios = step_ratios(args.clients, args.sampled, args.rounds, steps, correction, args.local_lr,
                                 args.server_lr)
            formula = first_contact_ratio(steps, args.local_lr, args.server_lr, 0.9, args.sampled / args.clients)
            cells = " | ".join(f"{r:+.2f}" for r in ratios)
            print(f"| {correction} | {steps} | {formula:+.2f} | {cells} |")


if __name__ == "__main__":
    main()

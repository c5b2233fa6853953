"""Device-side work: local training of the prompts and evaluation (SPEC section 3, "Device").

Everything here acts on a :class:`TunedModel` whose trainable tensors have already been
set to one client's values; the caller owns the client's state. That is what lets one frozen
backbone serve every simulated client, and the Flower client reuse the same functions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedpeptao.data.encoding import EncodedDataset, stack_batches
from fedpeptao.models.tuned import TunedModel
from fedpeptao.models.slots import ClientView, slot_mode
from fedpeptao.utils.device import to_host


@dataclass
class LocalTrainConfig:
    epochs: int = 2
    batch_size: int = 8
    lr: float = 4e-2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    reset_optimizer: bool = False  # the paper's text resets momentum each round; the reference code keeps it
    group_by_length: bool = True  # batches of similar lengths (less padding), in a seeded order shared by a round


@dataclass
class LocalResult:
    num_steps: int
    num_examples: int
    mean_loss: float
    seconds: float
    optimizer_state: dict | None


def make_optimizer(model: torch.nn.Module, cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@dataclass
class LocalJob:
    """One client's share of a pass: its tensors (a :class:`ClientView` in a shared pass, or the
    model itself when it trains alone), examples, data order, optimiser state and local
    objective's extra term."""

    view: ClientView | TunedModel
    indices: np.ndarray
    rng: np.random.Generator
    optimizer_state: dict | None = None
    extra_loss: object | None = None


def local_train(model: TunedModel, data: EncodedDataset, jobs: Sequence[LocalJob],
                cfg: LocalTrainConfig, order_seed: int = 0) -> list[LocalResult]:
    """``cfg.epochs`` over each job's examples; returns each client's result and optimiser state.

    ``order_seed`` is the round's (every client's) seed for the order of length-grouped batches.
    A job's ``extra_loss(model, batch, output) -> Tensor`` lets federated optimisers add a term
    (FedProx's proximal term, MOON's contrastive term) without a second training loop.

    Several jobs train at once: at each step every client that still has a batch contributes it
    to a forward/backward pass over the shared frozen backbone (slot mode), then each client
    clips and steps its own optimiser on its own tensors.

    Each client's loss is the mean over its own examples and the clients' tensors are disjoint, so
    the summed loss gives each client exactly its own gradient: with dropout off the result equals
    the sequential loop's up to float rounding. A client with fewer batches simply drops out of
    the later passes. A step's batches share one pass unless their widths differ so much that the
    padding would cost more than another pass (:func:`pass_groups`). The seconds reported are the
    whole pass's (the clients ran together). One job whose view is ``model`` itself is the plain
    one-client loop (no slots).
    """
    start = time.perf_counter()
    model.train()
    optimizers = [_optimizer(job.view, cfg, job.optimizer_state) for job in jobs]
    params = [[p for p in job.view.parameters() if p.requires_grad] for job in jobs]
    streams = [epoch_batches(data, job.indices, cfg, job.rng, order_seed) for job in jobs]
    pending = [next(stream, None) for stream in streams]
    steps = [0] * len(jobs)
    totals: list[torch.Tensor | float] = [0.0] * len(jobs)  # summed on the device: no sync per step
    features = any(job.extra_loss is not None for job in jobs)
    alone = len(jobs) == 1 and jobs[0].view is model
    pass_cost = PASS_COST_TOKENS.get(model.device.type, PASS_COST_TOKENS["accelerator"])
    while any(batch is not None for batch in pending):
        live = [i for i, batch in enumerate(pending) if batch is not None]
        for i in live:
            optimizers[i].zero_grad(set_to_none=True)
        for group in pass_groups([pending[i]["attention_mask"].shape for i in live], pass_cost):
            members = [live[j] for j in group]
            for i, loss in zip(members, _forward_backward(model, data, [jobs[i] for i in members],
                                                          [pending[i] for i in members], features, alone)):
                totals[i] += loss
        for i in live:
            _step(optimizers[i], params[i], cfg)
            steps[i] += 1
            pending[i] = next(streams[i], None)
    seconds = time.perf_counter() - start
    return [LocalResult(steps[i], len(job.indices), float(totals[i]) / max(steps[i], 1), seconds,
                        _kept_state(optimizers[i], cfg)) for i, job in enumerate(jobs)]


#: What one more forward/backward pass costs, in padded tokens: a pass's fixed cost (kernel
#: launches, Python) against the per-token cost of its matmuls. On a CPU a pass costs about its
#: tokens, so batches of very different widths run apart; on an accelerator a pass of a few
#: thousand tokens costs about as much as a pass of one, so a step's batches share one pass.
PASS_COST_TOKENS = {"cpu": 64, "accelerator": 4096}


def pass_groups(shapes: Sequence[tuple[int, int]], pass_cost: float) -> list[list[int]]:
    """Split one step's batches (``(rows, width)`` each) into passes that cost the fewest padded
    tokens plus ``pass_cost`` per pass: batches of similar widths share a pass. Exact (dynamic
    programming over the batches sorted by width; a best split is always contiguous there), and
    deterministic; returns lists of positions into ``shapes``, each sorted ascending."""
    order = sorted(range(len(shapes)), key=lambda j: (shapes[j][1], j))
    best = [0.0] + [float("inf")] * len(order)  # best[n]: cost of the n narrowest batches
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        rows = 0
        for begin in range(end - 1, -1, -1):
            rows += shapes[order[begin]][0]
            cost = best[begin] + rows * shapes[order[end - 1]][1] + pass_cost
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], len(order)
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return sorted(groups)


def _forward_backward(model: TunedModel, data: EncodedDataset, jobs: Sequence[LocalJob],
                      batches: Sequence[dict[str, torch.Tensor]], features: bool, alone: bool) -> list[torch.Tensor]:
    """One shared pass of several clients' batches: forward, each client's loss (with its local
    objective's extra term), one backward of their sum. Returns each client's task loss, detached
    and on the device (reading it here would make the host wait for the forward every step)."""
    combined, rows = stack_batches(batches, data.pad_id)
    slots = None if alone else ([job.view.tensors() for job in jobs], [r.stop - r.start for r in rows])
    with _slots(model, slots):
        out = model(**combined, features=features)
    losses, task_losses = [], []  # the extra terms run their own forwards (MOON's references), outside slot mode
    for job, batch, own_rows in zip(jobs, batches, rows):
        own = out if alone else out.rows(own_rows)
        losses.append(own.loss if job.extra_loss is None else own.loss + job.extra_loss(job.view, batch, own))
        task_losses.append(own.loss.detach())
    with _slots(model, slots):  # gradient checkpointing recomputes the pass in backward
        (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
    return task_losses


def _slots(model: TunedModel, slots: tuple | None):
    return nullcontext() if slots is None else slot_mode(model, *slots)


def epoch_batches(data: EncodedDataset, indices: np.ndarray, cfg: LocalTrainConfig, rng: np.random.Generator,
                  order_seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Every batch of ``cfg.epochs`` shuffled passes over ``indices``, drawn from ``rng`` in order;
    grouped by length in the round's shared order if ``cfg.group_by_length``."""
    for epoch in range(cfg.epochs):
        group = int(np.random.SeedSequence([order_seed, epoch]).generate_state(1)[0]) if cfg.group_by_length else None
        yield from data.batches(indices, cfg.batch_size, shuffle=True, rng=rng, group_seed=group)


def _optimizer(model: torch.nn.Module, cfg: LocalTrainConfig, state: dict | None) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model, cfg)
    if state is not None and not cfg.reset_optimizer:
        optimizer.load_state_dict(state)
    return optimizer


def _step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], cfg: LocalTrainConfig) -> None:
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()


def _kept_state(optimizer: torch.optim.Optimizer, cfg: LocalTrainConfig) -> dict | None:
    return None if cfg.reset_optimizer else to_host(optimizer.state_dict())


@dataclass
class ClientRows:
    """Several clients' examples as one list of rows: row ``j`` is example ``examples[j]``, the
    ``position[j]``-th of client ``owner[j]``'s part; ``tensors[k]`` are client ``k``'s (None: the
    model's own, already loaded)."""

    owner: np.ndarray
    position: np.ndarray
    examples: np.ndarray
    tensors: list


def client_rows(model: TunedModel, parts: Sequence[np.ndarray], tensors: Sequence[dict] | None) -> ClientRows:
    """The rows of clients' ``parts``; one client's tensors are simply loaded into the model."""
    if tensors is not None and len(parts) == 1:
        model.load_trainable(tensors[0])
        tensors = None
    return ClientRows(np.concatenate([np.full(len(part), i) for i, part in enumerate(parts)]).astype(np.int64),
                      np.concatenate([np.arange(len(part)) for part in parts]).astype(np.int64),
                      np.concatenate([np.asarray(part, dtype=np.int64) for part in parts]),
                      [None] * len(parts) if tensors is None else list(tensors))


def row_batches(rows: ClientRows, lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices in batches of ``batch_size``, shortest ``lengths`` first (little padding), each
    batch's rows grouped by client (what slot mode needs)."""
    order = np.lexsort((rows.owner, lengths))  # by length, then by client
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk[np.argsort(rows.owner[chunk], kind="stable")]


def own_tensors(model: TunedModel, rows: ClientRows, chunk: np.ndarray):
    """A context in which each row of ``chunk`` uses its client's tensors (slot mode), or nothing
    to do when the model already holds them."""
    clients, sizes = np.unique(rows.owner[chunk], return_counts=True)
    if rows.tensors[clients[0]] is None:
        return nullcontext()
    return slot_mode(model, [rows.tensors[i] for i in clients], sizes.tolist())


@torch.no_grad()
def predict(model: TunedModel, data: EncodedDataset, parts: Sequence[np.ndarray],
            tensors: Sequence[dict[str, torch.Tensor]] | None = None, batch_size: int = 32
            ) -> list[tuple[np.ndarray, float]]:
    """Predicted classes (in each part's order) and summed loss of client ``k``'s examples
    ``parts[k]`` under its tensors ``tensors[k]`` (``None``: the model's own tensors).

    The examples run shortest first in batches of ``batch_size``, so batches carry little
    padding. Several clients' examples are pooled: in a batch each client's rows are contiguous
    and use its own tensors (slot mode); one client's tensors are simply loaded into the model.
    """
    model.eval()
    rows = client_rows(model, parts, tensors)
    owner, position, examples = rows.owner, rows.position, rows.examples
    chunks, predicted, row_losses = [], [], []  # kept on the device and read once: no sync per batch
    for chunk in row_batches(rows, data.lengths(examples), batch_size):
        batch = data.collate(examples[chunk])
        with own_tensors(model, rows, chunk):
            out = model(**batch)
        chunks.append(chunk)
        predicted.append(out.logits.argmax(-1))
        row_losses.append(out.row_losses())
    ran = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    labels = torch.cat(predicted).cpu().numpy() if predicted else np.zeros(0, dtype=np.int64)
    losses = torch.cat(row_losses).double().cpu().numpy() if row_losses else np.zeros(0)
    whose = owner[ran]
    preds = [np.zeros(len(part), dtype=np.int64) for part in parts]
    for i in range(len(parts)):
        mine = whose == i
        preds[i][position[ran[mine]]] = labels[mine]
    loss_sums = np.bincount(whose, weights=losses, minlength=len(parts))
    return [(pred, float(total)) for pred, total in zip(preds, loss_sums)]

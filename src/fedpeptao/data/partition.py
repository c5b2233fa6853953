"""Split example indices among federated clients: IID, the FedPepTAO paper's Dirichlet scheme, Flower's,
or the natural one (a client per value of a column such as ``subject``).

Every function returns one sorted int64 index array per client; together they cover every
example exactly once, and the same seed gives the same split (the natural split needs none).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedpeptao.data.dataset import DataError

Scheme = Literal["iid", "paper-dirichlet", "flwr-dirichlet"]  # by label; "natural" is by column (natural())


@dataclass(frozen=True)
class PartitionPlan:
    """Client sizes and label mixes, kept apart from any one split so eval can follow train."""

    size_fractions: np.ndarray  # [K] client size shares, sum 1
    class_priors: np.ndarray  # [K, C] per-client label distributions, rows sum 1

    @property
    def num_clients(self) -> int:
        return len(self.size_fractions)


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into near-equal parts (sizes differ by at most one)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def paper_dirichlet_plan(
    num_clients: int, num_classes: int, alpha: float = 1.0, size_alpha: float = 5.0, seed: int = 0
) -> PartitionPlan:
    """The paper's non-IID split: client sizes ~ Dir(size_alpha), each client's class prior ~ Dir(alpha)."""
    if num_clients < 1 or num_classes < 1:
        raise ValueError(f"need at least one client and one class, got {num_clients} and {num_classes}")
    if alpha <= 0 or size_alpha <= 0:
        raise ValueError(f"Dirichlet concentrations must be > 0, got alpha={alpha}, size_alpha={size_alpha}")
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(num_clients, float(size_alpha)))
    priors = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_clients)
    return PartitionPlan(sizes / sizes.sum(), priors / priors.sum(axis=1, keepdims=True))


def apply_plan(labels: np.ndarray, plan: PartitionPlan, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Deal every example to one client following ``plan``.

    Client k gets about ``size_fractions[k] * N`` examples (at least ``min_size``). Client slots
    are visited in a random order and each draws a class from its prior, restricted to classes
    that still have examples; that way no client is favoured when a class runs out.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, num_classes = len(labels), plan.class_priors.shape[1]
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}) for a plan with {num_classes} classes")
    rng = np.random.default_rng(seed)
    quotas = _quotas(plan.size_fractions, n, min_size)

    slot_client = rng.permutation(np.repeat(np.arange(plan.num_clients), quotas))
    slot_class = np.empty(n, dtype=np.int64)
    left = np.bincount(labels, minlength=num_classes)
    start = 0
    while start < n:
        # Draw classes for every remaining slot; keep the draws up to the first one that would
        # over-use a class, which is then empty: the rest are drawn again without it.
        draws = _draw_classes(plan.class_priors[slot_client[start:]], left > 0, rng)
        stop = len(draws)
        for c in np.flatnonzero(left > 0):
            hits = np.flatnonzero(draws == c)
            if len(hits) > left[c]:
                stop = min(stop, hits[left[c]])
        slot_class[start : start + stop] = draws[:stop]
        left -= np.bincount(draws[:stop], minlength=num_classes)
        start += stop

    owner = np.empty(n, dtype=np.int64)
    for c in range(num_classes):
        owner[rng.permutation(np.flatnonzero(labels == c))] = slot_client[slot_class == c]
    return [np.flatnonzero(owner == k) for k in range(plan.num_clients)]


def _quotas(fractions: np.ndarray, n: int, min_size: int) -> np.ndarray:
    """Integer sizes summing to n, proportional to ``fractions`` (largest remainder), each >= min_size."""
    k = len(fractions)
    if n < k * min_size:
        raise DataError(f"{n} examples cannot give {k} clients at least {min_size} each")
    exact = np.asarray(fractions, dtype=float) / np.sum(fractions) * n
    sizes = np.floor(exact).astype(np.int64)
    sizes[np.argsort(sizes - exact, kind="stable")[: n - sizes.sum()]] += 1
    short = np.maximum(min_size - sizes, 0)
    sizes += short
    for _ in range(int(short.sum())):  # pay the top-ups back from the largest clients
        sizes[np.argmax(sizes)] -= 1
    return sizes


def _draw_classes(priors: np.ndarray, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per row of ``priors``, renormalised over ``available`` classes (uniform if none is left)."""
    weights = priors * available
    empty = weights.sum(axis=1) == 0
    weights[empty] = available
    cumulative = np.cumsum(weights, axis=1)
    point = rng.random(len(weights)) * cumulative[:, -1]
    # The first class whose cumulative weight exceeds the point; zero-weight classes never qualify.
    # Clamping to the last class with weight covers a point rounded up onto the total.
    last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
    return np.minimum((cumulative <= point[:, None]).sum(axis=1), last)


def plan_from_partitions(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> PartitionPlan:
    """The empirical sizes and label mixes of an existing partition, to divide another split alike."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(float)
    sizes = counts.sum(axis=1)
    priors = np.where(sizes[:, None] > 0, counts / np.maximum(sizes, 1)[:, None], 1.0 / num_classes)
    return PartitionPlan(sizes / sizes.sum(), priors)


def flwr_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_partition_size: int = 2
) -> list[np.ndarray]:
    """Flower Datasets' per-class Dir(alpha) split, run on an in-memory dataset (no hub access)."""
    import datasets  # noqa: PLC0415 - heavy, and only this scheme needs it
    from flwr_datasets.partitioner import DirichletPartitioner  # noqa: PLC0415

    labels = np.asarray(labels, dtype=np.int64)
    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=float(alpha),
        min_partition_size=min_partition_size, seed=seed,
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    try:
        with warnings.catch_warnings():  # flwr warns on every resampling; only a final failure matters
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            # ``[:]`` reads the column in one go (datasets 4 returns a lazy Column that iterates slowly).
            parts = [np.asarray(partitioner.load_partition(k)["idx"][:], dtype=np.int64) for k in range(num_clients)]
    except ValueError as err:
        raise DataError(
            f"flwr DirichletPartitioner could not give {num_clients} clients >= {min_partition_size} of "
            f"{len(labels)} examples with alpha={alpha} ({err}); raise alpha, lower the minimum size, "
            "use fewer clients, or use the paper-dirichlet scheme, which always meets it"
        ) from None
    return [np.sort(p) for p in parts]


def partition(
    train_labels: np.ndarray,
    eval_labels: np.ndarray,
    scheme: Scheme,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    size_alpha: float = 5.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train and eval partitions; eval follows the train split's client sizes and label mixes."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    eval_labels = np.asarray(eval_labels, dtype=np.int64)
    if len(train_labels) < num_clients * min_size:
        raise DataError(
            f"{len(train_labels)} training examples cannot give {num_clients} clients at least {min_size} each"
        )
    if scheme == "iid":
        return iid(len(train_labels), num_clients, seed), iid(len(eval_labels), num_clients, seed + 1)
    num_classes = int(max(train_labels.max(initial=0), eval_labels.max(initial=0))) + 1
    if scheme == "paper-dirichlet":
        plan = paper_dirichlet_plan(num_clients, num_classes, alpha, size_alpha=size_alpha, seed=seed)
        return apply_plan(train_labels, plan, seed, min_size), apply_plan(eval_labels, plan, seed + 1, min_size=0)
    if scheme == "flwr-dirichlet":
        train_parts = flwr_dirichlet(train_labels, num_clients, alpha, seed, min_partition_size=min_size)
        plan = plan_from_partitions(train_labels, train_parts, num_classes)
        return train_parts, apply_plan(eval_labels, plan, seed + 1, min_size=0)
    raise ValueError(f"unknown partition scheme '{scheme}' (iid, paper-dirichlet, flwr-dirichlet; a natural "
                     f"partition reads a column, not labels: natural())")


# -- natural: one client per value of a column ---------------------------------------------


def flwr_natural(groups: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """Flower Datasets' natural-id split, run on an in-memory column (no hub access): one client
    per distinct value, client k the k-th value in sorted order. Returns each client's indices
    and the values."""
    import datasets  # noqa: PLC0415 - heavy, and only this scheme needs it
    from flwr_datasets.partitioner import NaturalIdPartitioner  # noqa: PLC0415

    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = datasets.Dataset.from_dict(
        {"group": [str(g) for g in groups], "idx": np.arange(len(groups), dtype=np.int64)})
    # Its index pass draws a tqdm bar with no total on stderr, on every run: not ours to show.
    with contextlib.redirect_stderr(io.StringIO()):
        parts = [np.sort(np.asarray(partitioner.load_partition(k)["idx"][:], dtype=np.int64))
                 for k in range(partitioner.num_partitions)]
    return parts, [partitioner.partition_id_to_natural_id[k] for k in range(len(parts))]


def natural(groups: Sequence[str], num_clients: int, column: str) -> tuple[list[np.ndarray], list[str]]:
    """The training split by ``column``'s values (:func:`flwr_natural`), which must give exactly
    ``num_clients`` clients: the groups are the federation, so a different count is refused (one
    line naming both keys and the count) rather than merged or split."""
    parts, names = flwr_natural(groups)
    if len(names) != num_clients:
        raise DataError(f"federated.num_clients: {num_clients}, but data.partition_by={column} has {len(names)} "
                        f"groups in the training split ({name_list(names)}); set federated.num_clients={len(names)}")
    return parts, names


def follow_groups(names: Sequence[str], groups: Sequence[str], column: str, split: str) -> list[np.ndarray]:
    """A held-out split (test, validation) by the training split's groups ``names``: each example
    goes to the client of its group, so every client is scored on its own kind of data. A client
    whose group has no example here gets an empty part; a group no client trained on is refused."""
    client = {name: k for k, name in enumerate(names)}
    groups = [str(g) for g in groups]
    unseen = sorted(set(groups) - client.keys())
    if unseen:
        raise DataError(f"data.partition_by: {split} has {column} {name_list(unseen)}, which no training example "
                        f"has, so no client holds it (training groups: {name_list(names)})")
    owner = np.asarray([client[g] for g in groups], dtype=np.int64)
    return [np.flatnonzero(owner == k).astype(np.int64) for k in range(len(names))]


def name_list(names: Sequence[str], most: int = 8) -> str:
    """Group names for one line (an error, a summary): the first ``most``, then how many in all."""
    shown = ", ".join(repr(n) for n in names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} in all)"

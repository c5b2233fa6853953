"""In-memory text-classification data: what every reader returns and every encoder consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Bad data input; message names the file, row and column involved."""


@dataclass
class TextDataset:
    """Single sentences (``texts_b is None``) or sentence pairs, with integer labels.

    ``labels[i]`` indexes ``label_names``, so two splits that share ``label_names`` share
    their label ids.
    """

    texts_a: list[str]
    texts_b: list[str] | None
    labels: np.ndarray
    label_names: list[str]
    layout: str | None = None  # the task layout the reader recognised (cola, mrpc, ...), which picks the metric
    source: str | None = None  # where the examples came from (a file), for naming a run's splits

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.texts_a)
        if self.texts_b is not None and len(self.texts_b) != n:
            raise DataError(f"texts_b has {len(self.texts_b)} entries but texts_a has {n}")
        if len(self.labels) != n:
            raise DataError(f"labels has {len(self.labels)} entries but texts_a has {n}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise DataError(f"labels must lie in [0, {len(self.label_names)}) to index label_names {self.label_names}")

    def __len__(self) -> int:
        return len(self.texts_a)

    def subset(self, indices) -> TextDataset:
        """The examples at ``indices`` (ints, in that order; a boolean mask also works)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        return TextDataset(
            texts_a=[self.texts_a[i] for i in idx],
            texts_b=None if self.texts_b is None else [self.texts_b[i] for i in idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            layout=self.layout,
            source=self.source,
        )

    @property
    def is_pair(self) -> bool:
        return self.texts_b is not None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def stratified_split(dataset: TextDataset, eval_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Disjoint (train, eval) subsets with each class split in the same proportion.

    Used where a source has no held-out split of its own, so that eval keeps the label mix.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, eval_idx = [], []
    for c in range(dataset.num_labels):
        members = rng.permutation(np.flatnonzero(dataset.labels == c))
        n_eval = int(round(len(members) * eval_fraction))
        if len(members) >= 2:  # a class with 2+ examples appears on both sides
            n_eval = min(max(n_eval, 1), len(members) - 1)
        eval_idx.append(members[:n_eval])
        train_idx.append(members[n_eval:])
    return dataset.subset(np.sort(np.concatenate(train_idx))), dataset.subset(np.sort(np.concatenate(eval_idx)))

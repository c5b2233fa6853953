"""Resolve a data configuration to its three roles: train, validation and test.

The best round is chosen on validation and the test split is reported once (at that round and at
the end). Validation is ``None`` where the data has none of its own (a GLUE folder whose test
file has no labels, the bundled task, train/eval files without ``data.validation_file``): the
experiment then holds out ``data.validation_fraction`` of each client's training data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpeptao.data.bundled import rotten_tomatoes
from fedpeptao.data.dataset import DataError, TextDataset
from fedpeptao.data.readers import load_task_dir, read_table

BUNDLED = {"rotten_tomatoes": rotten_tomatoes}


def cap_examples(dataset, limit: int | None, seed: int):
    """A seeded random ``limit`` of a dataset's examples (anything with ``subset``), in their
    original order: quick studies on large tasks."""
    if limit is None or len(dataset) <= limit:
        return dataset
    keep = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return dataset.subset(keep)


def load_splits(cfg, seed: int) -> tuple[TextDataset, TextDataset | None, TextDataset]:
    """(train, validation or None, test) of a bundled task, a task folder, or explicit files
    (``cfg`` is a DataConfig); the test split is what the run reports."""
    columns = dict(text_a=cfg.text_a, text_b=cfg.text_b, label=cfg.label)
    if cfg.train_file:
        train = read_table(cfg.train_file, header=cfg.header, **columns)
        if not cfg.eval_file:
            raise DataError("data.eval_file: required when data.train_file is given")
        evaluation = read_table(cfg.eval_file, label_names=train.label_names, header=cfg.header, **columns)
        validation = None
        if cfg.validation_file:
            validation = read_table(cfg.validation_file, label_names=train.label_names, header=cfg.header, **columns)
    elif cfg.task in BUNDLED:
        train, evaluation = BUNDLED[cfg.task](seed=seed)
        validation = None
    elif Path(cfg.task).is_dir():
        train, validation, evaluation = load_task_dir(cfg.task, header=cfg.header, columns=columns)
    else:
        raise DataError(f"data.task: '{cfg.task}' is neither a bundled task ({', '.join(BUNDLED)}) nor a folder")
    _require_two_labels(train, "")
    if validation is not None:
        validation = cap_examples(validation, cfg.max_eval_examples, seed + 2)
    capped = cap_examples(train, cfg.max_train_examples, seed)
    _require_two_labels(capped, f" after data.max_train_examples={cfg.max_train_examples}")
    return capped, validation, cap_examples(evaluation, cfg.max_eval_examples, seed + 1)


def _require_two_labels(train: TextDataset, after: str) -> None:
    """A classifier trained on one label predicts it everywhere and scores 1.0 on a test split of
    that label: refused in one line (:class:`DataError`) before any model is built."""
    present = np.unique(train.labels)
    if len(present) < 2:
        source = f" ({train.source})" if train.source else ""
        held = f"a single label ({train.label_names[present[0]]!r})" if len(present) else "no examples"
        raise DataError(f"data: the training split{source} has {held}{after}; a classifier needs at least two labels")

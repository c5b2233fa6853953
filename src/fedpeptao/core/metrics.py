"""Classification metrics the paper reports: accuracy, Matthews correlation (CoLA), (acc+F1)/2 (MRPC)."""

from __future__ import annotations

from typing import Literal

import numpy as np

MetricName = Literal["accuracy", "mcc", "acc_f1"]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean()) if len(labels) else 0.0


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    tp = np.sum((preds == positive) & (labels == positive))
    fp = np.sum((preds == positive) & (labels != positive))
    fn = np.sum((preds != positive) & (labels == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), 0 when undefined."""
    classes = np.union1d(preds, labels)
    conf = np.array([[np.sum((labels == a) & (preds == b)) for b in classes] for a in classes], dtype=np.float64)
    t, p, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
    denom = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def score(name: MetricName, preds: np.ndarray, labels: np.ndarray) -> float:
    if name == "mcc":
        return matthews(preds, labels)
    if name == "acc_f1":
        return (accuracy(preds, labels) + binary_f1(preds, labels)) / 2
    return accuracy(preds, labels)


def metric_for_task(task: str) -> MetricName:
    """The paper's metric for a task name (CoLA: MCC, MRPC: (acc+F1)/2, else accuracy)."""
    name = task.rstrip("/").split("/")[-1].lower()
    return {"cola": "mcc", "mrpc": "acc_f1"}.get(name, "accuracy")

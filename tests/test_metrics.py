import numpy as np
import pytest

from fedpeptao.core.metrics import accuracy, binary_f1, matthews, metric_for_task, score


def test_against_hand_computed_values():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    preds = np.array([1, 1, 0, 0, 0, 1, 0, 1])
    tp, tn, fp, fn = 3, 3, 1, 1
    assert accuracy(preds, labels) == pytest.approx(6 / 8)
    assert binary_f1(preds, labels) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(preds, labels) == pytest.approx(mcc)
    assert score("acc_f1", preds, labels) == pytest.approx((6 / 8 + 0.75) / 2)


def test_constant_prediction_has_zero_mcc_and_task_metrics():
    assert matthews(np.zeros(5, int), np.array([0, 1, 0, 1, 1])) == 0.0
    assert metric_for_task("../shared/data/tasks/mrpc") == "acc_f1"
    assert metric_for_task("cola") == "mcc" and metric_for_task("mr") == "accuracy"

import numpy as np
import pytest

from fedpeptao.core.metrics import accuracy, binary_f1, default_metric, matthews, score


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
    assert default_metric("mrpc") == "acc_f1" and default_metric("cola") == "mcc"
    assert default_metric(None) == "accuracy" and default_metric("sst-2") == "accuracy"
    assert score("macro_f1", np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1])) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)

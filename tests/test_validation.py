"""Server-side update validation and robust aggregation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedpeptao.core.aggregation import ClientUpdate, coordinate_median, trimmed_mean
from fedpeptao.core.aggregation import weighted_average as aggregate
from fedpeptao.core.validation import UpdateRejected, ValidationPolicy, filter_updates, update_norm, validate_update


def reference_weighted_average(updates) -> dict[str, torch.Tensor]:
    total = sum(u.num_examples for u in updates)
    return {name: sum(u.params[name].double() * (u.num_examples / total) for u in updates).float()
            for name in updates[0].params}


LOG = logging.getLogger("test.validation")


def expected_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.0": torch.randn(4, 2, 6, generator=g), "layer.3": torch.randn(4, 2, 6, generator=g),
            "head.weight": torch.randn(2, 6, generator=g)}


def good_update(client_id: int, expected, scale: float = 0.01, n: int = 10) -> ClientUpdate:
    g = torch.Generator().manual_seed(100 + client_id)
    params = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in expected.items()}
    return ClientUpdate(client_id, params, n + client_id, 5)


def corrupt(kind: str, update: ClientUpdate) -> tuple[ClientUpdate, str]:
    """Return a broken copy of ``update`` and a word its rejection reason must contain."""
    p = dict(update.params)
    n = update.num_examples
    if kind == "missing":
        del p["layer.3"]
        word = "missing"
    elif kind == "extra":
        p["layer.7"] = torch.zeros(4, 2, 6)
        word = "unexpected"
    elif kind == "shape":
        p["layer.0"] = torch.zeros(5, 2, 6)
        word = "shape"
    elif kind == "dtype":
        p["layer.0"] = p["layer.0"].to(torch.float16)
        word = "dtype"
    elif kind == "nan":
        p["layer.0"] = p["layer.0"].clone()
        p["layer.0"][1, 0, 2] = float("nan")
        word = "non-finite"
    elif kind == "inf":
        p["head.weight"] = p["head.weight"].clone()
        p["head.weight"][0, 0] = -float("inf")
        word = "non-finite"
    elif kind == "norm":
        p["layer.0"] = p["layer.0"] + 100.0
        word = "norm"
    elif kind == "zero_examples":
        n = 0
        word = "num_examples"
    elif kind == "negative_examples":
        n = -3
        word = "num_examples"
    elif kind == "not_tensor":
        p["head.weight"] = p["head.weight"].numpy()
        word = "not a tensor"
    else:
        raise AssertionError(kind)
    return ClientUpdate(update.client_id, p, n, update.num_steps), word


KINDS = ["missing", "extra", "shape", "dtype", "nan", "inf", "norm", "zero_examples", "negative_examples", "not_tensor"]
POLICY = ValidationPolicy(max_norm=5.0)


def test_good_updates_pass():
    expected = expected_tensors()
    for k in range(3):
        validate_update(good_update(k, expected), expected, POLICY)


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_update_is_rejected_and_named(kind):
    expected = expected_tensors()
    bad, word = corrupt(kind, good_update(7, expected))
    with pytest.raises(UpdateRejected) as info:
        validate_update(bad, expected, POLICY)
    assert info.value.client_id == 7
    assert word in info.value.reason
    assert "client 7" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_round_aggregates_the_rest(kind, caplog):
    expected = expected_tensors()
    good = [good_update(k, expected) for k in (0, 2, 4)]
    bad, word = corrupt(kind, good_update(3, expected))
    mixed = [good[0], good[1], bad, good[2]]
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        accepted, rejected = filter_updates(mixed, expected, POLICY, LOG)
    assert [u.client_id for u in accepted] == [0, 2, 4]
    assert len(rejected) == 1 and rejected[0][0] == 3 and word in rejected[0][1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "client 3" in warnings[0].getMessage()
    got, want = aggregate(accepted), aggregate(good)
    ref = reference_weighted_average(good)
    for name in expected:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        torch.testing.assert_close(got[name].float(), ref[name], rtol=1e-5, atol=1e-6)


def test_norm_bound_is_on_the_change_not_the_parameters():
    expected = {k: v + 1000.0 for k, v in expected_tensors().items()}  # large parameters, small step
    update = good_update(1, expected, scale=0.01)
    delta = np.concatenate([(update.params[k] - expected[k]).numpy().ravel() for k in expected])
    assert update_norm(update.params, expected) == pytest.approx(float(np.linalg.norm(delta)), rel=1e-6)
    validate_update(update, expected, ValidationPolicy(max_norm=1.0))
    with pytest.raises(UpdateRejected, match="norm"):
        validate_update(update, expected, ValidationPolicy(max_norm=0.5 * float(np.linalg.norm(delta))))
    validate_update(good_update(1, expected, scale=50.0), expected, ValidationPolicy(max_norm=None))


def test_all_rejected_leaves_nothing_to_aggregate():
    expected = expected_tensors()
    bad = [corrupt("nan", good_update(k, expected))[0] for k in range(3)]
    accepted, rejected = filter_updates(bad, expected, POLICY, LOG)
    assert accepted == [] and [cid for cid, _ in rejected] == [0, 1, 2]


def test_extras_are_the_algorithms_to_check():
    expected = expected_tensors()
    update = good_update(1, expected)
    update.extras = {"algo.own": {"c": torch.ones(2)}}
    with pytest.raises(UpdateRejected, match="extras"):
        validate_update(update, expected, POLICY)  # by default a reply carries none
    validate_update(update, expected, POLICY, lambda u: None)
    accepted, rejected = filter_updates([update], expected, POLICY, LOG, lambda u: "dc is stale")
    assert accepted == [] and rejected == [(1, "dc is stale")]
    assert filter_updates([update], expected, None, LOG) == ([update], [])  # validation off: all accepted


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan])
def test_policy_rejects_nonsense_bounds(max_norm):
    with pytest.raises(ValueError):
        ValidationPolicy(max_norm=max_norm)


def _updates(k: int, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(i, {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g)}, 1 + 10 * i, 1)
            for i in range(k)]


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_coordinate_median_matches_numpy(k):
    updates = _updates(k, seed=k)
    got = coordinate_median(updates)
    for name in ("a", "b"):
        want = np.median(np.stack([u.params[name].numpy() for u in updates]), axis=0)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6, atol=1e-7)
        assert got[name].dtype == torch.float32


@pytest.mark.parametrize(("k", "ratio"), [(5, 0.0), (5, 0.2), (6, 0.2), (10, 0.1), (10, 0.3), (7, 0.49)])
def test_trimmed_mean_matches_scipy(k, ratio):
    updates = _updates(k, seed=10 + k)
    got = trimmed_mean(updates, ratio)
    for name in ("a", "b"):
        want = stats.trim_mean(np.stack([u.params[name].numpy() for u in updates]), ratio, axis=0)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-5, atol=1e-6)


def test_robust_rules_ignore_one_outlier_and_the_claimed_sizes():
    updates = _updates(5)
    honest = np.stack([u.params["a"].numpy() for u in updates[:4]])
    outlier = ClientUpdate(99, {"a": torch.full((3, 5), 1e6), "b": torch.full((7,), 1e6)}, 10**9, 1)
    med = coordinate_median([*updates[:4], outlier])["a"].numpy()
    assert np.all(med <= honest.max(axis=0) + 1e-6) and np.all(med >= honest.min(axis=0) - 1e-6)
    tm = trimmed_mean([*updates[:4], outlier], 0.2)["a"].numpy()
    assert np.abs(tm).max() < 10


def test_low_precision_inputs_keep_their_dtype():
    updates = [ClientUpdate(u.client_id, {k: v.to(torch.bfloat16) for k, v in u.params.items()}, 1, 1) for u in _updates(4)]
    assert coordinate_median(updates)["a"].dtype == torch.bfloat16
    assert trimmed_mean(updates, 0.25)["b"].dtype == torch.bfloat16


def test_bad_trim_ratio_and_empty_input():
    with pytest.raises(ValueError):
        trimmed_mean(_updates(4), 0.5)
    with pytest.raises(ValueError):
        trimmed_mean(_updates(4), -0.1)
    with pytest.raises(ValueError):
        coordinate_median([])

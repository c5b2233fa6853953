"""Client partitions: complete, disjoint, seeded; Dirichlet skew follows alpha; eval follows train."""

import socket

import numpy as np
import pytest

from fedpeptao.data.dataset import DataError
from fedpeptao.data.partition import (
    PartitionPlan,
    apply_plan,
    flwr_dirichlet,
    iid,
    paper_dirichlet_plan,
    partition,
)

SCHEMES = ["iid", "paper-dirichlet", "flwr-dirichlet"]


def balanced_labels(n, num_classes, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n, "an example is missing or assigned twice"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


def max_class_share(labels, parts, num_classes):
    """Mean over clients of the largest class's share: 1/C when IID, 1 when each client holds one class."""
    shares = [np.bincount(labels[p], minlength=num_classes).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


def test_iid_balanced_cover():
    parts = iid(103, 10, seed=0)
    assert_exact_cover(parts, 103)
    assert sorted({len(p) for p in parts}) == [10, 11]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_complete_disjoint_and_seeded(scheme):
    train, evaluation = balanced_labels(3000, 3, seed=1), balanced_labels(900, 3, seed=2)
    tr, ev = partition(train, evaluation, scheme, num_clients=12, alpha=0.5, seed=7, min_size=2)
    assert len(tr) == len(ev) == 12
    assert_exact_cover(tr, 3000)
    assert_exact_cover(ev, 900)
    assert min(len(p) for p in tr) >= 2
    tr2, ev2 = partition(train, evaluation, scheme, num_clients=12, alpha=0.5, seed=7, min_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(tr + ev, tr2 + ev2))
    tr3, ev3 = partition(train, evaluation, scheme, num_clients=12, alpha=0.5, seed=8, min_size=2)
    assert not all(np.array_equal(a, b) for a, b in zip(tr, tr3))
    assert not all(np.array_equal(a, b) for a, b in zip(ev, ev3))


def test_paper_plan_shapes_and_sums():
    plan = paper_dirichlet_plan(num_clients=100, num_classes=3, alpha=1.0, size_alpha=5.0, seed=0)
    assert plan.size_fractions.shape == (100,) and plan.class_priors.shape == (100, 3)
    assert np.isclose(plan.size_fractions.sum(), 1.0)
    assert np.allclose(plan.class_priors.sum(axis=1), 1.0)
    # Dir(5) sizes vary but not wildly: every client well inside (0, 5/K).
    assert 0 < plan.size_fractions.min() and plan.size_fractions.max() < 0.05
    assert plan.size_fractions.std() > 0.001
    other = paper_dirichlet_plan(num_clients=100, num_classes=3, seed=1)
    assert not np.allclose(other.class_priors, plan.class_priors)


def test_apply_plan_sizes_follow_fractions():
    labels = balanced_labels(5000, 2)
    plan = paper_dirichlet_plan(20, 2, alpha=1.0, seed=3)
    parts = apply_plan(labels, plan, seed=0, min_size=0)
    assert_exact_cover(parts, 5000)
    sizes = np.array([len(p) for p in parts])
    assert np.abs(sizes - plan.size_fractions * 5000).max() < 1.0


def test_apply_plan_min_size_and_renormalisation():
    # Every client wants class 0 only, but half the examples are class 1: once class 0 runs out the
    # priors renormalise over class 1, and every client still gets its quota.
    labels = balanced_labels(400, 2)
    plan = PartitionPlan(np.array([0.7, 0.29, 0.005, 0.005]), np.tile([1.0, 0.0], (4, 1)))
    parts = apply_plan(labels, plan, seed=0, min_size=5)
    assert_exact_cover(parts, 400)
    assert [len(p) for p in parts] == [274, 116, 5, 5]
    # Clients are served in random order, so class 0 is spread over them, not given to client 0 alone.
    zeros = [int((labels[p] == 0).sum()) for p in parts]
    assert sum(zeros) == 200 and zeros[1] > 20


def test_apply_plan_rejects_bad_input():
    plan = paper_dirichlet_plan(5, 2, seed=0)
    with pytest.raises(DataError, match="labels must lie in"):
        apply_plan(np.array([0, 1, 2, 0, 1]), plan, seed=0)
    with pytest.raises(DataError, match="4 examples cannot give 5 clients at least 1"):
        apply_plan(np.array([0, 1, 0, 1]), plan, seed=0)


def test_apply_plan_empty_eval():
    parts = apply_plan(np.array([], dtype=np.int64), paper_dirichlet_plan(3, 2, seed=0), seed=0, min_size=0)
    assert [len(p) for p in parts] == [0, 0, 0]


@pytest.mark.parametrize("scheme", ["paper-dirichlet", "flwr-dirichlet"])
def test_small_alpha_skews_labels_more(scheme):
    labels = balanced_labels(4000, 4)
    skew = {}
    for alpha in (0.1, 10.0):
        parts, _ = partition(labels, labels[:100], scheme, num_clients=20, alpha=alpha, seed=0, min_size=2)
        skew[alpha] = max_class_share(labels, parts, 4)
    # IID would give ~0.25; alpha=10 stays close to it (0.31-0.36 over 15 seeds), alpha=0.1 concentrates
    # clients on one class (0.60-0.91; the paper scheme less so, as emptied classes renormalise priors).
    assert skew[10.0] < 0.42
    assert skew[0.1] > 0.55
    assert skew[0.1] - skew[10.0] > 0.2


@pytest.mark.parametrize("scheme", ["paper-dirichlet", "flwr-dirichlet"])
def test_eval_partition_follows_train_priors(scheme):
    train, evaluation = balanced_labels(6000, 2, seed=1), balanced_labels(3000, 2, seed=2)
    tr, ev = partition(train, evaluation, scheme, num_clients=20, alpha=0.5, seed=4, min_size=2)
    keep = [k for k in range(20) if len(ev[k]) >= 10]
    assert len(keep) >= 10
    train_share = [train[tr[k]].mean() for k in keep]
    eval_share = [evaluation[ev[k]].mean() for k in keep]
    assert np.corrcoef(train_share, eval_share)[0, 1] > 0.8
    # Sizes follow too: the big train clients are the big eval clients.
    assert np.corrcoef([len(p) for p in tr], [len(p) for p in ev])[0, 1] > 0.8


def test_iid_eval_is_not_skewed():
    train, evaluation = balanced_labels(6000, 2, seed=1), balanced_labels(3000, 2, seed=2)
    tr, ev = partition(train, evaluation, "iid", num_clients=20, alpha=0.5, seed=4)
    assert max_class_share(train, tr, 2) < 0.6 and max_class_share(evaluation, ev, 2) < 0.62


def test_flwr_dirichlet_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    labels = balanced_labels(500, 2)
    parts = flwr_dirichlet(labels, num_clients=8, alpha=1.0, seed=0, min_partition_size=5)
    assert len(parts) == 8 and min(len(p) for p in parts) >= 5
    assert_exact_cover(parts, 500)
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_flwr_dirichlet_impossible_minimum():
    with pytest.raises(DataError, match="could not give 8 clients >= 100"):
        flwr_dirichlet(balanced_labels(500, 2), num_clients=8, alpha=1.0, seed=0, min_partition_size=100)


def test_partition_needs_enough_train_examples():
    with pytest.raises(DataError, match="10 training examples cannot give 6 clients at least 2"):
        partition(np.zeros(10, dtype=np.int64), np.zeros(4, dtype=np.int64), "iid", 6, 1.0, 0, min_size=2)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(np.zeros(10, dtype=np.int64), np.zeros(4, dtype=np.int64), "shards", 2, 1.0, 0)

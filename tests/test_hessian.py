"""Hessian-vector products, Lanczos / SLQ on known spectra, and the ratio search (SPEC 2.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeptao.core import hessian
from fedpeptao.core.hessian import (
    estimate_ratio,
    hvp_fn,
    lanczos,
    search_ratio,
    slq_density,
    spectral_mass_above,
)


def known_matrix(eigenvalues: np.ndarray, seed: int = 0, rotate: bool = True) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal Q (or a signed permutation)."""
    rng = np.random.default_rng(seed)
    n = len(eigenvalues)
    if rotate:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    else:
        q = np.eye(n)[rng.permutation(n)] * rng.choice([-1.0, 1.0], size=n)
    return torch.from_numpy(q @ np.diag(eigenvalues) @ q.T)


def matvec(a: torch.Tensor):
    return lambda v: a @ v


SPECTRUM = np.concatenate([np.linspace(-0.5, -0.01, 6), np.linspace(0.02, 0.5, 20), np.linspace(1.0, 8.0, 14)])


def test_hvp_of_quadratic_is_a_times_v():
    a = known_matrix(np.linspace(-1, 3, 10), seed=3).to(torch.float64)
    x1 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def loss():
        x = torch.cat([x1.reshape(-1), x2])
        return 0.5 * x @ a @ x

    hvp = hvp_fn(loss, [x1, x2, unused])
    for seed in range(3):
        v = torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        got = hvp(v)
        torch.testing.assert_close(got[:10], a @ v[:10])
        torch.testing.assert_close(got[10:], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        hvp(torch.zeros(12, dtype=torch.float64))


def test_hvp_matches_autograd_hessian_and_keeps_v_dtype():
    x = torch.randn(5, requires_grad=True)
    w = torch.randn(5, 5)

    def loss():
        return torch.tanh(w @ x).pow(2).sum() + x.pow(4).sum() / 4

    hessian = torch.autograd.functional.hessian(lambda y: torch.tanh(w @ y).pow(2).sum() + y.pow(4).sum() / 4,
                                                x.detach())
    v = torch.randn(5, dtype=torch.float64)
    got = hvp_fn(loss, [x])(v)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, (hessian.double() @ v), rtol=1e-5, atol=1e-5)


def test_lanczos_with_full_iterations_recovers_every_eigenvalue():
    a = known_matrix(SPECTRUM, seed=1)
    nodes, weights = slq_density(matvec(a), 40, num_iters=40, seed=0)
    np.testing.assert_allclose(np.sort(nodes.numpy()), np.sort(SPECTRUM), atol=1e-6)
    assert abs(float(weights.sum()) - 1.0) < 1e-12
    assert torch.all(weights >= 0)


def test_lanczos_tridiagonal_is_consistent_and_stops_on_breakdown():
    a = known_matrix(SPECTRUM, seed=2)
    alphas, betas = lanczos(matvec(a), 40, 60, torch.Generator().manual_seed(0))
    assert len(alphas) == 40 and len(betas) == 39  # capped at dim
    trace = float(alphas.sum())
    assert abs(trace - SPECTRUM.sum()) < 1e-8  # T is similar to A after dim steps
    # Only 3 distinct eigenvalues: the Krylov space is invariant after 3 steps.
    a3 = known_matrix(np.repeat([1.0, 2.0, 5.0], [10, 10, 20]), seed=4)
    alphas, betas = lanczos(matvec(a3), 40, 30, torch.Generator().manual_seed(0))
    assert len(alphas) == 3 and len(betas) == 2
    nodes, weights = slq_density(matvec(a3), 40, num_iters=30)
    np.testing.assert_allclose(nodes.numpy(), [1.0, 2.0, 5.0], atol=1e-10)
    assert abs(float(weights.sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("threshold", [-0.2, 0.0, 0.3, 0.75, 4.0, 9.0])
def test_density_mass_matches_eigenvalue_fraction(threshold):
    # A signed permutation keeps the Rademacher probe's weight exactly 1/n on every eigenvector.
    a = known_matrix(SPECTRUM, seed=5, rotate=False)
    nodes, weights = slq_density(matvec(a), 40, num_iters=40, seed=3)
    exact = float(np.mean(SPECTRUM > threshold))
    assert spectral_mass_above(nodes, weights, threshold) == pytest.approx(exact, abs=1e-6)


def test_many_probes_average_to_the_eigenvalue_fraction():
    a = known_matrix(SPECTRUM, seed=6)
    # Fewer iterations than eigenvalues: Gauss quadrature of a step function plus probe noise, ~0.02.
    nodes, weights = slq_density(matvec(a), 40, num_iters=20, num_probes=400, seed=0)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for threshold in (0.0, 0.75, 4.0):
        assert spectral_mass_above(nodes, weights, threshold) == pytest.approx(float(np.mean(SPECTRUM > threshold)),
                                                                               abs=0.03)


def test_slq_through_hvp_fn_on_a_quadratic():
    eig = np.linspace(0.1, 2.0, 12)
    a = known_matrix(eig, seed=7)
    x = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    hvp = hvp_fn(lambda: 0.5 * x @ a @ x, [x])
    nodes, _ = slq_density(hvp, 12, num_iters=12)
    np.testing.assert_allclose(np.sort(nodes.numpy()), eig, atol=1e-8)


def test_smoothed_mass_counts_a_node_at_the_threshold_half():
    nodes, weights = torch.tensor([0.0, 2.0]), torch.tensor([0.5, 0.5])
    assert spectral_mass_above(nodes, weights, 0.0) == 0.5
    assert spectral_mass_above(nodes, weights, 0.0, sigma_squared=1e-6) == pytest.approx(0.75)
    assert spectral_mass_above(nodes, weights, 1.0, sigma_squared=1e-6) == pytest.approx(0.5)


@pytest.fixture
def thresholds(monkeypatch):
    """Record every threshold the search evaluates (on the sharp mass, ``sigma_squared=0.0``)."""
    seen: list[float] = []
    real = hessian.spectral_mass_above

    def spy(nodes, weights, threshold, **kwargs):
        seen.append(threshold)
        return real(nodes, weights, threshold, **kwargs)

    monkeypatch.setattr(hessian, "spectral_mass_above", spy)
    return seen


PLATEAU = (torch.tensor([0.05, 0.15, 0.25, 5.0], dtype=torch.float64),
           torch.tensor([0.25, 0.1, 0.05, 0.6], dtype=torch.float64))
SHARP = {"sigma_squared": 0.0}  # the walk rule on exact step values: r(t) = sum of weights above t


@pytest.mark.parametrize(("kwargs", "walk"), [
    # r(0)=1, r(.1)=.75, r(.2)=.65, r(.3)=.6, r(.4)=.6, r(.5)=.6, r(.6)=.6: four values within 0.005
    ({}, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
    ({"patience": 2}, [0.0, 0.1, 0.2, 0.3, 0.4]),  # stops at the first repeat
    ({"tol": 0.5}, [0.0, 0.1, 0.2, 0.3]),  # 1 -> .75 -> .65 -> .6 all change by < .5
    ({"tol": 0.11}, [0.0, 0.1, 0.2, 0.3, 0.4]),  # .75 -> .65 -> .6 -> .6
])
def test_search_ratio_plateau_without_halving(thresholds, kwargs, walk):
    assert search_ratio(*PLATEAU, **kwargs, **SHARP) == pytest.approx(0.6)
    assert thresholds == pytest.approx(walk)


def test_search_ratio_halves_the_step_when_mass_falls_below_half(thresholds):
    nodes, weights = torch.tensor([0.04, 0.08, 3.0]), torch.tensor([0.3, 0.4, 0.3])
    assert search_ratio(nodes, weights, **SHARP) == pytest.approx(1.0)
    assert thresholds == pytest.approx([
        0.0, 0.1,  # r: 1, .3 < 1/2 -> halve
        0.0, 0.05, 0.1,  # 1, .7, .3 -> halve
        0.0, 0.025, 0.05, 0.075, 0.1,  # 1, 1, .7, .7, .3 -> halve
        0.0, 0.0125, 0.025, 0.0375,  # 1, 1, 1, 1 -> stop
    ])
    thresholds.clear()
    # Half of r(start) is what counts: from t = .05, r = .7 and .3 < .35 still forces a halving.
    assert search_ratio(nodes, weights, start=0.05, step=0.01, **SHARP) == pytest.approx(0.7)
    assert thresholds == pytest.approx([0.05, 0.06, 0.07, 0.08, 0.05, 0.055, 0.06, 0.065])


def test_search_ratio_edge_cases():
    assert search_ratio(torch.tensor([-1.0, 0.0]), torch.tensor([0.5, 0.5]), **SHARP) == 0.0  # no mass above 0
    assert search_ratio(torch.tensor([-1.0, 10.0]), torch.tensor([0.4, 0.6]), **SHARP) == pytest.approx(0.6)
    with pytest.raises(RuntimeError):
        search_ratio(torch.tensor([0.04, 0.08, 3.0]), torch.tensor([0.3, 0.4, 0.3]), max_iters=5, **SHARP)
    with pytest.raises(RuntimeError):  # the reference density walks too: 5 evaluations cannot settle
        search_ratio(torch.tensor([0.04, 0.08, 3.0]), torch.tensor([0.3, 0.4, 0.3]), max_iters=5)
    with pytest.raises(ValueError):
        search_ratio(torch.tensor([1.0]), torch.tensor([1.0]), step=0.0)
    with pytest.raises(ValueError):
        hessian.reference_density(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))


# -- the reference's density procedure (llm-eff/FedPepTAO, decoder-only-gpt2/get_ratio.py) -----
# Ritz values and weights shaped like a MiniLM/MR prompt Hessian: a few large positive values,
# many near zero, a couple negative.
RITZ = np.array([-0.031, -0.004, 0.0002, 0.0011, 0.0019, 0.0035, 0.006, 0.011, 0.019, 0.042, 0.088, 0.17, 0.36, 0.95,
                 2.4])
RITZ_W = np.array([0.02, 0.05, 0.21, 0.14, 0.11, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02, 0.015, 0.005])
# A second run of the same client (n_v = 2): other extremes, so the grid is set by their means.
RITZ_2 = np.array([-0.052, -0.002, 0.0004, 0.0015, 0.0028, 0.005, 0.008, 0.013, 0.024, 0.05, 0.11, 0.2, 0.41, 1.3,
                   3.1])
RITZ_W2 = np.array([0.03, 0.04, 0.2, 0.15, 0.1, 0.1, 0.08, 0.07, 0.05, 0.05, 0.04, 0.04, 0.02, 0.02, 0.01])


def _np_gaussian(x, x0, sigma_squared):
    return np.exp(-(x0 - x) ** 2 / (2.0 * sigma_squared)) / np.sqrt(2 * np.pi * sigma_squared)


def np_density_generate(eigenvalues, weights, num_bins=10000, sigma_squared=1e-5, overhead=0.01):
    """get_ratio.py lines 10-40, transcribed: eigenvalues/weights are [n_v][iter] lists."""
    eigenvalues = np.array(eigenvalues)
    weights = np.array(weights)
    lambda_max = np.mean(np.max(eigenvalues, axis=1), axis=0) + overhead
    lambda_min = np.mean(np.min(eigenvalues, axis=1), axis=0) - overhead
    grids = np.linspace(lambda_min, lambda_max, num=num_bins)
    sigma = sigma_squared * max(1, (lambda_max - lambda_min))
    num_runs = eigenvalues.shape[0]
    density_output = np.zeros((num_runs, num_bins))
    for i in range(num_runs):
        for j in range(num_bins):
            density_output[i, j] = np.sum(_np_gaussian(eigenvalues[i, :], grids[j], sigma) * weights[i, :])
    density = np.mean(density_output, axis=0)
    density = density / (np.sum(density) * (grids[1] - grids[0]))
    return density, grids


def np_get_ratio(t, density, grids):
    """get_ratio.py lines 42-57 (its _density_generate call hoisted out: the result is the same each time)."""
    total = 0
    for i in range(len(grids - 1) - 1):
        if grids[i + 1] <= t:
            total += density[i] * (grids[i + 1] - grids[i])
    return 1 - total


def numpy_reference_ratio(eigenvalues, weights, imc_t=0.0) -> float:
    """get_ratio.py lines 85-103, transcribed: the threshold walk on the reference density."""
    density, grids = np_density_generate(eigenvalues, weights)
    inc = 0.1
    while True:
        t = imc_t
        ratios = []
        flag = False
        while True:
            ratio = np_get_ratio(t, density, grids)
            ratios.append(ratio)
            if ratio < ratios[0] / 2:
                break
            if len(ratios) >= 4:
                if abs(ratios[-1] - ratios[-2]) < 0.005 and abs(ratios[-2] - ratios[-3]) < 0.005 and \
                        abs(ratios[-3] - ratios[-4]) < 0.005:
                    flag = True
                    break
            t += inc
        if flag:
            break
        inc /= 2
    return ratios[-1]


def test_reference_density_integrates_to_one_on_its_grid():
    density, grid = hessian.reference_density(torch.tensor(RITZ), torch.tensor(RITZ_W))
    assert len(grid) == 10000 and grid[0] == RITZ.min() - 0.01 and grid[-1] == RITZ.max() + 0.01
    np.testing.assert_array_equal(grid.numpy(), np.linspace(RITZ.min() - 0.01, RITZ.max() + 0.01, 10000))
    assert float(density.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(density >= 0)
    expected, _ = np_density_generate([RITZ], [RITZ_W])
    np.testing.assert_allclose(density.numpy(), expected, rtol=1e-10, atol=1e-12)
    # Two runs: one averaged density, still of grid mass 1, on the grid of the mean extremes.
    density, grid = hessian.reference_density([torch.tensor(RITZ), torch.tensor(RITZ_2)],
                                              [torch.tensor(RITZ_W), torch.tensor(RITZ_W2)])
    assert float(density.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-12)
    assert float(grid[0]) == pytest.approx((RITZ.min() + RITZ_2.min()) / 2 - 0.01, abs=1e-15)
    assert float(grid[-1]) == pytest.approx((RITZ.max() + RITZ_2.max()) / 2 + 0.01, abs=1e-15)


def test_density_mass_above_is_the_references_right_edge_sum():
    density, grid = hessian.reference_density(torch.tensor(RITZ), torch.tensor(RITZ_W))
    dx = grid[1] - grid[0]
    # Bin i counts once grid[i+1] <= t; the last point's density never counts.
    assert hessian.density_mass_above(density, grid, float(grid[0])) == 1.0
    assert hessian.density_mass_above(density, grid, float(grid[1])) == pytest.approx(1 - float(density[0] * dx),
                                                                                      abs=1e-15)
    assert hessian.density_mass_above(density, grid, float(grid[-1]) + 1.0) == pytest.approx(
        float(density[-1] * dx), abs=1e-12)
    assert float(density[-1] * dx) > 1e-6  # the largest Ritz value's tail: not the 0 a full sum would give
    for t in (-0.02, 0.0, 0.003, 0.1, 0.37, 2.0):
        assert hessian.density_mass_above(density, grid, t) == pytest.approx(
            np_get_ratio(t, density.numpy(), grid.numpy()), abs=1e-12)


def test_ratio_matches_the_reference_density_procedure_on_fixed_ritz_values():
    expected = numpy_reference_ratio([RITZ], [RITZ_W])
    assert 0.0 < expected < 1.0
    assert hessian.reference_ratio(torch.tensor(RITZ), torch.tensor(RITZ_W)) == pytest.approx(expected, abs=1e-9)
    assert search_ratio(torch.tensor(RITZ), torch.tensor(RITZ_W)) == pytest.approx(expected, abs=1e-9)
    # the gridded, smoothed density is not the sharp mass above t that the search used before
    assert expected != pytest.approx(search_ratio(torch.tensor(RITZ), torch.tensor(RITZ_W), **SHARP), abs=1e-6)


def test_ratio_matches_the_reference_with_two_probes():
    runs = ([torch.tensor(RITZ), torch.tensor(RITZ_2)], [torch.tensor(RITZ_W), torch.tensor(RITZ_W2)])
    expected = numpy_reference_ratio([RITZ, RITZ_2], [RITZ_W, RITZ_W2])
    assert hessian.reference_ratio(*runs) == pytest.approx(expected, abs=1e-9)
    assert search_ratio(torch.stack(runs[0]), torch.stack(runs[1])) == pytest.approx(expected, abs=1e-9)
    # Pooling the runs into one Ritz set (grid over the pooled extremes) is a different density.
    pooled = search_ratio(torch.tensor(np.concatenate([RITZ, RITZ_2])), torch.tensor(np.concatenate([RITZ_W, RITZ_W2])))
    density_pooled, _ = hessian.reference_density(torch.tensor(np.concatenate([RITZ, RITZ_2])),
                                                  torch.tensor(np.concatenate([RITZ_W, RITZ_W2]) / 2))
    density_runs, _ = hessian.reference_density(*runs)
    assert not torch.allclose(density_pooled, density_runs)
    assert np.isfinite(pooled)


def test_estimate_ratio_averages_clients():
    # Diagonal-like matrices: weights are exactly 1/n, so each client's ratio is its plateau mass.
    spectrum_a = np.concatenate([-np.ones(5), np.full(15, 4.0)])  # r = 0.75
    spectrum_b = np.concatenate([-np.ones(15), np.linspace(2.0, 3.0, 5)])  # r = 0.25
    a = known_matrix(spectrum_a, seed=8, rotate=False)
    b = known_matrix(spectrum_b, seed=9, rotate=False)
    got = estimate_ratio([(matvec(a), 20), (matvec(b), 20)], num_iters=20)
    # the reference's density on each client's exact spectrum (distinct values, weight = share)
    expected = [numpy_reference_ratio([values], [counts / counts.sum()])
                for values, counts in (np.unique(spec, return_counts=True) for spec in (spectrum_a, spectrum_b))]
    assert got == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert got == pytest.approx(0.5, abs=0.01)  # the plateaus 0.75 and 0.25, up to the grid's cut-off tails
    with pytest.raises(ValueError):
        estimate_ratio([])


def test_estimate_ratio_with_several_probes_is_one_reference_density_per_client():
    a = known_matrix(SPECTRUM, seed=10)
    runs = hessian.slq_runs(matvec(a), 40, num_iters=12, num_probes=3, seed=5)
    assert len(runs) == 3 and all(len(n) == 12 and float(w.sum()) == pytest.approx(1.0, abs=1e-12) for n, w in runs)
    expected = numpy_reference_ratio([n.numpy() for n, _ in runs], [w.numpy() for _, w in runs])
    got = estimate_ratio([(matvec(a), 40)], num_iters=12, seed=5, num_probes=3)
    assert got == pytest.approx(expected, abs=1e-9)
    # slq_density is the same runs pooled, weights / num_probes
    nodes, weights = slq_density(matvec(a), 40, num_iters=12, num_probes=3, seed=5)
    torch.testing.assert_close(nodes, torch.cat([n for n, _ in runs]))
    torch.testing.assert_close(weights, torch.cat([w / 3 for _, w in runs]))


def test_lanczos_lockstep_runs_each_client_as_lanczos_alone():
    """Several clients' runs in lockstep (one call for every unfinished client's product): each
    gives exactly its solo tridiagonal, also when one breaks down early."""
    few = known_matrix(np.repeat([1.0, 2.0, 5.0], [10, 10, 10]), seed=4)  # invariant after 3 steps
    matrices = [known_matrix(SPECTRUM[:30], seed=1), few, known_matrix(SPECTRUM[10:], seed=2)]
    calls = []

    def many(vectors):
        calls.append(sum(v is not None for v in vectors))
        return [None if v is None else m @ v for m, v in zip(matrices, vectors)]

    together = hessian.lanczos_lockstep(many, 30, 12, [torch.Generator().manual_seed(s) for s in (0, 1, 2)])
    for m, seed, (alphas, betas) in zip(matrices, (0, 1, 2), together):
        alone = lanczos(matvec(m), 30, 12, torch.Generator().manual_seed(seed))
        assert torch.equal(alone[0], alphas) and torch.equal(alone[1], betas)
    assert len(together[1][0]) < 12 and len(calls) == 12 and calls[-1] == 2  # the 3-eigenvalue run stopped early

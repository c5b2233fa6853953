"""How many layers to share: the Hessian eigenvalue density of the prompt loss (SPEC section 2, step 2).

After the all-layer warm-up, a client's loss Hessian ``H`` w.r.t. its prompt parameters says how
many directions still have curvature. Stochastic Lanczos quadrature (SLQ) approximates the spectral
density of ``H`` from ``m`` Hessian-vector products: Lanczos on a random unit probe ``v`` builds the
tridiagonal ``T = V^T H V``; the eigenvalues ``theta_i`` of ``T`` (Ritz values) are the quadrature
nodes and the squared first components ``tau_i^2`` of its eigenvectors the weights, so that
``v^T f(H) v ~= sum_i tau_i^2 f(theta_i)``. The ratio ``r`` follows the authors' code
(llm-eff/FedPepTAO, ``decoder-only-gpt2/get_ratio.py``, identical in the RoBERTa and LLaMA folders)
step by step: the Ritz sets become a gridded, Gaussian-smoothed density (:func:`reference_density`,
their ``_density_generate``), ``r(t)`` is one minus its grid mass up to ``t``
(:func:`density_mass_above`, their ``_get_ratio``), and :func:`search_ratio` walks ``t`` up from 0
as their ``get_ratio`` does. Several clients' ratios are averaged (:func:`estimate_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]


def hvp_fn(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Hvp:
    """Hessian-vector products ``v -> H v`` on the flattened, concatenated ``params``.

    ``loss_fn`` is called once, here; its gradient is built with ``create_graph=True`` and every
    product is one more backward pass through that graph (double backward), which stays alive as
    long as the returned function does. Call it with the model in eval mode so the operator is a
    fixed symmetric matrix. The product comes back in ``v``'s dtype and device; parameters the
    loss does not depend on (or only linearly) get zero rows.
    """
    params = list(params)
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("hvp_fn needs a non-empty list of tensors that require grad")
    sizes = [p.numel() for p in params]
    dim = sum(sizes)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if tuple(v.shape) != (dim,):
            raise ValueError(f"expected a vector of shape ({dim},), got {tuple(v.shape)}")
        if not live:
            return torch.zeros_like(v)
        chunks = v.split(sizes)
        products = torch.autograd.grad(
            [grads[i] for i in live], params,
            grad_outputs=[chunks[i].reshape(params[i].shape).to(grads[i]) for i in live],
            retain_graph=True, allow_unused=True,
        )
        return torch.cat([(torch.zeros(s) if h is None else h.detach().reshape(-1)).to(v) for h, s in zip(products, sizes)])

    return hvp


def lanczos(hvp: Hvp, dim: int, num_iters: int, generator: torch.Generator, *,
            dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos tridiagonalisation from a Rademacher probe: diagonal ``alphas [m]``, off-diagonal ``betas [m-1]``.

    Every new vector is re-orthogonalised against all previous ones (two Gram-Schmidt passes), so
    the Ritz values carry no spurious copies. ``m <= min(num_iters, dim)``: the iteration stops
    early on breakdown (``beta <= sqrt(eps) * ||T||``), i.e. when the Krylov space is invariant
    and the quadrature for this probe is already exact. Basis vectors live in ``dtype``/``device``
    (float64 on the CPU by default: ``num_iters * dim`` numbers); the returned tensors are float64
    on the CPU.
    """
    return lanczos_lockstep(one_client(hvp), dim, num_iters, [generator], dtype=dtype, device=device)[0]


#: Hessian-vector products of several clients at once: ``vectors[k]`` is client ``k``'s vector, or
#: None when nothing is asked of it; returns the products in the same places.
HvpLockstep = Callable[[Sequence[torch.Tensor | None]], Sequence[torch.Tensor | None]]


def one_client(hvp: Hvp) -> HvpLockstep:
    """One client's products as the several-client form the lockstep functions call."""
    return lambda vectors: [None if v is None else hvp(v) for v in vectors]


def lanczos_lockstep(hvps: HvpLockstep, dim: int, num_iters: int, generators: Sequence[torch.Generator], *,
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lanczos` for several clients in lockstep, client ``k`` from ``generators[k]``: each
    iteration asks ``hvps`` for every unfinished client's product at once (one shared pass
    over the backbone where the clients' Hessians come from one batched loss), and each client's
    run is exactly what :func:`lanczos` alone would compute from the same products."""
    runs = [_LanczosRun(dim, num_iters, generator, dtype, device) for generator in generators]
    while any(not run.done for run in runs):
        products = hvps([None if run.done else run.vector for run in runs])
        for run, product in zip(runs, products):
            if not run.done:
                run.advance(product)
    return [run.result() for run in runs]


class _LanczosRun:
    """One probe's Lanczos iteration, advanced one Hessian-vector product at a time."""

    def __init__(self, dim: int, num_iters: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        if dim < 1 or num_iters < 1:
            raise ValueError(f"need dim >= 1 and num_iters >= 1, got dim={dim}, num_iters={num_iters}")
        self.steps = min(num_iters, dim)
        probe = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
        vector = (2 * probe - 1).to(device=device, dtype=dtype)
        self.vector = vector / vector.norm()
        self.basis = torch.empty(self.steps, dim, dtype=dtype, device=self.vector.device)
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.tol = math.sqrt(torch.finfo(dtype).eps)
        self.tiny = torch.finfo(dtype).tiny
        self.done = False

    def advance(self, product: torch.Tensor) -> None:
        """Take ``H v`` for the current vector ``v``: one more diagonal entry, and the next vector
        unless the run is complete or has broken down."""
        j, v = len(self.alphas), self.vector
        self.basis[j] = v
        w = product.to(dtype=v.dtype, device=v.device)
        alpha = torch.dot(w, v)
        w = w - alpha * v
        if j > 0:
            w = w - self.betas[-1] * self.basis[j - 1]
        for _ in range(2):  # full reorthogonalisation, "twice is enough"
            w = w - self.basis[: j + 1].T @ (self.basis[: j + 1] @ w)
        self.alphas.append(float(alpha))
        if j == self.steps - 1:
            self.done = True
            return
        beta = float(w.norm())
        scale = max(abs(a) for a in self.alphas) + max(self.betas, default=0.0)
        if beta <= self.tol * max(scale, self.tiny):
            self.done = True
            return
        self.betas.append(beta)
        self.vector = w / beta

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.alphas, dtype=torch.float64), torch.tensor(self.betas, dtype=torch.float64)


def slq_runs(hvp: Hvp, dim: int, num_iters: int = 50, num_probes: int = 1, seed: int = 0, *,
             dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(nodes, weights)`` Ritz set per probe (float64 1-D tensors; each probe's weights sum to 1).

    This is what the reference's ``hessian.density(iter, n_v)`` returns
    (``decoder-only-gpt2/my_pyhessian/hessian.py`` lines 193-268): one list of Ritz values and one of
    squared first eigenvector components per SLQ run. The runs are kept apart because the reference's
    density grid is built from the *mean of the per-run* extremes (:func:`reference_density`).
    """
    return slq_runs_lockstep(one_client(hvp), dim, num_iters, num_probes, [seed], dtype=dtype, device=device)[0]


def slq_runs_lockstep(hvps: HvpLockstep, dim: int, num_iters: int, num_probes: int, seeds: Sequence[int], *,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                  ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`slq_runs` of several clients (client ``k`` draws its probes from ``seeds[k]``), their
    Lanczos iterations in lockstep (:func:`lanczos_lockstep`)."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    runs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in seeds]
    for _ in range(num_probes):
        for own, (alphas, betas) in zip(runs, lanczos_lockstep(hvps, dim, num_iters, generators,
                                                           dtype=dtype, device=device)):
            tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
            nodes, vectors = torch.linalg.eigh(tridiagonal)
            own.append((nodes, vectors[0] ** 2))
    return runs


def slq_density(hvp: Hvp, dim: int, num_iters: int = 50, num_probes: int = 1, seed: int = 0, *,
                dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature, pooled: Ritz values (nodes) and their weights, float64 1-D tensors.

    The runs of :func:`slq_runs` concatenated, each probe's weights divided by ``num_probes``, so the
    returned weights sum to 1 and describe the probe-averaged density. Handy for quadrature
    (``sum_i w_i f(theta_i)``); the ratio itself uses the runs kept apart, as the reference does.
    """
    runs = slq_runs(hvp, dim, num_iters, num_probes, seed, dtype=dtype, device=device)
    return torch.cat([n for n, _ in runs]), torch.cat([w / num_probes for _, w in runs])


def spectral_mass_above(nodes: torch.Tensor, weights: torch.Tensor, threshold: float, *,
                        sigma_squared: float = 0.0) -> float:
    """Mass of the quadrature density strictly above ``threshold``: ``sum_i w_i [theta_i > t]``.

    A diagnostic (e.g. to check SLQ against a known spectrum), not what the ratio uses: the
    reference evaluates a gridded Gaussian density (:func:`reference_density`,
    :func:`density_mass_above`). With ``sigma_squared > 0`` each node is a Gaussian of that
    variance instead, integrated in closed form, so a node at the threshold counts half.
    """
    nodes = torch.as_tensor(nodes, dtype=torch.float64).reshape(-1)
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} differ in shape")
    if sigma_squared < 0:
        raise ValueError(f"sigma_squared must be >= 0, got {sigma_squared}")
    if sigma_squared == 0:
        return float(weights[nodes > threshold].sum())
    above = 0.5 * torch.special.erfc((threshold - nodes) / math.sqrt(2.0 * sigma_squared))
    return float((weights * above).sum())


# The constants of the reference's _density_generate (decoder-only-gpt2/get_ratio.py line 10).
GRID_POINTS = 10_000  # num_bins
GRID_MARGIN = 0.01  # overhead: the grid spans [mean of run minima - 0.01, mean of run maxima + 0.01]
BASE_VARIANCE = 1e-5  # sigma_squared, scaled by max(1, lambda_max - lambda_min) (margins included)

Runs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _as_runs(nodes: torch.Tensor | Sequence[torch.Tensor],
             weights: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``nodes``/``weights`` as a list of float64 1-D runs: a 1-D tensor is one run, a 2-D tensor or a
    sequence of 1-D tensors one run per row / item (runs may differ in length, e.g. after an early
    Lanczos breakdown; the reference's ``np.array`` would need them equal)."""
    def split(x):
        if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
            x = torch.as_tensor(x, dtype=torch.float64)
            return [x.reshape(-1)] if x.dim() <= 1 else list(x.reshape(x.shape[0], -1))
        return [torch.as_tensor(r, dtype=torch.float64).reshape(-1) for r in x]

    node_runs, weight_runs = split(nodes), split(weights)
    if len(node_runs) != len(weight_runs) or not node_runs or any(
            n.shape != w.shape or n.numel() == 0 for n, w in zip(node_runs, weight_runs)):
        raise ValueError("nodes and weights must hold the same non-empty runs of equal lengths")
    return list(zip(node_runs, weight_runs))


def reference_density(nodes: torch.Tensor | Sequence[torch.Tensor],
                      weights: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigen-density exactly as llm-eff/FedPepTAO computes it (``decoder-only-gpt2/get_ratio.py``
    lines 10-40, ``_density_generate``); returns ``(density, grid)``, float64.

    ``lambda_max`` / ``lambda_min`` are the *mean over runs* of each run's largest / smallest Ritz
    value, plus / minus 0.01 (lines 23-24); the grid is ``np.linspace(lambda_min, lambda_max,
    10000)`` (line 26, built here with NumPy's formula ``start + i * step``, last point = stop, so
    threshold comparisons fall on the same side); every Ritz value carries a Gaussian of variance
    ``1e-5 * max(1, lambda_max - lambda_min)`` (line 27) times its weight; the runs' densities are
    averaged (line 37) and the result divided by ``sum(density) * (grid[1] - grid[0])`` (lines
    38-39), so its Riemann sum on the grid is 1. One run (the reference's ``n_v=1``) is a 1-D pair.
    The reference's Ritz values come from float32 ``torch.eig``; here everything is float64.
    """
    runs = _as_runs(nodes, weights)
    high = sum(float(n.max()) for n, _ in runs) / len(runs) + GRID_MARGIN
    low = sum(float(n.min()) for n, _ in runs) / len(runs) - GRID_MARGIN
    step = (high - low) / (GRID_POINTS - 1)
    grid = torch.arange(GRID_POINTS, dtype=torch.float64) * step + low
    grid[-1] = high
    variance = BASE_VARIANCE * max(1.0, high - low)
    density = torch.zeros(GRID_POINTS, dtype=torch.float64)
    for run_nodes, run_weights in runs:
        gauss = torch.exp(-(grid[:, None] - run_nodes[None, :]) ** 2 / (2.0 * variance)) \
            / math.sqrt(2 * math.pi * variance)
        density += gauss @ run_weights
    density = density / len(runs)
    density = density / (density.sum() * (grid[1] - grid[0]))
    return density, grid


def density_mass_above(density: torch.Tensor, grid: torch.Tensor, threshold: float) -> float:
    """The reference's ``_get_ratio`` (``decoder-only-gpt2/get_ratio.py`` lines 42-57): one minus the
    grid mass up to ``threshold``, summed as the reference does, ``sum_{i < n-1, grid[i+1] <= t}
    density[i] * (grid[i+1] - grid[i])``: a left Riemann sum whose bin ``i`` counts only once its
    right edge ``grid[i+1]`` is ``<= t``, and the last grid point's density never counts. So the
    ratio is exactly 1 for ``t < grid[1]`` and ``density[-1] * (grid[-1] - grid[-2])`` (not 0)
    for ``t >= grid[-1]``.
    """
    inside = grid[1:] <= threshold
    return float(1.0 - (density[:-1][inside] * torch.diff(grid)[inside]).sum())


def reference_ratio(nodes: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Sequence[torch.Tensor],
                    **search: float) -> float:
    """The share ratio as the reference's ``get_ratio`` finds it (``decoder-only-gpt2/get_ratio.py``
    lines 59-103): :func:`search_ratio`'s threshold walk on :func:`density_mass_above` of
    :func:`reference_density` (one density per client, however many probes)."""
    density, grid = reference_density(nodes, weights)
    return search_ratio(nodes, weights, mass=lambda t: density_mass_above(density, grid, t), **search)


def search_ratio(nodes: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | Sequence[torch.Tensor],
                 start: float = 0.0, step: float = 0.1, tol: float = 0.005, patience: int = 4,
                 max_iters: int = 10_000, *, sigma_squared: float | None = None,
                 mass: Callable[[float], float] | None = None) -> float:
    """The reference's step-halving threshold walk; returns the ratio ``r``.

    Exact rule (``decoder-only-gpt2/get_ratio.py`` lines 85-103, with ``imc_t = 0.0``, ``inc = 0.1``):
    walk ``t = start, start + step, start + 2 step, ...`` recording ``r(t)``. If a value falls
    strictly below half the first value of this walk, ``r(start) / 2``, halve ``step`` and restart
    the walk from ``start``. Otherwise, once the walk holds at least ``patience`` (4) values and the
    last ``patience - 1`` consecutive differences are all ``< tol`` (0.005), it returns the last
    value. So ``r`` is the mass above the first plateau of the density's tail that is still at least
    half the mass above ``start``. ``max_iters`` bounds the evaluations of ``r`` in total (the
    reference has no bound); exceeding it raises ``RuntimeError`` rather than returning an
    unconverged ratio.

    ``r(t)`` is, by default (``sigma_squared=None``), the reference's gridded density
    (:func:`reference_density`, :func:`density_mass_above`), so ``search_ratio(nodes, weights)`` is
    the reference's ratio. ``sigma_squared=0.0`` walks the sharp quadrature mass and ``> 0`` its
    closed-form Gaussian smoothing (:func:`spectral_mass_above`; one run only); ``mass`` replaces
    ``r(t)`` altogether.
    """
    if step <= 0 or tol <= 0 or patience < 2:
        raise ValueError(f"need step > 0, tol > 0 and patience >= 2, got {step}, {tol}, {patience}")
    if mass is None:
        if sigma_squared is None:
            density, grid = reference_density(nodes, weights)

            def mass(t: float) -> float:
                return density_mass_above(density, grid, t)
        else:
            def mass(t: float) -> float:
                return spectral_mass_above(nodes, weights, t, sigma_squared=sigma_squared)

    evaluations = 0
    while True:
        t, walk = start, []
        while True:
            if evaluations >= max_iters:
                raise RuntimeError(f"ratio search did not converge in {max_iters} evaluations (step now {step})")
            walk.append(mass(t))
            evaluations += 1
            if walk[-1] < walk[0] / 2:
                break
            recent = walk[-patience:]
            if len(recent) == patience and all(abs(a - b) < tol for a, b in zip(recent, recent[1:])):
                return walk[-1]
            t += step
        step /= 2


def estimate_ratio(hvps: Sequence[tuple[Hvp, int]], num_iters: int = 50, seed: int = 0, *,
                   num_probes: int = 1, sigma_squared: float | None = None,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> float:
    """The share ratio end to end: per client, ``num_probes`` SLQ runs of ``num_iters`` Lanczos steps
    (the reference's ``hessian_comp.density(iter=50, n_v=1)``, ``get_ratio.py`` line 84), one
    reference density over those runs and its threshold walk (:func:`ratio_of_runs`); the clients'
    ratios are then averaged, as the reference averages its per-client rates
    (``decoder-only-gpt2/run_getpr_perclient.py`` lines 229-240). ``hvps`` holds one ``(hvp, dim)``
    pair per client; client ``i`` draws its probes from seed ``seed + i``. ``sigma_squared`` (not the
    reference) walks the sharp (``0.0``) or closed-form smoothed (``> 0``) mass of the pooled runs.
    """
    if len(hvps) == 0:
        raise ValueError("estimate_ratio needs at least one client's Hessian-vector product")
    ratios = [ratio_of_runs(slq_runs(hvp, dim, num_iters, num_probes, seed + index, dtype=dtype, device=device),
                            sigma_squared)
              for index, (hvp, dim) in enumerate(hvps)]
    return sum(ratios) / len(ratios)


def ratio_of_runs(runs: Runs, sigma_squared: float | None = None) -> float:
    """One client's ratio from its SLQ runs (:func:`slq_runs`): the reference density over the runs
    and its threshold walk, or (``sigma_squared`` set) the walk on the pooled runs' mass."""
    if sigma_squared is None:
        return reference_ratio([n for n, _ in runs], [w for _, w in runs])
    nodes = torch.cat([n for n, _ in runs])
    weights = torch.cat([w / len(runs) for _, w in runs])
    return search_ratio(nodes, weights, sigma_squared=sigma_squared)

"""How many layers to share: the Hessian eigenvalue density of the prompt loss (SPEC section 2, step 2).

After the all-layer warm-up, a client's loss Hessian ``H`` w.r.t. its prompt parameters says how
many directions still have curvature. Stochastic Lanczos quadrature (SLQ) approximates the spectral
density of ``H`` from ``m`` Hessian-vector products: Lanczos on a random unit probe ``v`` builds the
tridiagonal ``T = V^T H V``; the eigenvalues ``theta_i`` of ``T`` (Ritz values) are the quadrature
nodes and the squared first components ``tau_i^2`` of its eigenvectors the weights, so that
``v^T f(H) v ~= sum_i tau_i^2 f(theta_i)``. The ratio ``r`` is the density's mass above a threshold
found by :func:`search_ratio` on the gridded, Gaussian-smoothed density the reference code builds
(:func:`reference_density`).
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
    if dim < 1 or num_iters < 1:
        raise ValueError(f"need dim >= 1 and num_iters >= 1, got dim={dim}, num_iters={num_iters}")
    steps = min(num_iters, dim)
    probe = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
    v = (2 * probe - 1).to(device=device, dtype=dtype)
    v = v / v.norm()
    basis = torch.empty(steps, dim, dtype=dtype, device=v.device)
    alphas: list[float] = []
    betas: list[float] = []
    tol = math.sqrt(torch.finfo(dtype).eps)
    for j in range(steps):
        basis[j] = v
        w = hvp(v).to(dtype=dtype, device=v.device)
        alpha = torch.dot(w, v)
        w = w - alpha * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):  # full reorthogonalisation, "twice is enough"
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(float(alpha))
        if j == steps - 1:
            break
        beta = float(w.norm())
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if beta <= tol * max(scale, torch.finfo(dtype).tiny):
            break
        betas.append(beta)
        v = w / beta
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def slq_density(hvp: Hvp, dim: int, num_iters: int = 50, num_probes: int = 1, seed: int = 0, *,
                dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature: Ritz values (nodes) and their weights, float64 1-D tensors.

    One Lanczos run per probe; the nodes of all probes are concatenated and each probe's weights
    (squared first eigenvector components of its ``T``, summing to 1) are divided by
    ``num_probes``, so the returned weights sum to 1 and describe the averaged density.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    generator = torch.Generator().manual_seed(seed)
    all_nodes, all_weights = [], []
    for _ in range(num_probes):
        alphas, betas = lanczos(hvp, dim, num_iters, generator, dtype=dtype, device=device)
        tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        nodes, vectors = torch.linalg.eigh(tridiagonal)
        all_nodes.append(nodes)
        all_weights.append(vectors[0] ** 2 / num_probes)
    return torch.cat(all_nodes), torch.cat(all_weights)


def spectral_mass_above(nodes: torch.Tensor, weights: torch.Tensor, threshold: float, *,
                        sigma_squared: float = 0.0) -> float:
    """Mass of the density strictly above ``threshold``: ``sum_i w_i [theta_i > t]``.

    With ``sigma_squared > 0`` each node is a Gaussian of that variance instead (as in the
    reference, which smooths with variance ``1e-5 * max(1, lambda_max - lambda_min)``), so a node at
    the threshold counts half.
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


GRID_POINTS = 10_000  # the reference's num_bins
GRID_MARGIN = 0.01  # its overhead: the grid spans [min - 0.01, max + 0.01]
BASE_VARIANCE = 1e-5  # its sigma_squared, scaled by max(1, range)


def reference_density(nodes: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigen-density as llm-eff/FedPepTAO computes it (``decoder-only-gpt2/get_ratio.py``,
    ``_density_generate``): a Gaussian of variance ``1e-5 * max(1, range)`` on every Ritz value,
    weighted, evaluated on a 10,000-point grid over ``[min - 0.01, max + 0.01]`` and normalised so
    that its Riemann sum on that grid is 1. Returns ``(density, grid)``, float64.
    """
    nodes = torch.as_tensor(nodes, dtype=torch.float64).reshape(-1)
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if nodes.shape != weights.shape or nodes.numel() == 0:
        raise ValueError(f"nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} must be equal, non-empty")
    high, low = float(nodes.max()) + GRID_MARGIN, float(nodes.min()) - GRID_MARGIN
    grid = torch.linspace(low, high, GRID_POINTS, dtype=torch.float64)
    variance = BASE_VARIANCE * max(1.0, high - low)
    gauss = torch.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2.0 * variance)) / math.sqrt(2 * math.pi * variance)
    density = gauss @ weights
    density = density / (density.sum() * (grid[1] - grid[0]))
    return density, grid


def density_mass_above(density: torch.Tensor, grid: torch.Tensor, threshold: float) -> float:
    """The reference's ``_get_ratio``: one minus the density's grid mass at points ``<= threshold``."""
    return float(1.0 - density[grid <= threshold].sum() * (grid[1] - grid[0]))


def reference_ratio(nodes: torch.Tensor, weights: torch.Tensor, **search: float) -> float:
    """The ratio of SPEC 2.2 as the reference finds it: :func:`search_ratio`'s threshold walk on
    :func:`density_mass_above` of :func:`reference_density`."""
    density, grid = reference_density(nodes, weights)
    return search_ratio(nodes, weights, mass=lambda t: density_mass_above(density, grid, t), **search)


def search_ratio(nodes: torch.Tensor, weights: torch.Tensor, start: float = 0.0, step: float = 0.1,
                 tol: float = 0.005, patience: int = 4, max_iters: int = 10_000, *,
                 sigma_squared: float = 0.0, mass: Callable[[float], float] | None = None) -> float:
    """Step-halving threshold search of SPEC 2.2; returns the ratio ``r``.

    Exact rule (the reference's ``get_ratio``): with ``r(t)`` = :func:`spectral_mass_above`, walk
    ``t = start, start + step, start + 2 step, ...`` recording ``r(t)``. If a value falls strictly
    below half the first value of this walk, ``r(start) / 2``, halve ``step`` and restart the walk
    from ``start``. The search ends when the last ``patience`` values of the current walk (i.e.
    ``patience - 1`` consecutive differences) all change by less than ``tol``; it returns the last
    value. So ``r`` is the mass above the first plateau of the density's tail that is still at
    least half the mass above ``start``. ``max_iters`` bounds the evaluations of ``r`` in total;
    exceeding it raises ``RuntimeError`` rather than returning an unconverged ratio. ``mass``
    replaces ``r(t)`` (:func:`reference_ratio` passes the reference's gridded density).
    """
    if mass is None:
        def mass(t: float) -> float:
            return spectral_mass_above(nodes, weights, t, sigma_squared=sigma_squared)

    if step <= 0 or tol <= 0 or patience < 2:
        raise ValueError(f"need step > 0, tol > 0 and patience >= 2, got {step}, {tol}, {patience}")
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
                   num_probes: int = 1, sigma_squared: float = 0.0,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> float:
    """SPEC 2.2 end to end: each client's SLQ density (the reference's, :func:`reference_density`;
    with ``sigma_squared > 0`` the closed-form smoothed mass instead), its searched ratio, averaged
    over clients. ``hvps`` holds one ``(hvp, dim)`` pair per client; client ``i`` draws its probes
    from seed ``seed + i``.
    """
    if len(hvps) == 0:
        raise ValueError("estimate_ratio needs at least one client's Hessian-vector product")
    ratios = []
    for index, (hvp, dim) in enumerate(hvps):
        nodes, weights = slq_density(hvp, dim, num_iters, num_probes, seed + index, dtype=dtype, device=device)
        ratios.append(search_ratio(nodes, weights, sigma_squared=sigma_squared) if sigma_squared > 0
                      else reference_ratio(nodes, weights))
    return sum(ratios) / len(ratios)

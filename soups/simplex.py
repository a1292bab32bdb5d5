"""Points on the probability simplex Δ_N = {λ ∈ R^N : λ_i ≥ 0, Σ_i λ_i = 1}.

The interpolation coefficients of a soup live on Δ_N. This module gives the regular (Das–Dennis) grid with
step 1/k, uniform (Dirichlet) samples, the vertices (the experts themselves) and the centroid (the uniform
soup). Rows are ordered so that for N = 2 the second coordinate increases: the grid for N = 2, k = 10 is
[[1, 0], [0.9, 0.1], ..., [0, 1]], i.e. θ_λ = (1 − λ) θ_1 + λ θ_2 with λ ∈ {0, 0.1, ..., 1}.

The grid itself (`num_grid_points`, `simplex_grid`, `simplex_grid_counts`) lives in `evals.simplex` and is
re-exported here: the front metrics in `evals` need it too, and `evals` sits below the engine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evals.simplex import check_dim as _check_dim
from evals.simplex import num_grid_points, simplex_grid, simplex_grid_counts
from soups.utils import SoupsError

__all__ = [
    "centroid",
    "dirichlet_samples",
    "interpolation_grid",
    "num_grid_points",
    "simplex_grid",
    "simplex_grid_counts",
    "vertices",
]


def interpolation_grid(n_points: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Grid for two experts from a number of points: rows [1 − λ, λ] with λ = 0, 1/(P−1), ..., 1.

    Args:
        n_points: Number of points P ≥ 2 (11 gives λ ∈ {0, 0.1, ..., 1}).
        dtype: Floating dtype of the result.

    Returns:
        Tensor[P, 2], equal to `simplex_grid(2, n_points - 1)`.
    """
    if not isinstance(n_points, int) or isinstance(n_points, bool) or n_points < 2:
        raise SoupsError(f"interpolation grid needs n_points >= 2, got {n_points!r}")
    return simplex_grid(2, n_points - 1, dtype=dtype)


def dirichlet_samples(
    n: int, num: int, seed: int, alpha: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Samples from a symmetric Dirichlet(α) on Δ_n; α = 1 is the uniform distribution on the simplex.

    Uses numpy's `Generator.dirichlet` with its own seeded generator, so the global RNG state is untouched
    and the same seed always gives the same points.

    Args:
        n: Dimension of the simplex.
        num: Number of samples.
        seed: Seed of the generator.
        alpha: Concentration (> 0). 1 is uniform; larger values concentrate near the centroid.
        dtype: Floating dtype of the result.

    Returns:
        Tensor[num, n] of non-negative rows summing to 1.
    """
    _check_dim(n)
    if num < 0:
        raise SoupsError(f"number of Dirichlet samples num={num} must be >= 0")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise SoupsError(f"Dirichlet concentration alpha={alpha} must be a positive finite number")
    rng = np.random.default_rng(seed)
    if n == 1:
        return torch.ones(num, 1, dtype=dtype)
    samples = rng.dirichlet(np.full(n, float(alpha)), size=num)
    return torch.from_numpy(samples).to(dtype)


def vertices(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The n vertices of Δ_n (each expert alone).

    Returns:
        Tensor[n, n], the identity matrix.
    """
    _check_dim(n)
    return torch.eye(n, dtype=dtype)


def centroid(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The centroid of Δ_n (the uniform soup).

    Returns:
        Tensor[n] filled with 1/n.
    """
    _check_dim(n)
    return torch.full((n,), 1.0 / n, dtype=dtype)

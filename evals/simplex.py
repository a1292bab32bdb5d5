"""The regular (Das–Dennis) grid on the probability simplex Δ_N = {λ ∈ R^N : λ_i ≥ 0, Σ_i λ_i = 1}.

Owned by `evals` because a metric needs it (`evals.pareto.expected_utility` averages over a grid of weight
vectors) and `evals` must not import the engine; `soups.simplex` re-exports these functions beside its samplers.
Rows are ordered so that for N = 2 the second coordinate increases: the grid for N = 2, k = 10 is
[[1, 0], [0.9, 0.1], ..., [0, 1]].

The grid is written here rather than taken from pymoo (`get_reference_directions("das-dennis")`) because it
is a ten-line integer enumeration, pymoo is not a dependency, and pymoo returns floats built by repeated
division whereas here every coordinate is the correctly rounded value of an exact fraction c_i / k (the
integer numerators are available from `simplex_grid_counts`).
"""

from __future__ import annotations

import math

import torch

from evals.errors import SoupsError

__all__ = ["check_dim", "num_grid_points", "simplex_grid", "simplex_grid_counts"]


def check_dim(n: int) -> None:
    """Raises `SoupsError` unless `n` (a simplex dimension) is a positive integer."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SoupsError(f"simplex dimension n={n!r} must be a positive integer")


def num_grid_points(n: int, k: int) -> int:
    """Number of points of the Das–Dennis grid: C(k + n − 1, n − 1).

    Args:
        n: Dimension of the simplex (number of experts / objectives).
        k: Number of divisions (step 1/k).

    Returns:
        The number of rows of `simplex_grid(n, k)`.
    """
    check_dim(n)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise SoupsError(f"simplex grid divisions k={k!r} must be a non-negative integer")
    return math.comb(k + n - 1, n - 1)


def simplex_grid_counts(n: int, k: int) -> torch.Tensor:
    """Integer numerators c of the Das–Dennis grid: every c ∈ N^n with Σ_i c_i = k.

    Args:
        n: Dimension of the simplex.
        k: Number of divisions. k = 0 is allowed only for n = 1 (the single point [1]).

    Returns:
        Tensor[P, n] of int64, P = C(k + n − 1, n − 1), each row summing exactly to k, ordered
        lexicographically by decreasing first coordinate (so for n = 2 the second coordinate increases).
    """
    count = num_grid_points(n, k)
    if k == 0 and n > 1:
        raise SoupsError(f"simplex grid with k=0 divisions is empty for n={n}; use k >= 1")
    rows: list[list[int]] = []

    def fill(prefix: list[int], remaining: int, slots: int) -> None:
        if slots == 1:
            rows.append(prefix + [remaining])
            return
        for first in range(remaining, -1, -1):
            fill(prefix + [first], remaining - first, slots - 1)

    fill([], k, n)
    counts = torch.tensor(rows, dtype=torch.int64).reshape(-1, n)
    assert counts.shape[0] == count  # C(k + n − 1, n − 1) by stars and bars
    return counts


def simplex_grid(n: int, k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The regular Das–Dennis grid on Δ_n with step 1/k.

    Args:
        n: Dimension of the simplex (number of experts).
        k: Number of divisions; coordinates are multiples of 1/k.
        dtype: Floating dtype of the result (float64 keeps 0.1 as the nearest double to 1/10).

    Returns:
        Tensor[P, n] with P = C(k + n − 1, n − 1); entry (p, i) is c_pi / k for the integer numerators of
        `simplex_grid_counts`, so rows sum to 1 up to rounding of each fraction.
    """
    counts = simplex_grid_counts(n, k)
    return counts.to(torch.float64).div(k).to(dtype)

"""Front metrics for multi-objective evaluation, all for MAXIMISATION (higher reward is better).

Points are rows: `points[P, K]` holds K objective values for each of P models (e.g. the rewards of each
interpolated soup). Functions accept a torch Tensor, a numpy array or nested lists; `non_dominated` returns
the same kind it was given, the scalar metrics return Python floats.

Hypervolume uses moocore (exact; O(n log n) in 2-D/3-D, HV4D+ and dimension sweep above) when it is
importable, negating nothing: moocore is called with `maximise=True`. A pure numpy fallback,
`hypervolume_exact`, is kept so that the core of Soups works without moocore (it is a dev/optional
dependency with a C extension that may not build everywhere). The fallback is the recursive
"hypervolume by slicing objectives" (HSO) algorithm with non-dominated filtering at every level: exact in any
dimension, O(n^(K−1) log n) in the worst case, which is fine for the fronts of a λ sweep (tens to hundreds of
points) but not for thousands of points in K ≥ 4; it is tested against moocore to 1e-9.

Other metrics follow morl-baselines' definitions (IGD, sparsity, expected utility, cardinality), written
here because morl-baselines pulls in wandb and gymnasium. `lmc_gaps` is the linear-mode-connectivity check of
Hypothesis 6.1 in the rewarded-soups chapter of the thesis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from evals.errors import SoupsError
from evals.simplex import simplex_grid

__all__ = [
    "cardinality",
    "expected_utility",
    "hypervolume",
    "hypervolume_exact",
    "igd",
    "lmc_gaps",
    "lmc_holds",
    "non_dominated",
    "non_dominated_indices",
    "normalize_init_worst",
    "normalize_minmax",
    "sparsity",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


# ----------------------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str, ndim: int) -> np.ndarray:
    """Converts a tensor / array / list to a float64 numpy array of `ndim` dims with finite entries."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().to(torch.float64).numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise SoupsError(f"{name} is not a numeric array: {err}") from err
    if arr.ndim == 1 and ndim == 2 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != ndim:
        raise SoupsError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise SoupsError(f"{name} contains NaN or infinite values")
    return arr


def _points_and_reference(points: ArrayLike, reference: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pts = _to_numpy(points, "points", 2)
    ref = _to_numpy(reference, "reference", 1)
    if pts.shape[0] and pts.shape[1] != ref.shape[0]:
        raise SoupsError(f"points have {pts.shape[1]} objectives but reference has {ref.shape[0]}")
    return pts, ref


# ----------------------------------------------------------------------------------------------------------
# Non-dominated filtering
# ----------------------------------------------------------------------------------------------------------


def _non_dominated_mask(pts: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Mask of rows not dominated by any other row, keeping only the first copy of duplicates.

    q dominates p (maximisation) iff q ≥ p in every objective and q > p in at least one.

    Args:
        pts: Array[P, K].
        chunk: Rows compared at once (bounds memory at chunk × P × K booleans).

    Returns:
        Array[P] of bool.
    """
    n = pts.shape[0]
    keep = np.ones(n, dtype=bool)
    for start in range(0, n, chunk):
        block = pts[start : start + chunk]  # [b, K]
        geq = np.all(pts[None, :, :] >= block[:, None, :], axis=-1)  # [b, P]: pts[j] >= block[i]
        gt = np.any(pts[None, :, :] > block[:, None, :], axis=-1)  # [b, P]
        keep[start : start + chunk] = ~np.any(geq & gt, axis=1)
    # Deduplicate: among identical surviving rows keep the first occurrence.
    _, first = np.unique(pts, axis=0, return_index=True)
    unique_mask = np.zeros(n, dtype=bool)
    unique_mask[first] = True
    return keep & unique_mask


def non_dominated_indices(points: ArrayLike) -> np.ndarray:
    """Indices of the non-dominated rows (maximisation), one index per distinct point.

    Args:
        points: [P, K] objective values.

    Returns:
        Array[F] of int64 row indices in increasing order; for duplicated points only the first index.
    """
    pts = _to_numpy(points, "points", 2)
    if pts.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(_non_dominated_mask(pts)).astype(np.int64)


def non_dominated(points: ArrayLike) -> torch.Tensor | np.ndarray:
    """The Pareto front (maximisation) of a set of points, without duplicates.

    Args:
        points: [P, K] objective values.

    Returns:
        [F, K] rows of `points` that no other row dominates, in their original order; a Tensor if `points`
        is a Tensor (same dtype and device), otherwise a float64 numpy array.
    """
    idx = non_dominated_indices(points)
    if isinstance(points, torch.Tensor):
        return points[torch.as_tensor(idx, device=points.device)]
    return _to_numpy(points, "points", 2)[idx]


# ----------------------------------------------------------------------------------------------------------
# Hypervolume
# ----------------------------------------------------------------------------------------------------------


def _hv_2d(pts: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by pts[n, 2] (all strictly dominating ref): sweep on x, decreasing, vectorised.

    With x sorted decreasingly and Y_i = max(y_1..y_i) (the running best height), point i adds the strip
    [ref_x, x_i] × [Y_{i−1}, Y_i]; dominated points add a strip of height 0.
    """
    order = np.argsort(-pts[:, 0], kind="stable")
    x, y = pts[order, 0], pts[order, 1]
    best = np.maximum.accumulate(y)
    heights = np.diff(best, prepend=ref[1])
    return float(np.sum((x - ref[0]) * heights))


def _hv_slicing(pts: np.ndarray, ref: np.ndarray) -> float:
    """HSO recursion on the last objective. pts[n, K] all strictly dominate ref[K]."""
    n, k = pts.shape
    if n == 0:
        return 0.0
    if k == 1:
        return float(pts[:, 0].max() - ref[0])
    if k == 2:
        return _hv_2d(pts, ref)
    pts = pts[np.argsort(-pts[:, -1], kind="stable")]
    volume = 0.0
    for i in range(n):
        upper = pts[i, -1]
        lower = pts[i + 1, -1] if i + 1 < n else ref[-1]
        if upper > lower:  # the slab (lower, upper] of the last objective is covered by pts[: i + 1]
            section = pts[: i + 1, :-1]
            if k > 3:  # the 2-D sweep handles dominated points itself
                section = section[_non_dominated_mask(section)]
            volume += (upper - lower) * _hv_slicing(section, ref[:-1])
    return float(volume)


def hypervolume_exact(points: ArrayLike, reference: ArrayLike) -> float:
    """Exact dominated hypervolume (maximisation) in pure numpy, by recursive slicing (HSO).

    The fallback of `hypervolume` when moocore is missing; see the module docstring for its cost.

    Args:
        points: [P, K] objective values.
        reference: [K] reference point; only points strictly better than it in every objective count.

    Returns:
        The Lebesgue measure of ∪_p [reference, p] over the counted points (0.0 if none).
    """
    pts, ref = _points_and_reference(points, reference)
    if pts.shape[0] == 0:
        return 0.0
    pts = pts[np.all(pts > ref, axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    return _hv_slicing(pts[_non_dominated_mask(pts)], ref)


def hypervolume(points: ArrayLike, reference: ArrayLike) -> float:
    """Exact dominated hypervolume (maximisation) of `points` with respect to `reference`.

    Example: {(1, 3), (2, 2), (3, 1)} w.r.t. (0, 0) has hypervolume 6 (three stacked strips 1×3 + 1×2 + 1×1).

    Args:
        points: [P, K] objective values, K ≥ 1.
        reference: [K] reference point (record it with the result, it changes the value); only points that
            strictly dominate it (better in every objective) count.

    Returns:
        The hypervolume as a float (0.0 when no point dominates the reference). Uses moocore when
        importable, otherwise `hypervolume_exact`.
    """
    pts, ref = _points_and_reference(points, reference)
    if pts.shape[0] == 0:
        return 0.0
    pts = pts[np.all(pts > ref, axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    try:
        import moocore
    except ImportError:
        return _hv_slicing(pts[_non_dominated_mask(pts)], ref)
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


# ----------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------


def normalize_minmax(
    points: ArrayLike, lower: ArrayLike | None = None, upper: ArrayLike | None = None
) -> np.ndarray:
    """Per-objective min–max scaling: (v − lower) / (upper − lower).

    Args:
        points: [P, K] objective values.
        lower: [K] value mapped to 0 (default: the per-objective minimum of `points`).
        upper: [K] value mapped to 1 (default: the per-objective maximum of `points`).

    Returns:
        Array[P, K] of float64.
    """
    pts = _to_numpy(points, "points", 2)
    lo = pts.min(axis=0) if lower is None else _to_numpy(lower, "lower", 1)
    hi = pts.max(axis=0) if upper is None else _to_numpy(upper, "upper", 1)
    span = hi - lo
    if lo.shape != (pts.shape[1],) or hi.shape != (pts.shape[1],):
        raise SoupsError(f"lower/upper must have {pts.shape[1]} entries, got {lo.shape[0]} and {hi.shape[0]}")
    bad = np.flatnonzero(span == 0)
    if bad.size:
        raise SoupsError(f"cannot min-max normalise objective {int(bad[0])}: its range is zero")
    return (pts - lo) / span


def normalize_init_worst(points: ArrayLike, init: ArrayLike, worst: ArrayLike) -> np.ndarray:
    """The rewarded-soups normalisation (thesis Fig. 6.4): the initialisation maps to 1, the worst model to 0.

    r̃_k = (r_k − worst_k) / (init_k − worst_k).

    Args:
        points: [P, K] rewards.
        init: [K] rewards of the initial (shared) model.
        worst: [K] rewards of the worst model, per objective.

    Returns:
        Array[P, K] of float64.
    """
    pts = _to_numpy(points, "points", 2)
    ini = _to_numpy(init, "init", 1)
    wor = _to_numpy(worst, "worst", 1)
    if ini.shape != (pts.shape[1],) or wor.shape != (pts.shape[1],):
        raise SoupsError(f"init and worst must have {pts.shape[1]} entries, got {ini.shape[0]} and {wor.shape[0]}")
    bad = np.flatnonzero(ini == wor)
    if bad.size:
        raise SoupsError(f"cannot normalise objective {int(bad[0])}: init equals worst ({ini[bad[0]]})")
    return (pts - wor) / (ini - wor)


# ----------------------------------------------------------------------------------------------------------
# Front quality indicators
# ----------------------------------------------------------------------------------------------------------


def igd(front: ArrayLike, reference_front: ArrayLike) -> float:
    """Inverted generational distance: mean over reference points of the Euclidean distance to the front.

    IGD = (1/|R|) Σ_{r ∈ R} min_{v ∈ F} ‖r − v‖₂ (lower is better; 0 when F covers R).

    Args:
        front: [F, K] points of the evaluated front.
        reference_front: [R, K] points of the reference (e.g. true or best-known) front.

    Returns:
        The IGD as a float.
    """
    f = _to_numpy(front, "front", 2)
    r = _to_numpy(reference_front, "reference_front", 2)
    if f.shape[0] == 0 or r.shape[0] == 0:
        raise SoupsError(f"IGD needs non-empty fronts, got {f.shape[0]} and {r.shape[0]} points")
    if f.shape[1] != r.shape[1]:
        raise SoupsError(f"front has {f.shape[1]} objectives but reference_front has {r.shape[1]}")
    dists = np.linalg.norm(r[:, None, :] - f[None, :, :], axis=-1)  # [R, F]
    return float(dists.min(axis=1).mean())


def expected_utility(front: ArrayLike, weights: ArrayLike | None = None, k: int = 10) -> float:
    """Expected utility (EUM): mean over simplex weights w of max over the front of wᵀv.

    Args:
        front: [F, K] objective values.
        weights: [W, K] weight vectors; default the Das–Dennis grid `simplex_grid(K, k)`.
        k: Divisions of the default grid (k = 10 gives 11 weights for K = 2).

    Returns:
        (1/W) Σ_w max_v wᵀv as a float.
    """
    f = _to_numpy(front, "front", 2)
    if f.shape[0] == 0:
        raise SoupsError("expected utility of an empty front is undefined")
    w = simplex_grid(f.shape[1], k).numpy() if weights is None else _to_numpy(weights, "weights", 2)
    if w.shape[1] != f.shape[1]:
        raise SoupsError(f"weights have {w.shape[1]} entries but the front has {f.shape[1]} objectives")
    return float((w @ f.T).max(axis=1).mean())


def sparsity(front: ArrayLike) -> float:
    """Sparsity of a front (morl-baselines): mean squared gap between sorted neighbours, summed over objectives.

    S = 1/(F − 1) Σ_k Σ_{i=1}^{F−1} (ṽ_k[i] − ṽ_k[i−1])², ṽ_k the sorted k-th objective. Lower is denser.

    Args:
        front: [F, K] objective values (usually the non-dominated set).

    Returns:
        The sparsity; 0.0 for fewer than two points.
    """
    f = _to_numpy(front, "front", 2)
    if f.shape[0] < 2:
        return 0.0
    gaps = np.diff(np.sort(f, axis=0), axis=0)  # [F − 1, K]
    return float((gaps**2).sum() / (f.shape[0] - 1))


def cardinality(points: ArrayLike) -> int:
    """Number of distinct non-dominated points.

    Args:
        points: [P, K] objective values.

    Returns:
        |non_dominated(points)|.
    """
    return int(non_dominated_indices(points).shape[0])


# ----------------------------------------------------------------------------------------------------------
# Linear mode connectivity (Hypothesis 6.1)
# ----------------------------------------------------------------------------------------------------------


def lmc_gaps(lambdas: ArrayLike, soup_rewards: ArrayLike, expert_rewards: ArrayLike) -> torch.Tensor:
    """LMC gaps: R_k(θ_λ) − Σ_i λ_i R_k(θ_i) for every coefficient vector λ and objective k.

    Hypothesis 6.1 holds at λ where every gap is ≥ 0 (the soup is above the line / plane of the experts).

    Args:
        lambdas: [P, N] interpolation coefficients (rows on the simplex).
        soup_rewards: [P, K] rewards of the soups θ_λ = Σ_i λ_i θ_i.
        expert_rewards: [N, K] rewards of the experts θ_i.

    Returns:
        Tensor[P, K] of float64.
    """
    lam = _to_numpy(lambdas, "lambdas", 2)
    soup = _to_numpy(soup_rewards, "soup_rewards", 2)
    expert = _to_numpy(expert_rewards, "expert_rewards", 2)
    if lam.shape[0] != soup.shape[0]:
        raise SoupsError(f"lambdas has {lam.shape[0]} rows but soup_rewards has {soup.shape[0]}")
    if lam.shape[1] != expert.shape[0]:
        raise SoupsError(f"lambdas has {lam.shape[1]} coefficients but expert_rewards has {expert.shape[0]} experts")
    if soup.shape[1] != expert.shape[1]:
        raise SoupsError(f"soup_rewards has {soup.shape[1]} objectives but expert_rewards has {expert.shape[1]}")
    return torch.from_numpy(soup - lam @ expert)


def lmc_holds(gaps: ArrayLike, atol: float = 0.0) -> torch.Tensor:
    """Where Hypothesis 6.1 holds: every objective's gap ≥ −atol.

    Args:
        gaps: [P, K] output of `lmc_gaps`.
        atol: Tolerance for evaluation noise (0 = the strict hypothesis).

    Returns:
        Tensor[P] of bool.
    """
    g = _to_numpy(gaps, "gaps", 2)
    return torch.from_numpy(np.all(g >= -atol, axis=1))

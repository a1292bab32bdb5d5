"""Diversity of an ensemble's members: oracle (correct / wrong) pair statistics, prediction spread, features.

Definitions follow the thesis §2.3.3.1 and the design-diversity paper (methods.md §4). For two members p, q,
N^{ab} counts the samples where p is correct (a = 1) or wrong (a = 0) and q is correct (b = 1) or wrong
(b = 0). Pairwise measures are averaged over the M(M − 1)/2 pairs.

- ratio-error (N^{01} + N^{10}) / N^{00} (Aksela 2003; higher = more diverse);
- Q-statistic Q = (N^{11}N^{00} − N^{01}N^{10}) / (N^{11}N^{00} + N^{01}N^{10}) and Q-diversity 1 − Q
  = 2N^{01}N^{10} / (N^{11}N^{00} + N^{01}N^{10}) (thesis);
- correlation ρ = (N^{11}N^{00} − N^{01}N^{10}) / √((N^{11}+N^{10})(N^{01}+N^{00})(N^{11}+N^{01})(N^{10}+N^{00}));
- `disagreement` is the ORACLE disagreement (N^{01} + N^{10}) / N of Kuncheva and the design-diversity paper
  (Eq. 4): the fraction of samples where exactly one of the two is correct. `prediction_disagreement` is the
  torch-uncertainty variant: the fraction of (sample, pair) where the two argmax predictions differ, which also
  counts two members that are wrong in different ways. Both are returned by `evaluate_ensemble`.

Undefined pairs: a pair whose measure has a zero denominator (e.g. Q and ρ when a member is always right) is
left out of the average (NaN when every pair is undefined). For the ratio-error, N^{00} = 0 with some
asynchronous error gives +inf for that pair (and the mean), 0/0 is left out as above.

Other measures:
- #unique (SED): mean over samples of the number of distinct argmax predictions among the M members;
- Shannon equitability (design diversity, Eq. 5): per sample, E = −Σ_i p_i ln p_i / ln S where p_i is the
  share of members predicting class i and S = min(M, C) is the largest number of classes M members can predict
  (so E ∈ [0, 1]); averaged over the samples selected by a mask (the paper splits correct / wrong samples);
- Kohavi–Wolpert variance (Kuncheva & Whitaker 2003): KW = 1/(N M²) Σ_n l_n (M − l_n), l_n the number of
  members correct on sample n;
- linear CKA (Kornblith et al. 2019) between two members' features, CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on
  column-centred X, Y; CKAC = 1 − CKA;
- ensemble gain Y = acc(ensemble) − acc(best member).

None of these is in torchmetrics or scikit-learn (torch-uncertainty has only the prediction disagreement and
pulls in a large stack), so they are written here as short vectorised functions.
"""

from __future__ import annotations

import math

import torch

from evals.errors import SoupsError

__all__ = [
    "correctness",
    "correlation",
    "disagreement",
    "ensemble_gain",
    "kohavi_wolpert_variance",
    "linear_cka",
    "num_unique",
    "pairwise_counts",
    "pairwise_linear_cka",
    "prediction_disagreement",
    "q_diversity",
    "q_statistic",
    "ratio_error",
    "shannon_equitability",
]


# ----------------------------------------------------------------------------------------------------------
# Input checking and oracle counts
# ----------------------------------------------------------------------------------------------------------


def _check_preds(preds: torch.Tensor, labels: torch.Tensor | None = None, min_members: int = 2) -> None:
    if not isinstance(preds, torch.Tensor) or preds.ndim != 2:
        shape = tuple(preds.shape) if isinstance(preds, torch.Tensor) else type(preds).__name__
        raise SoupsError(f"member predictions must be a Tensor[M, B] of class indices, got {shape}")
    if preds.is_floating_point():
        raise SoupsError(f"member predictions must be integer class indices, got dtype {preds.dtype}")
    if preds.shape[0] < min_members:
        raise SoupsError(f"diversity needs at least {min_members} members, got M={preds.shape[0]}")
    if preds.shape[1] == 0:
        raise SoupsError("member predictions have no samples (B=0)")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != preds.shape[1]):
        raise SoupsError(f"labels must be a Tensor[B={preds.shape[1]}], got shape {tuple(labels.shape)}")


def correctness(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which member is right on which sample.

    Args:
        preds: Tensor[M, B] predicted class per member and sample.
        labels: Tensor[B] true classes.

    Returns:
        Tensor[M, B] of bool.
    """
    _check_preds(preds, labels, min_members=1)
    return preds == labels.to(preds.device)[None, :]


def pairwise_counts(correct: torch.Tensor) -> torch.Tensor:
    """Oracle counts of every pair p < q.

    Args:
        correct: Tensor[M, B] of bool, from `correctness`.

    Returns:
        Tensor[M(M − 1)/2, 4] of float64 with columns N^{11}, N^{10}, N^{01}, N^{00} (first index: member p),
        pairs in `torch.triu_indices` order.
    """
    c = correct.to(torch.float64)
    w = 1.0 - c
    p, q = torch.triu_indices(c.shape[0], c.shape[0], offset=1)
    n11 = c @ c.T  # [M, M]: both right
    n10 = c @ w.T  # p right, q wrong
    n01 = w @ c.T
    n00 = w @ w.T
    return torch.stack([n11[p, q], n10[p, q], n01[p, q], n00[p, q]], dim=1)


def _mean_defined(values: torch.Tensor) -> float:
    """Mean over pairs, ignoring NaN (undefined) pairs; NaN if none is defined."""
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


# ----------------------------------------------------------------------------------------------------------
# Pairwise oracle measures
# ----------------------------------------------------------------------------------------------------------


def ratio_error(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise ratio-error (N^{01} + N^{10}) / N^{00}.

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        labels: Tensor[B] true classes.

    Returns:
        The mean over pairs (+inf if a pair has asynchronous errors but no simultaneous one).
    """
    _check_preds(preds, labels)
    counts = pairwise_counts(correctness(preds, labels))
    asynchronous, simultaneous = counts[:, 1] + counts[:, 2], counts[:, 3]
    return _mean_defined(asynchronous / simultaneous)  # x/0 = inf, 0/0 = nan (left out)


def q_statistic(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise Yule's Q-statistic (1 = same errors, 0 = independent, −1 = opposite errors).

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        labels: Tensor[B] true classes.

    Returns:
        (N^{11}N^{00} − N^{01}N^{10}) / (N^{11}N^{00} + N^{01}N^{10}) averaged over defined pairs.
    """
    _check_preds(preds, labels)
    n11, n10, n01, n00 = pairwise_counts(correctness(preds, labels)).unbind(1)
    same, crossed = n11 * n00, n01 * n10
    return _mean_defined((same - crossed) / (same + crossed))


def q_diversity(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise Q-diversity 2N^{01}N^{10} / (N^{11}N^{00} + N^{01}N^{10}) = 1 − Q (thesis §2.3.3.1).

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        labels: Tensor[B] true classes.

    Returns:
        1 − `q_statistic` (higher = more diverse), in [0, 2].
    """
    return 1.0 - q_statistic(preds, labels)


def correlation(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise correlation ρ of the members' correctness (the φ coefficient of the oracle outputs).

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        labels: Tensor[B] true classes.

    Returns:
        ρ averaged over defined pairs (a member always right or always wrong makes its pairs undefined).
    """
    _check_preds(preds, labels)
    n11, n10, n01, n00 = pairwise_counts(correctness(preds, labels)).unbind(1)
    denominator = torch.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    return _mean_defined((n11 * n00 - n01 * n10) / denominator)


def disagreement(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise ORACLE disagreement (N^{01} + N^{10}) / N: exactly one of the two members is right.

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        labels: Tensor[B] true classes.

    Returns:
        A value in [0, 1].
    """
    _check_preds(preds, labels)
    counts = pairwise_counts(correctness(preds, labels))
    return float(((counts[:, 1] + counts[:, 2]) / preds.shape[1]).mean())


def prediction_disagreement(preds: torch.Tensor) -> float:
    """Mean pairwise PREDICTION disagreement: the fraction of samples where the two argmax classes differ.

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.

    Returns:
        A value in [0, 1] (torch-uncertainty's `Disagreement`); no labels needed.
    """
    _check_preds(preds)
    p, q = torch.triu_indices(preds.shape[0], preds.shape[0], offset=1)
    return float((preds[p] != preds[q]).to(torch.float64).mean())


# ----------------------------------------------------------------------------------------------------------
# Non-pairwise measures
# ----------------------------------------------------------------------------------------------------------


def _class_counts(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Tensor[B, C]: how many members predict each class on each sample."""
    if int(preds.min()) < 0 or int(preds.max()) >= num_classes:
        low, high = int(preds.min()), int(preds.max())
        raise SoupsError(f"predicted classes must lie in [0, {num_classes}), got {low}..{high}")
    counts = torch.zeros(preds.shape[1], num_classes, dtype=torch.float64, device=preds.device)
    return counts.scatter_add_(1, preds.T.long(), torch.ones_like(preds.T, dtype=torch.float64))


def num_unique(preds: torch.Tensor) -> float:
    """#unique (SED): the mean number of distinct predicted classes among the members, per sample.

    Args:
        preds: Tensor[M, B] predicted classes.

    Returns:
        A value in [1, min(M, C)]; 1 when all members always agree.
    """
    _check_preds(preds, min_members=1)
    ordered = preds.sort(dim=0).values  # [M, B]
    distinct = 1 + (ordered[1:] != ordered[:-1]).sum(dim=0)  # [B]
    return float(distinct.to(torch.float64).mean())


def shannon_equitability(preds: torch.Tensor, num_classes: int, mask: torch.Tensor | None = None) -> float:
    """Mean per-sample Shannon equitability of the members' predicted classes.

    E_n = −Σ_i p_ni ln p_ni / ln S, p_ni the share of members predicting class i on sample n, S = min(M, C).

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        num_classes: C ≥ 2.
        mask: Optional Tensor[B] of bool selecting samples (e.g. where the ensemble is right, or wrong).

    Returns:
        The mean of E_n over the selected samples, in [0, 1]; NaN if the mask selects none.
    """
    _check_preds(preds)
    if num_classes < 2:
        raise SoupsError(f"Shannon equitability needs num_classes >= 2, got {num_classes}")
    shares = _class_counts(preds, num_classes) / preds.shape[0]  # [B, C]
    entropy = -torch.special.xlogy(shares, shares).sum(dim=1)  # [B], 0 log 0 = 0
    equitability = entropy / math.log(min(preds.shape[0], num_classes))
    if mask is not None:
        if mask.shape != (preds.shape[1],) or mask.dtype != torch.bool:
            raise SoupsError(f"mask must be a bool Tensor[B={preds.shape[1]}], got {mask.dtype} {tuple(mask.shape)}")
        equitability = equitability[mask.to(equitability.device)]
    return float(equitability.mean()) if equitability.numel() else math.nan


def kohavi_wolpert_variance(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Kohavi–Wolpert variance 1/(N M²) Σ_n l_n (M − l_n), l_n = number of members right on sample n.

    Args:
        preds: Tensor[M, B] predicted classes, M ≥ 2.
        labels: Tensor[B] true classes.

    Returns:
        A value in [0, 1/4]; 0 when the members are all right or all wrong on every sample.
    """
    _check_preds(preds, labels)
    m = preds.shape[0]
    right = correctness(preds, labels).to(torch.float64).sum(dim=0)  # [B]
    return float((right * (m - right)).mean() / m**2)


def ensemble_gain(ensemble_preds: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Ensemble gain Y = acc(ensemble) − max_m acc(member m).

    Args:
        ensemble_preds: Tensor[B] the ensemble's predicted classes.
        preds: Tensor[M, B] the members' predicted classes.
        labels: Tensor[B] true classes.

    Returns:
        The gain in accuracy (fraction, not percent); negative when the best member beats the ensemble.
    """
    _check_preds(preds, labels, min_members=1)
    if ensemble_preds.shape != labels.shape:
        got, expected = tuple(ensemble_preds.shape), tuple(labels.shape)
        raise SoupsError(f"ensemble predictions have shape {got}, expected {expected}")
    labels = labels.to(preds.device)
    ensemble_acc = (ensemble_preds.to(preds.device) == labels).to(torch.float64).mean()
    best_member = correctness(preds, labels).to(torch.float64).mean(dim=1).max()
    return float(ensemble_acc - best_member)


# ----------------------------------------------------------------------------------------------------------
# Feature similarity
# ----------------------------------------------------------------------------------------------------------


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two feature matrices of the same samples (Kornblith et al. 2019, Eq. 5).

    Args:
        x: Tensor[B, D1] features of member p.
        y: Tensor[B, D2] features of member q.

    Returns:
        ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X, Y, in [0, 1]; invariant to orthogonal maps and
        isotropic scaling. NaN if a feature matrix is constant.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        got = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise SoupsError(f"CKA needs features [B, D1] and [B, D2] for the same B, got {got}")
    x = x.to(torch.float64)
    y = y.to(device=x.device, dtype=torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if float(norm) > 0 else math.nan


def pairwise_linear_cka(features: torch.Tensor) -> float:
    """Mean linear CKA over the M(M − 1)/2 pairs of members; CKAC (diversity) is 1 minus this.

    Args:
        features: Tensor[M, B, D] features of each member on the same B samples (flatten spatial dims first).

    Returns:
        The mean CKA over pairs.
    """
    if features.ndim != 3 or features.shape[0] < 2:
        raise SoupsError(f"pairwise CKA needs features Tensor[M>=2, B, D], got shape {tuple(features.shape)}")
    m = features.shape[0]
    values = [linear_cka(features[p], features[q]) for p in range(m) for q in range(p + 1, m)]
    return _mean_defined(torch.tensor(values, dtype=torch.float64))

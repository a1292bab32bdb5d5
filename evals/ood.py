"""Out-of-distribution detection: uncertainty scores of an ensemble and the detection metrics.

Convention: every score here is an OOD score, HIGHER = MORE LIKELY OOD, so that the detection metrics can
treat OOD as the positive class (methods.md §6). Confidences (MSP, max logit, η_BMA, minmax) are negated.

Scores, for member logits z^m (Tensor[M, B, C], M = 1 for a single model), member probabilities
p^m = softmax(z^m), the ensemble's predictive distribution p̄ (mean of p^m, or softmax of the mean logits;
see `combine`) and mean logits z̄ = (1/M) Σ_m z^m:
- `msp`: −max_c p̄_c (maximum softmax probability, Hendrycks & Gimpel 2017);
- `max_logit`: −(1/M) Σ_m max_c z^m_c, each member's max logit, averaged (score averaging);
- `energy`: −logsumexp_c z̄_c (the free energy at T = 1; Liu et al. 2020);
- `entropy`: H(p̄) = −Σ_c p̄_c ln p̄_c (total uncertainty);
- `mutual_information`: H(p̄) − (1/M) Σ_m H(p^m) with p̄ the mean probability (epistemic part), computed as
  (1/M) Σ_m KL(p^m ‖ p̄) so that it is exactly 0 for identical members (and M = 1);
- `bma`: −η_BMA, η_BMA = max_c (1/M) Σ_m p^m_c (SED); equal to `msp` when `combine="probs"`;
- `pds`: η_PDS = (1/C) Σ_c max_m p^m_c (SED's predictive diversity score; for one-hot members it is the number
  of distinct predicted classes over C);
- `logit_avg`: −max_c z̄_c, SDDE's averaged-logit score U_avg (logits averaged BEFORE the max, unlike `max_logit`);
- `minmax`: −min_m max_c z^m_c (SDDE: the least confident member's max logit);
- `maxstd`: max_c std_m z^m_c, the largest spread of a class logit across members (SDDE; population std, 0 for
  M = 1). The SDDE summary names this score without a formula; this is our reading of it.

Detection metrics, OOD positive: AUROC (torchmetrics `binary_auroc`), AUPR = average precision (torchmetrics
`binary_average_precision`, equal to scikit-learn's `average_precision_score`) and FPR at 95% TPR: the fraction
of in-distribution samples scored at or above the highest threshold that flags ≥ 95% of the OOD samples
(torchmetrics `binary_roc`, first ROC point with TPR ≥ 0.95, as scikit-learn's `roc_curve`). Scores are
replaced by their dense ranks before torchmetrics sees them: these metrics depend only on the order, and
torchmetrics would otherwise squash scores outside [0, 1] through a float32 sigmoid, creating false ties.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

from evals.errors import SoupsError

__all__ = [
    "OOD_SCORES",
    "aupr",
    "auroc",
    "detection_metrics",
    "ensemble_distribution",
    "fpr_at_95_tpr",
    "ood_scores",
]

OOD_SCORES = (
    "msp",
    "max_logit",
    "energy",
    "entropy",
    "mutual_information",
    "bma",
    "pds",
    "logit_avg",
    "minmax",
    "maxstd",
)


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SoupsError(f"{name} must be a Tensor[M, B, C] (members, samples, classes), got {shape}")
    if min(logits.shape) == 0:
        raise SoupsError(f"{name} has an empty dimension: shape {tuple(logits.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise SoupsError(f"{name} contains NaN or infinite values")


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H = −Σ_c p_c ln p_c over the last dim, from log-probabilities (0 ln 0 = 0)."""
    return -(log_probs.exp() * log_probs).nan_to_num(0.0).sum(dim=-1)


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """log((1/M) Σ_m exp(x_m)) over dim 0, as max + log(mean(exp(x − max))): exact when all x_m are equal."""
    top = x.max(dim=0).values
    return top + torch.log(torch.exp(x - top).mean(dim=0))


def _member_std(z: torch.Tensor) -> torch.Tensor:
    """Population std over dim 0, from deviations to member 0 (shift-invariant; exactly 0 for equal members)."""
    d = z - z[0]
    return ((d**2).mean(dim=0) - d.mean(dim=0) ** 2).clamp_min(0.0).sqrt()


def ensemble_distribution(logits: torch.Tensor, combine: Literal["probs", "logits"] = "probs") -> torch.Tensor:
    """Log of the ensemble's predictive distribution.

    Args:
        logits: Tensor[M, B, C] member logits.
        combine: "probs": p̄ = (1/M) Σ_m softmax(z^m) (the Bayesian model average, computed as
            logsumexp_m log_softmax(z^m) − ln M); "logits": p̄ = softmax((1/M) Σ_m z^m).

    Returns:
        Tensor[B, C] of float64 log-probabilities.
    """
    _check_logits(logits)
    z = logits.to(torch.float64)
    if combine == "probs":
        return _log_mean_exp(torch.log_softmax(z, dim=-1))
    if combine == "logits":
        return torch.log_softmax(z.mean(dim=0), dim=-1)
    raise SoupsError(f"combine={combine!r} must be 'probs' or 'logits'")


def ood_scores(logits: torch.Tensor, combine: Literal["probs", "logits"] = "probs") -> dict[str, torch.Tensor]:
    """Every OOD score of the module docstring (higher = more OOD).

    Args:
        logits: Tensor[M, B, C] member logits (M = 1 for a single model).
        combine: How the ensemble's p̄ is formed for `msp` and `entropy` (see `ensemble_distribution`).

    Returns:
        Name → Tensor[B] of float64, names as in `OOD_SCORES`.
    """
    _check_logits(logits)
    z = logits.to(torch.float64)
    member_log_probs = torch.log_softmax(z, dim=-1)  # [M, B, C]
    member_probs = member_log_probs.exp()
    mean_probs = member_probs.mean(dim=0)  # [B, C]
    mean_logits = z.mean(dim=0)  # [B, C]
    member_max_logit = z.max(dim=-1).values  # [M, B]
    log_mean_probs = _log_mean_exp(member_log_probs)  # [B, C]
    if combine not in ("probs", "logits"):
        raise SoupsError(f"combine={combine!r} must be 'probs' or 'logits'")
    log_bar = log_mean_probs if combine == "probs" else torch.log_softmax(mean_logits, dim=-1)  # [B, C]
    # Mutual information as the mean KL(p^m ‖ p̄) = H(p̄) − mean_m H(p^m): exactly 0 for identical members.
    mutual_information = (member_probs * (member_log_probs - log_mean_probs)).nan_to_num(0.0).sum(-1).mean(0)
    return {
        "msp": -log_bar.exp().max(dim=-1).values,
        "max_logit": -member_max_logit.mean(dim=0),
        "energy": -torch.logsumexp(mean_logits, dim=-1),
        "entropy": _entropy(log_bar),
        "mutual_information": mutual_information,
        "bma": -mean_probs.max(dim=-1).values,
        "pds": member_probs.max(dim=0).values.mean(dim=-1),
        "logit_avg": -mean_logits.max(dim=-1).values,
        "minmax": -member_max_logit.min(dim=0).values,
        "maxstd": _member_std(z).max(dim=-1).values,
    }


# ----------------------------------------------------------------------------------------------------------
# Detection metrics (OOD = positive)
# ----------------------------------------------------------------------------------------------------------


def _ranked(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ranks of the pooled scores scaled to [0, 1], and the targets (1 = OOD)."""
    for name, s in (("in-distribution scores", id_scores), ("OOD scores", ood_scores_)):
        if s.ndim != 1 or s.numel() == 0:
            raise SoupsError(f"{name} must be a non-empty Tensor[B], got shape {tuple(s.shape)}")
        if bool(torch.isnan(s).any()):
            raise SoupsError(f"{name} contain NaN")
    pooled = torch.cat([id_scores.to(torch.float64).cpu(), ood_scores_.to(torch.float64).cpu()])
    _, rank = torch.unique(pooled, sorted=True, return_inverse=True)
    scaled = rank.to(torch.float64) / max(int(rank.max()), 1)
    target = torch.cat([torch.zeros(id_scores.numel()), torch.ones(ood_scores_.numel())]).long()
    return scaled, target


def auroc(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> float:
    """Area under the ROC curve for detecting OOD samples (positive) from their scores.

    Args:
        id_scores: Tensor[B] scores of in-distribution samples.
        ood_scores_: Tensor[B'] scores of OOD samples (higher = more OOD).

    Returns:
        P(score_ood > score_id) + ½ P(tie), in [0, 1].
    """
    scores, target = _ranked(id_scores, ood_scores_)
    return float(binary_auroc(scores, target))


def aupr(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> float:
    """Area under the precision–recall curve with OOD as the positive class (average precision).

    Args:
        id_scores: Tensor[B] scores of in-distribution samples.
        ood_scores_: Tensor[B'] scores of OOD samples.

    Returns:
        Average precision Σ_k (R_k − R_{k−1}) P_k, in [0, 1].
    """
    scores, target = _ranked(id_scores, ood_scores_)
    return float(binary_average_precision(scores, target))


def fpr_at_95_tpr(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> float:
    """False-positive rate on in-distribution samples at the first threshold detecting ≥ 95% of OOD samples.

    Args:
        id_scores: Tensor[B] scores of in-distribution samples.
        ood_scores_: Tensor[B'] scores of OOD samples.

    Returns:
        FPR in [0, 1] (lower is better).
    """
    scores, target = _ranked(id_scores, ood_scores_)
    fpr, tpr, _ = binary_roc(scores, target)
    return float(fpr[tpr >= 0.95][0])


def detection_metrics(id_scores: torch.Tensor, ood_scores_: torch.Tensor) -> dict[str, float]:
    """AUROC, AUPR (OOD positive) and FPR at 95% TPR.

    Args:
        id_scores: Tensor[B] scores of in-distribution samples.
        ood_scores_: Tensor[B'] scores of OOD samples.

    Returns:
        {"auroc": ..., "aupr": ..., "fpr95": ...}.
    """
    return {
        "auroc": auroc(id_scores, ood_scores_),
        "aupr": aupr(id_scores, ood_scores_),
        "fpr95": fpr_at_95_tpr(id_scores, ood_scores_),
    }

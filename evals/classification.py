"""Classification and calibration metrics of one predictive distribution (a model's or an ensemble's).

Definitions (methods.md §6):
- accuracy: fraction of samples whose argmax is the label (in float64; torchmetrics' float32 would print
  0.136 as 0.13600000739);
- NLL: −(1/N) Σ_n log p_{n, y_n}, computed from log-probabilities so that confident mistakes do not underflow;
- ECE: 15 equal-width confidence bins ((b−1)/15, b/15] (Guo et al. 2017; confidence 1 is in the last bin),
  Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| with conf = max_c p_c, binned in float64 (see `ece` for why not
  torchmetrics);
- adaptive ECE: the same sum over equal-MASS bins (samples sorted by confidence and split into `n_bins` groups
  whose sizes differ by at most one; Nixon et al. 2019). Written here because torchmetrics has no adaptive
  variant; it is tested against a direct loop;
- Brier: (1/N) Σ_n Σ_c (p_nc − 1[y_n = c])², summed over classes (not halved), in [0, 2]; it matches
  scikit-learn's multiclass `brier_score_loss`.
"""

from __future__ import annotations

import torch

from evals.errors import SoupsError

__all__ = ["accuracy", "adaptive_ece", "brier_score", "check_predictions", "ece", "nll"]


def check_predictions(probs: torch.Tensor, labels: torch.Tensor, name: str = "probs") -> None:
    """Raises `SoupsError` naming the problem unless probs is a finite Tensor[B, C] and labels a Tensor[B] of
    integer classes in [0, C)."""
    if probs.ndim != 2:
        raise SoupsError(f"{name} must be a Tensor[B, C], got shape {tuple(probs.shape)}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise SoupsError(f"labels must be a Tensor[B={probs.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise SoupsError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if probs.shape[0] == 0:
        raise SoupsError(f"{name} has no samples (B=0)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= probs.shape[1]:
        raise SoupsError(f"labels must lie in [0, {probs.shape[1]}) for {probs.shape[1]} classes, got {low}..{high}")
    if not bool(torch.isfinite(probs).all()):
        raise SoupsError(f"{name} contains NaN or infinite values")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy.

    Args:
        probs: Tensor[B, C] probabilities (or any scores with the same argmax, e.g. logits).
        labels: Tensor[B] true classes.

    Returns:
        The fraction of correct argmax predictions.
    """
    check_predictions(probs, labels)
    return float((probs.argmax(dim=1) == labels.to(probs.device)).to(torch.float64).mean())


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Negative log-likelihood −(1/N) Σ_n log p_{n, y_n}.

    Args:
        log_probs: Tensor[B, C] log-probabilities (e.g. `log_softmax(logits)`, or the log of an ensemble's mean
            probability computed with logsumexp).
        labels: Tensor[B] true classes.

    Returns:
        The mean NLL in nats.
    """
    if log_probs.ndim == 2 and bool(torch.isneginf(log_probs).any()):
        # −inf is a valid log-probability (p = 0); only NaN and +inf are bad input.
        check_predictions(torch.where(torch.isneginf(log_probs), 0.0, log_probs), labels, "log_probs")
    else:
        check_predictions(log_probs, labels, "log_probs")
    picked = log_probs.to(torch.float64).gather(1, labels.to(log_probs.device).long()[:, None])
    return float(-picked.mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with `n_bins` equal-width confidence bins ((b−1)/n, b/n], b = 1..n.

    Binned here in float64 rather than with torchmetrics' `multiclass_calibration_error`, which (1) uses
    [lo, hi) bins, so confidence exactly 1.0 (a saturated softmax) lands in an extra (n+1)-th bin of its own, and
    (2) casts to float32 first, so a confidence just below an edge such as 9/15 rounds onto or past it and
    moves to the next bin. Both hit saturated members and small ensembles, whose averages sit on k/M. With the
    (lo, hi] convention of Guo et al. (2017) confidence 1 is in the last bin; 0 (impossible for a probability
    row's max, which is ≥ 1/C) would go to the first.

    Args:
        probs: Tensor[B, C] probabilities (rows sum to 1).
        labels: Tensor[B] true classes.
        n_bins: Number of bins on [0, 1] (15 is the usual setting).

    Returns:
        Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|, in [0, 1].
    """
    check_predictions(probs, labels)
    if n_bins < 1:
        raise SoupsError(f"ECE needs n_bins >= 1, got {n_bins}")
    confidence, predicted = probs.to(torch.float64).max(dim=1)  # [B], [B]
    right = (predicted == labels.to(probs.device)).to(torch.float64)
    # Inner edges b/n, each correctly rounded in float64; bucketize(right=False) puts x in bin i when
    # edge[i-1] < x <= edge[i], i.e. (lo, hi] bins, and everything above the last inner edge (1.0 included) in n−1.
    inner = torch.arange(1, n_bins, dtype=torch.float64, device=confidence.device) / n_bins
    bins = torch.bucketize(confidence, inner, right=False)  # [B] in [0, n_bins)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, bins, right - confidence)  # Σ_{n ∈ b} (1[right_n] − conf_n)
    # |B_b|/N · |acc_b − conf_b| = |Σ_{n ∈ b} (right_n − conf_n)| / N; empty bins add 0.
    return float(gap.abs().sum() / probs.shape[0])


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Adaptive (equal-mass) expected calibration error.

    Args:
        probs: Tensor[B, C] probabilities.
        labels: Tensor[B] true classes.
        n_bins: Number of bins; each holds ⌊B/n_bins⌋ or ⌈B/n_bins⌉ samples of consecutive confidence.

    Returns:
        Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over non-empty bins, in [0, 1].
    """
    check_predictions(probs, labels)
    if n_bins < 1:
        raise SoupsError(f"adaptive ECE needs n_bins >= 1, got {n_bins}")
    confidence, predicted = probs.to(torch.float64).max(dim=1)  # [B], [B]
    right = (predicted == labels.to(probs.device)).to(torch.float64)
    order = torch.argsort(confidence, stable=True)
    total = 0.0
    for chunk in torch.tensor_split(order, n_bins):
        if chunk.numel():
            total += chunk.numel() * abs(float(right[chunk].mean() - confidence[chunk].mean()))
    return total / probs.shape[0]


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier score (1/N) Σ_n Σ_c (p_nc − 1[y_n = c])².

    Args:
        probs: Tensor[B, C] probabilities.
        labels: Tensor[B] true classes.

    Returns:
        The Brier score in [0, 2] (0 for a confident correct classifier).
    """
    check_predictions(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.to(probs.device).long(), probs.shape[1]).to(torch.float64)
    return float(((probs.to(torch.float64) - onehot) ** 2).sum(dim=1).mean())

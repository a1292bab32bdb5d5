"""One call that evaluates an ensemble: accuracy, calibration, diversity and (optionally) OOD detection.

`evaluate_ensemble(logits[M, B, C], labels[B], ood_logits[M, B', C] | None)` returns a flat dict of floats
(JSON- and tracker-friendly). Keys:

- ensemble (from p̄, see `combine`): `accuracy`, `nll`, `ece` (15 equal-width bins), `ece_adaptive`, `brier`;
- members: `member_accuracy_mean`, `member_accuracy_best`, `member_nll_mean`, `member_ece_mean`;
- diversity (M ≥ 2 only): `disagreement` (ORACLE: exactly one of a pair is right), `prediction_disagreement`
  (argmax differs), `ratio_error`, `q_statistic`, `q_diversity`, `correlation`, `num_unique`,
  `equitability_correct` / `equitability_wrong` (Shannon equitability on samples the ensemble gets right /
  wrong), `kw_variance`, `ensemble_gain`, and `cka` (mean pairwise linear CKA) when `features` are given;
- OOD (when `ood_logits` is given), for every score s of `evals.ood.OOD_SCORES`: `ood/<s>/auroc`,
  `ood/<s>/aupr`, `ood/<s>/fpr95` (OOD positive; higher score = more OOD).

Definitions are in `evals.classification`, `evals.diversity` and `evals.ood`.
"""

from __future__ import annotations

from typing import Literal

import torch

from evals import classification, diversity, ood
from evals.errors import SoupsError

__all__ = ["evaluate_ensemble"]


def _check_inputs(
    logits: torch.Tensor, labels: torch.Tensor, ood_logits: torch.Tensor | None, features: torch.Tensor | None
) -> None:
    """Shapes, class counts, label range; errors name the tensor and the offending size."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SoupsError(f"logits must be a Tensor[M, B, C] (members, samples, classes), got {shape}")
    m, b, c = logits.shape
    if c < 2:
        raise SoupsError(f"logits have C={c} classes; need at least 2")
    if not isinstance(labels, torch.Tensor) or labels.shape != (b,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise SoupsError(f"labels must be a Tensor[B={b}] matching logits {tuple(logits.shape)}, got {shape}")
    if ood_logits is not None:
        if not isinstance(ood_logits, torch.Tensor) or ood_logits.ndim != 3:
            shape = tuple(ood_logits.shape) if isinstance(ood_logits, torch.Tensor) else type(ood_logits).__name__
            raise SoupsError(f"ood_logits must be a Tensor[M, B', C], got {shape}")
        if ood_logits.shape[0] != m:
            raise SoupsError(f"ood_logits have {ood_logits.shape[0]} members but logits have M={m}")
        if ood_logits.shape[2] != c:
            raise SoupsError(f"ood_logits have {ood_logits.shape[2]} classes but logits have C={c}")
    if features is not None and (features.ndim < 3 or features.shape[:2] != (m, b)):
        raise SoupsError(f"features must be a Tensor[M={m}, B={b}, D...], got shape {tuple(features.shape)}")


def evaluate_ensemble(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ood_logits: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    combine: Literal["probs", "logits"] = "probs",
    n_bins: int = 15,
) -> dict[str, float]:
    """Evaluates an ensemble (or a single model with M = 1) on in-distribution data and optional OOD data.

    Args:
        logits: Tensor[M, B, C] member logits on the in-distribution test set.
        labels: Tensor[B] true classes in [0, C).
        ood_logits: Optional Tensor[M, B', C] member logits on OOD samples (same members, same classes).
        features: Optional Tensor[M, B, D...] member features on the test set (flattened per sample), for
            linear CKA.
        combine: The ensemble's prediction: "probs" averages softmax outputs (default; Packed-Ensembles, SED),
            "logits" takes the softmax of the averaged logits (SDDE, thesis ch. 4).
        n_bins: Bins of both ECEs.

    Returns:
        A flat dict name → float (see the module docstring for the keys).

    Raises:
        SoupsError: wrong shapes, mismatched member or class counts, labels out of range, NaN or inf logits.
    """
    # --- inputs --------------------------------------------------------------------------------------------
    _check_inputs(logits, labels, ood_logits, features)
    m, _, c = logits.shape
    labels = labels.to(logits.device)
    log_bar = ood.ensemble_distribution(logits, combine)  # [B, C], validates finiteness
    probs = log_bar.exp()
    classification.check_predictions(probs, labels)  # label range and dtype, named errors

    # --- ensemble and members ------------------------------------------------------------------------------
    out: dict[str, float] = {
        "accuracy": classification.accuracy(probs, labels),
        "nll": classification.nll(log_bar, labels),
        "ece": classification.ece(probs, labels, n_bins),
        "ece_adaptive": classification.adaptive_ece(probs, labels, n_bins),
        "brier": classification.brier_score(probs, labels),
    }
    member_log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [M, B, C]
    member_acc = [classification.accuracy(member_log_probs[i], labels) for i in range(m)]
    out["member_accuracy_mean"] = sum(member_acc) / m
    out["member_accuracy_best"] = max(member_acc)
    out["member_nll_mean"] = sum(classification.nll(member_log_probs[i], labels) for i in range(m)) / m
    out["member_ece_mean"] = sum(classification.ece(member_log_probs[i].exp(), labels, n_bins) for i in range(m)) / m

    # --- diversity -----------------------------------------------------------------------------------------
    if m >= 2:
        preds = logits.argmax(dim=-1)  # [M, B]
        ensemble_preds = probs.argmax(dim=-1)  # [B]
        right = ensemble_preds == labels
        out.update(
            {
                "disagreement": diversity.disagreement(preds, labels),
                "prediction_disagreement": diversity.prediction_disagreement(preds),
                "ratio_error": diversity.ratio_error(preds, labels),
                "q_statistic": diversity.q_statistic(preds, labels),
                "q_diversity": diversity.q_diversity(preds, labels),
                "correlation": diversity.correlation(preds, labels),
                "num_unique": diversity.num_unique(preds),
                "equitability_correct": diversity.shannon_equitability(preds, c, mask=right),
                "equitability_wrong": diversity.shannon_equitability(preds, c, mask=~right),
                "kw_variance": diversity.kohavi_wolpert_variance(preds, labels),
                "ensemble_gain": diversity.ensemble_gain(ensemble_preds, preds, labels),
            }
        )
        if features is not None:
            out["cka"] = diversity.pairwise_linear_cka(features.flatten(start_dim=2))

    # --- OOD detection -------------------------------------------------------------------------------------
    if ood_logits is not None:
        id_scores = ood.ood_scores(logits, combine)
        ood_scores = ood.ood_scores(ood_logits, combine)
        for name in ood.OOD_SCORES:
            for metric, value in ood.detection_metrics(id_scores[name], ood_scores[name]).items():
                out[f"ood/{name}/{metric}"] = value
    return out

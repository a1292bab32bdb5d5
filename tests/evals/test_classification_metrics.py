"""Tests for evals.classification: hand-worked values and agreement with scikit-learn / direct loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from evals.classification import accuracy, adaptive_ece, brier_score, ece, nll
from soups.utils import SoupsError

PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 1])  # argmax 0, 0, 1, 1 → right, wrong, right, right


def test_by_hand() -> None:
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)
    expected_nll = -(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.7)) / 4
    assert nll(PROBS.log(), LABELS) == pytest.approx(expected_nll, abs=1e-12)
    # Per sample Σ_c (p − 1[y=c])²: 0.01+0.01, 0.36+0.36, 0.04+0.04, 0.09+0.09 → 1.0 in total, / 4.
    assert brier_score(PROBS, LABELS) == pytest.approx(0.25, abs=1e-12)
    # Confidences 0.9, 0.6, 0.8, 0.7 fall in four different 1/15-wide bins:
    # (|1 − 0.9| + |0 − 0.6| + |1 − 0.8| + |1 − 0.7|) / 4 = 1.2 / 4 = 0.3.
    assert ece(PROBS, LABELS) == pytest.approx(0.3, abs=1e-6)
    assert adaptive_ece(PROBS, LABELS) == pytest.approx(0.3, abs=1e-12)  # 15 bins ≥ 4 samples: one per bin
    # Two equal-mass bins: {0.6 ✗, 0.7 ✓} acc ½ conf 0.65, {0.8 ✓, 0.9 ✓} acc 1 conf 0.85 → (2·0.15 + 2·0.15)/4.
    assert adaptive_ece(PROBS, LABELS, n_bins=2) == pytest.approx(0.15, abs=1e-12)
    # A single bin: |acc 0.75 − mean conf 0.75| = 0.
    assert adaptive_ece(PROBS, LABELS, n_bins=1) == pytest.approx(0.0, abs=1e-12)


def test_nll_of_zero_probability_is_infinite() -> None:
    log_probs = torch.tensor([[0.0, -math.inf]])
    assert nll(log_probs, torch.tensor([1])) == math.inf
    assert nll(log_probs, torch.tensor([0])) == 0.0


def test_ece_confidence_one_is_in_the_last_bin() -> None:
    # conf 1.0 (wrong) and 0.95 (right) share the last bin (14/15, 1]: acc ½, conf 0.975 → |0.5 − 0.975| = 0.475.
    # torchmetrics' [lo, hi) bins put 1.0 in a 16th bin of its own: ½ |0 − 1| + ½ |1 − 0.95| = 0.525.
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05]], dtype=torch.float64)
    assert ece(probs, torch.tensor([1, 0])) == pytest.approx(0.475, abs=1e-12)
    assert ece(probs.float(), torch.tensor([1, 0])) == pytest.approx(0.475, abs=1e-7)  # float32 input: same bins


def test_ece_bins_edges_in_float64() -> None:
    edge = 9 / 15  # = 0.6 in float64; the bins around it are (8/15, 9/15] and (9/15, 10/15]
    below, above = np.nextafter(edge, 0.0), np.nextafter(edge, 1.0)
    labels = torch.tensor([0, 1])  # the first sample is right, the second (conf 0.62) wrong
    for conf, expected in [
        # 0.6 − ulp and 0.6 itself stay in (8/15, 9/15], apart from 0.62: (|1 − c| + |0 − 0.62|) / 2.
        (below, (1 - below + 0.62) / 2),
        (edge, (1 - edge + 0.62) / 2),
        # 0.6 + ulp shares (9/15, 10/15] with 0.62: acc ½, conf (c + 0.62)/2 → |0.5 − (c + 0.62)/2|.
        (above, abs(0.5 - (above + 0.62) / 2)),
    ]:
        probs = torch.tensor([[conf, 1 - conf], [0.62, 0.38]], dtype=torch.float64)
        assert ece(probs, labels) == pytest.approx(expected, abs=1e-12), conf
    # Cast to float32 first (as torchmetrics does), 0.6 − ulp would become 0.6000000238 > 9/15: the next bin.
    assert float(torch.tensor(below, dtype=torch.float32)) > edge


def test_ece_matches_torchmetrics_away_from_edges() -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    gen = torch.Generator().manual_seed(3)
    probs = (2 * torch.randn(400, 5, generator=gen, dtype=torch.float64)).softmax(-1)
    labels = torch.randint(0, 5, (400,), generator=gen)
    conf = probs.max(1).values
    # The two conventions differ only at edges (and at 1.0) and in float32 rounding: keep every confidence
    # well away from all k/15 so that this compares the sums, not the edge handling.
    assert float((conf * 15 - (conf * 15).round()).abs().min()) > 1e-5 and float(conf.max()) < 1
    reference = multiclass_calibration_error(probs.float(), labels, num_classes=5, n_bins=15, norm="l1")
    assert ece(probs, labels) == pytest.approx(float(reference), abs=1e-6)
    assert ece(probs, labels, n_bins=1) == pytest.approx(abs(float(conf.mean()) - accuracy(probs, labels)), abs=1e-12)
    with pytest.raises(SoupsError, match="n_bins >= 1"):
        ece(probs, labels, n_bins=0)


def _reference_ece(conf: np.ndarray, right: np.ndarray, edges: list[np.ndarray]) -> float:
    return sum(len(b) * abs(right[b].mean() - conf[b].mean()) for b in edges if len(b)) / len(conf)


def test_against_references_on_random_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=gen, dtype=torch.float64)
    probs = logits.softmax(-1)
    labels = torch.randint(0, 7, (500,), generator=gen)
    y, p = labels.numpy(), probs.numpy()
    assert accuracy(probs, labels) == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert nll(logits.log_softmax(-1), labels) == pytest.approx(log_loss(y, p, labels=range(7)), abs=1e-9)
    assert brier_score(probs, labels) == pytest.approx(brier_score_loss(y, p, labels=range(7)), abs=1e-12)
    conf, right = p.max(1), (p.argmax(1) == y).astype(float)
    # Equal width: bin b holds confidences in ((b−1)/15, b/15].
    width_bins = [np.flatnonzero((conf > b / 15) & (conf <= (b + 1) / 15)) for b in range(15)]
    assert ece(probs, labels) == pytest.approx(_reference_ece(conf, right, width_bins), abs=1e-12)
    # Equal mass: sorted confidences split into 15 nearly equal chunks.
    mass_bins = np.array_split(np.argsort(conf, kind="stable"), 15)
    assert adaptive_ece(probs, labels) == pytest.approx(_reference_ece(conf, right, mass_bins), abs=1e-12)


def test_bad_input() -> None:
    with pytest.raises(SoupsError, match=r"labels must lie in \[0, 2\)"):
        accuracy(PROBS, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(SoupsError, match=r"labels must be a Tensor\[B=4\]"):
        ece(PROBS, LABELS[:3])
    with pytest.raises(SoupsError, match="NaN"):
        brier_score(torch.full((4, 2), math.nan), LABELS)
    with pytest.raises(SoupsError, match=r"Tensor\[B, C\]"):
        nll(PROBS[0], LABELS)

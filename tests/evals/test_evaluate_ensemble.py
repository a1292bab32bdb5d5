"""Tests for evals.ensemble.evaluate_ensemble: consistency with the parts and references, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from evals import diversity
from evals.ensemble import evaluate_ensemble
from evals.ood import OOD_SCORES
from soups.utils import SoupsError


def _members(m: int = 4, b: int = 200, c: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Members that share a signal towards the label plus independent noise (accuracy well above chance)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (b,), generator=gen)
    signal = 2.0 * torch.nn.functional.one_hot(labels, c).double()
    return signal[None] + 1.5 * torch.randn(m, b, c, generator=gen, dtype=torch.float64), labels


def test_matches_references_and_parts() -> None:
    logits, labels = _members()
    out = evaluate_ensemble(logits, labels)
    p_bar = logits.softmax(-1).mean(0).numpy()
    y = labels.numpy()
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p_bar.argmax(1)), abs=1e-12)
    assert out["nll"] == pytest.approx(log_loss(y, p_bar, labels=range(6)), abs=1e-9)
    assert out["brier"] == pytest.approx(brier_score_loss(y, p_bar, labels=range(6)), abs=1e-12)
    preds = logits.argmax(-1)
    member_acc = [(preds[i] == labels).double().mean().item() for i in range(4)]
    assert out["member_accuracy_mean"] == pytest.approx(np.mean(member_acc))
    assert out["ensemble_gain"] == pytest.approx(out["accuracy"] - max(member_acc))
    assert out["ratio_error"] == pytest.approx(diversity.ratio_error(preds, labels))
    assert out["num_unique"] == pytest.approx(diversity.num_unique(preds))
    assert out["ensemble_gain"] > 0  # averaging independent noise helps on this synthetic task
    assert not any(key.startswith("ood/") for key in out) and "cka" not in out
    # combine="logits" changes the ensemble's distribution, not the members'.
    by_logits = evaluate_ensemble(logits, labels, combine="logits")
    assert by_logits["accuracy"] == pytest.approx(accuracy_score(y, logits.mean(0).argmax(-1).numpy()))
    assert by_logits["member_accuracy_mean"] == out["member_accuracy_mean"]


def test_ece_of_saturated_members() -> None:
    # Two identical members: sample 1 saturated (softmax exactly [1, 0] in float64) and wrong, sample 2 at 0.95
    # and right. Both confidences lie in the last 15-bin (14/15, 1]: |0.5 − 0.975| = 0.475, for the members and
    # for p̄ (torchmetrics' binning would give 0.525, with 1.0 in a bin of its own).
    member = torch.tensor([[100.0, 0.0], [math.log(0.95), math.log(0.05)]], dtype=torch.float64)
    assert float(member.softmax(-1)[0, 0]) == 1.0
    out = evaluate_ensemble(torch.stack([member, member]), torch.tensor([1, 0]))
    assert out["member_ece_mean"] == pytest.approx(0.475, abs=1e-12)
    assert out["ece"] == pytest.approx(0.475, abs=1e-12)


def test_ood_and_features() -> None:
    logits, labels = _members()
    gen = torch.Generator().manual_seed(1)
    ood_logits = 0.5 * torch.randn(4, 150, 6, generator=gen, dtype=torch.float64)  # flat, unconfident
    features = torch.randn(4, 200, 3, 2, generator=gen)  # flattened to D = 6 per sample
    out = evaluate_ensemble(logits, labels, ood_logits=ood_logits, features=features)
    for name in OOD_SCORES:
        for metric in ("auroc", "aupr", "fpr95"):
            assert 0.0 <= out[f"ood/{name}/{metric}"] <= 1.0
    # In-distribution members are confident (signal 2 + noise), OOD ones are not: MSP separates them well.
    assert out["ood/msp/auroc"] > 0.8
    assert 0.0 <= out["cka"] <= 1.0
    assert out["cka"] == pytest.approx(diversity.pairwise_linear_cka(features.flatten(2)))


def test_identical_members_have_no_diversity() -> None:
    logits, labels = _members(m=1)
    out = evaluate_ensemble(logits.expand(3, -1, -1), labels, ood_logits=logits.expand(3, -1, -1) * 0.1)
    assert out["disagreement"] == 0.0 and out["prediction_disagreement"] == 0.0
    assert out["num_unique"] == 1.0 and out["kw_variance"] == 0.0 and out["ensemble_gain"] == 0.0
    assert out["equitability_correct"] == 0.0
    # All members identical: MI and maxstd are 0 on every sample → no separation, AUROC ½.
    assert out["ood/mutual_information/auroc"] == pytest.approx(0.5)
    assert out["ood/maxstd/auroc"] == pytest.approx(0.5)
    single = evaluate_ensemble(logits, labels)
    assert "disagreement" not in single and single["accuracy"] == single["member_accuracy_best"]
    assert out["accuracy"] == single["accuracy"]


def test_bad_input() -> None:
    logits, labels = _members(m=2, b=10, c=4)
    with pytest.raises(SoupsError, match=r"logits must be a Tensor\[M, B, C\].*\(10, 4\)"):
        evaluate_ensemble(logits[0], labels)
    with pytest.raises(SoupsError, match=r"labels must be a Tensor\[B=10\]"):
        evaluate_ensemble(logits, labels[:9])
    with pytest.raises(SoupsError, match="ood_logits have 5 classes but logits have C=4"):
        evaluate_ensemble(logits, labels, ood_logits=torch.zeros(2, 3, 5))
    with pytest.raises(SoupsError, match="ood_logits have 3 members but logits have M=2"):
        evaluate_ensemble(logits, labels, ood_logits=torch.zeros(3, 3, 4))
    with pytest.raises(SoupsError, match=r"labels must lie in \[0, 4\)"):
        evaluate_ensemble(logits, torch.full((10,), 4))
    with pytest.raises(SoupsError, match="NaN or infinite"):
        evaluate_ensemble(torch.full((2, 10, 4), math.nan), labels)
    with pytest.raises(SoupsError, match=r"features must be a Tensor\[M=2, B=10"):
        evaluate_ensemble(logits, labels, features=torch.zeros(2, 9, 3))


@pytest.mark.gpu
def test_cuda_inputs_give_the_cpu_results() -> None:
    logits, labels = _members()
    ood_logits = 0.5 * torch.randn(4, 50, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    on_cpu = evaluate_ensemble(logits, labels, ood_logits=ood_logits)
    on_gpu = evaluate_ensemble(logits.cuda(), labels.cuda(), ood_logits=ood_logits.cuda())
    assert on_gpu.keys() == on_cpu.keys()
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key

"""The RWR maths of rl/diffusion/rwr.py, on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rl.diffusion.rwr import (
    effective_sample_size,
    keep_count,
    prior_preserved_loss,
    rwr_weights,
    select_top,
    select_top_per_group,
    weighted_denoising_loss,
)
from soups.utils import SoupsError


def test_keep_count_is_ceil_and_at_least_one() -> None:
    assert keep_count(10_000, 0.5) == 5_000  # the thesis: drop the lowest half
    assert keep_count(5, 0.5) == 3  # 2.5 -> 3
    assert keep_count(4, 0.5) == 2
    assert keep_count(3, 0.01) == 1  # 0.03 -> never empty
    assert keep_count(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(SoupsError, match="rwr.keep"):
            keep_count(4, bad)


def test_select_top_best_first_ties_to_the_lower_index() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9])
    assert select_top(scores, 0.5).tolist() == [1, 3]
    assert select_top(scores, 0.75).tolist() == [1, 3, 2]  # ceil(3) = 3
    assert select_top(torch.tensor([2.0, 2.0, 2.0]), 0.5).tolist() == [0, 1]
    with pytest.raises(SoupsError, match="non-finite"):
        select_top(torch.tensor([1.0, float("nan")]), 0.5)


def test_select_top_per_group_keeps_each_prompts_best() -> None:
    # Prompt "vivid" scores high on every seed, "dull" low: over the round the top half is all "vivid"; within
    # each prompt, each keeps its best ceil(0.5 * 3) = 2 of 3 seeds.
    scores = torch.tensor([9.0, 8.0, 1.0, 7.5, 2.0, 0.5])
    groups = ["vivid", "vivid", "dull", "vivid", "dull", "dull"]
    assert select_top(scores, 0.5).tolist() == [0, 1, 3]
    assert select_top_per_group(scores, groups, 0.5).tolist() == [0, 1, 4, 2]
    with pytest.raises(SoupsError, match="group labels"):
        select_top_per_group(scores, groups[:3], 0.5)


def test_weights_hand_worked() -> None:
    generated = torch.tensor([0.0, 1.0, 2.0, 3.0])
    kept = torch.tensor([3.0, 2.0])
    assert rwr_weights(kept, generated, "uniform").tolist() == [0.5, 0.5]
    # raw: shifted by the generated minimum 0: (3, 2) / 5
    assert torch.allclose(rwr_weights(kept, generated, "raw"), torch.tensor([0.6, 0.4], dtype=torch.float64))
    # raw is invariant to a constant added to every reward (MORL's normalised rewards can be negative)
    assert torch.allclose(rwr_weights(kept - 10, generated - 10, "raw"), rwr_weights(kept, generated, "raw"))
    # softmax T=1: e^3 / (e^3 + e^2) = 1 / (1 + e^-1) = 0.7311
    soft = rwr_weights(kept, generated, "softmax", 1.0)
    assert soft[0].item() == pytest.approx(1 / (1 + math.exp(-1)))
    # T = 0.5 sharpens: 1 / (1 + e^-2) = 0.8808; a large T flattens towards uniform
    assert rwr_weights(kept, generated, "softmax", 0.5)[0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert rwr_weights(kept, generated, "softmax", 1e6)[0].item() == pytest.approx(0.5, abs=1e-6)
    # all equal: raw falls back to uniform
    same = torch.tensor([1.0, 1.0])
    assert rwr_weights(same, same, "raw").tolist() == [0.5, 0.5]
    with pytest.raises(SoupsError, match="uniform, raw, softmax"):
        rwr_weights(kept, generated, "linear")
    with pytest.raises(SoupsError, match="rwr.temperature"):
        rwr_weights(kept, generated, "softmax", 0.0)


def test_effective_sample_size() -> None:
    assert effective_sample_size(torch.full((8,), 0.125)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.6, 0.4])) == pytest.approx(1 / 0.52)  # 1 / (0.36 + 0.16)


def test_weighted_denoising_loss_hand_worked_and_equals_mse_when_uniform() -> None:
    target = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[[[1.0, 1.0]]], [[[math.sqrt(3), math.sqrt(3)]]]], requires_grad=True)
    # per-image mean squared errors [1, 3]; weights [3, 1]: (3·1 + 1·3) / 4 = 1.5
    loss = weighted_denoising_loss(pred, target, torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # weights that sum to anything: only their ratio matters
    assert weighted_denoising_loss(pred, target, torch.tensor([0.75, 0.25])).item() == pytest.approx(1.5)
    # equal weights: exactly diffusers' training loss F.mse_loss(pred, target)
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    mse = torch.nn.functional.mse_loss(p, t)
    assert weighted_denoising_loss(p, t, torch.ones(4)).item() == pytest.approx(mse.item(), rel=1e-6)
    with pytest.raises(SoupsError, match="do not match"):
        weighted_denoising_loss(p, t, torch.ones(3))


def test_prior_preserved_loss_hand_worked() -> None:
    target = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[[[1.0, 1.0]]], [[[math.sqrt(3), math.sqrt(3)]]]], requires_grad=True)  # errors [1, 3]
    prior_pred = torch.tensor([[[[math.sqrt(2), math.sqrt(2)]]], [[[2.0, 2.0]]]], requires_grad=True)  # errors [2, 4]
    weights = torch.tensor([3.0, 1.0])
    # RWR term (3·1 + 1·3) / 4 = 1.5; prior term (2 + 4) / 2 = 3; β = 0.5: 1.5 + 0.5·3 = 3.0
    total, prior = prior_preserved_loss(pred, target, weights, prior_pred, torch.zeros(2, 1, 1, 2), 0.5)
    assert total.item() == pytest.approx(3.0) and prior.item() == pytest.approx(3.0)
    total.backward()
    # d total / d prior_pred = β · 2·x / (number of prior elements) = 0.5 · 2·2 / 4 = 0.5 for the second image
    assert prior_pred.grad is not None and prior_pred.grad[1].flatten().tolist() == pytest.approx([0.5, 0.5])
    # β = 0: exactly the thesis' RWR loss (and no gradient reaches the prior batch)
    p2 = prior_pred.detach().clone().requires_grad_(True)
    total0, _ = prior_preserved_loss(pred, target, weights, p2, torch.zeros(2, 1, 1, 2), 0.0)
    assert total0.item() == weighted_denoising_loss(pred, target, weights).item()
    total0.backward()
    assert p2.grad is not None and float(p2.grad.abs().max()) == 0.0
    with pytest.raises(SoupsError, match="prior_weight"):
        prior_preserved_loss(pred, target, weights, prior_pred, torch.zeros(2, 1, 1, 2), -1.0)
    with pytest.raises(SoupsError, match="do not match"):
        prior_preserved_loss(pred, target, weights, prior_pred, torch.zeros(2, 1, 2, 1), 0.5)

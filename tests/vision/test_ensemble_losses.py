"""Diversity losses: hand-worked values, and λ = 0 gives the deep-ensemble loss for every method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from soups.utils import SoupsError
from vision.ensembles import losses as L


def _logits(m: int = 4, b: int = 6, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(m, b, c, requires_grad=True), torch.randint(0, c, (b,))


def test_ensemble_ce_is_mean_of_member_ces() -> None:
    z, y = _logits()
    expected = sum(F.cross_entropy(z[i], y) for i in range(4)) / 4
    assert torch.allclose(L.ensemble_ce(z, y), expected)


def test_a2d_hand_worked() -> None:
    # p = [.8, .2] -> ŷ = 0; q = [.3, .7]: p_ŷ(1 − q_ŷ) + (1 − p_ŷ) q_ŷ = .8·.7 + .2·.3 = .62; −ln .62 = .47804
    p, q = torch.tensor([[0.8, 0.2]]), torch.tensor([[0.3, 0.7]])
    assert L.a2d(p, q).item() == pytest.approx(-math.log(0.62), abs=1e-6)
    assert L.a2d(p, q).item() == pytest.approx(0.47804, abs=1e-5)


def test_sed_weights_hand_worked_and_detached() -> None:
    # M = 1 so f̄ = z. Row 0: z = [0, 0], y = 0 -> CE = ln 2 = .69315. Row 1: z = [ln 3, 0], y = 0 -> p = .75,
    # CE = −ln .75 = .28768. mean = .49041, mean² = .24051; α = [.69315/.24051, .28768/.24051] = [2.8820, 1.1961]
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], requires_grad=True)
    alpha = L.sed_weights(z, torch.tensor([0, 0]))
    assert alpha.tolist() == pytest.approx([2.8820, 1.1961], abs=1e-3)
    assert not alpha.requires_grad


def test_sed_diversity_pair_hand_worked() -> None:
    # M = 2, B = 1, C = 2, label 0. z¹ = [ln 4, 0] -> p¹ = [.8, .2]; z² = [0, ln(7/3)] -> p² = [.3, .7].
    # f̄ = [ln 2, ln(7/3)/2]; α = CE_n / CE_n² = 1 / CE(f̄) with one row.
    # A2D(p¹, p²) = −ln .62; total / (N |I|(|I|−1)) = α · (−ln .62) / (1 · 2 · 1)
    z = torch.tensor([[[math.log(4.0), 0.0]], [[0.0, math.log(7 / 3)]]])
    y = torch.tensor([0])
    ce_mean = F.cross_entropy(z.mean(0), y).item()
    expected = (1 / ce_mean) * (-math.log(0.62)) / 2
    assert L.sed_diversity(z, y).item() == pytest.approx(expected, rel=1e-5)


def test_sed_pair_subset_checked() -> None:
    z, y = _logits()
    with pytest.raises(SoupsError, match="subset"):
        L.sed_diversity(z, y, pair=(1, 1))
    with pytest.raises(SoupsError, match="subset"):
        L.sed_diversity(z, y, pair=(0, 7))
    pair = L.random_pair(4, torch.Generator().manual_seed(0))
    assert len(pair) == 2 and pair[0] < pair[1] < 4


def test_gncl_penalty_hand_worked() -> None:
    # z¹ = [1, 0], z² = [−1, 0]: f̄ = [0, 0], d¹ = [1, 0], d² = [−1, 0].
    # identity: Σ_m dᵀd = 2, / (2M) = 2 / 4 = .5.
    # CE Hessian at p = [.5, .5]: dᵀDd = Σ p d² − (Σ p d)² = .5 − .25 = .25 per member, total .5, / 4 = .125.
    z = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
    assert L.gncl_penalty(z, "identity").item() == pytest.approx(0.5)
    assert L.gncl_penalty(z, "ce").item() == pytest.approx(0.125)
    with pytest.raises(SoupsError, match="hessian"):
        L.gncl_penalty(z, "bogus")


def test_gncl_ce_penalty_matches_autograd_hessian() -> None:
    # dᵀ D d with D the autograd Hessian of CE at f̄ (D does not depend on the label for softmax CE).
    z, y = torch.randn(3, 1, 4), torch.tensor([2])
    f = z.mean(0)[0]
    hess = torch.autograd.functional.hessian(lambda v: F.cross_entropy(v[None], y), f)
    d = z[:, 0] - f
    expected = torch.einsum("mi,ij,mj->", d, hess, d) / (2 * 3)
    assert L.gncl_penalty(z, "ce").item() == pytest.approx(expected.item(), rel=1e-5)


def test_ncl_penalty_hand_worked_and_bounded() -> None:
    # z¹ = [ln 3, 0] -> p¹ = [.75, .25]; z² = [0, ln 3] -> p² = [.25, .75]; p̄ = [.5, .5].
    # d¹ = [.25, −.25], d¹ᵀd¹ = .125; same for d²: total .25, / (2M) = .25 / 4 = .0625.
    z = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, math.log(3.0)]]])
    assert L.ncl_penalty(z).item() == pytest.approx(0.0625)
    # logits blown apart: the logit penalty explodes, the probability one stays <= 1 (bounded objective).
    far = torch.tensor([[[100.0, -100.0]], [[-100.0, 100.0]]])
    assert L.gncl_penalty(far, "identity").item() > 1e3
    assert L.ncl_penalty(far).item() <= 1.0


def test_balanced_loss_endpoints() -> None:
    z, y = _logits()
    assert torch.allclose(L.balanced_loss(z, y, 1.0), F.cross_entropy(z.mean(0), y))
    mid = 0.5 * F.cross_entropy(z.mean(0), y) + 0.5 * L.ensemble_ce(z, y)
    assert torch.allclose(L.balanced_loss(z, y, 0.5), mid)


def test_attribution_variance_hand_worked() -> None:
    # |grads| members [1, 3] and [3, 1]: per-position mean 2, population variance 1 and 1 -> sum 2.
    grads = torch.tensor([[[1.0, -3.0]], [[3.0, 1.0]]])
    assert L.attribution_variance(grads, normalize=False).item() == pytest.approx(2.0)
    # normalised: both norms √10, so every value / √10 and every variance / 10 -> sum .2 (= 1 − ‖ā‖² = 1 − 8/10).
    assert L.attribution_variance(grads).item() == pytest.approx(0.2)
    assert L.attribution_variance(100 * grads).item() == pytest.approx(0.2)  # scale-free: bounded objective
    with pytest.raises(SoupsError, match="attribution"):
        L.attribution_variance(torch.ones(2, 3))


def test_grad_cam_hand_worked() -> None:
    # A¹ = [1, 2], ∂/∂A¹ = [1, 1] -> w¹ = 1; A² = [3, 0], ∂/∂A² = [−2, 0] -> w² = −1.
    # Σ_k w_k A_k = [1 − 3, 2 − 0] = [−2, 2]; ReLU -> [0, 2].
    feats = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])  # [K=2, H=1, W=2]
    grads = torch.tensor([[[1.0, 1.0]], [[-2.0, 0.0]]])
    assert L.grad_cam(feats, grads).tolist() == [[0.0, 2.0]]
    assert L.grad_cam(feats, grads, relu=False).tolist() == [[-2.0, 2.0]]


def test_saliency_cosine_identical_and_opposite() -> None:
    s = torch.randn(1, 3, 6, 6)
    assert L.saliency_cosine(torch.cat([s, s])).item() == pytest.approx(1.0, abs=1e-4)
    assert L.saliency_cosine(torch.cat([s, -s])).item() == pytest.approx(-1.0, abs=1e-4)
    with pytest.raises(SoupsError, match="too small"):
        L.saliency_cosine(torch.randn(2, 1, 2, 2))


def test_gaussian_kl_hand_worked() -> None:
    # D = 1, μ = 1, log σ² = 0, b = 0: ½[1 + 1 − 1 − 0] = .5;  μ = b, σ² = e: ½[e − 1 − 1] = .35914
    one = torch.ones(1, 1)
    assert L.gaussian_kl_to_unit(one, 0 * one, 0 * one).item() == pytest.approx(0.5)
    assert L.gaussian_kl_to_unit(one, one, one).item() == pytest.approx(0.5 * (math.e - 2), rel=1e-5)


def test_same_class_permutation_keeps_labels() -> None:
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    perm = L.same_class_permutation(y, torch.Generator().manual_seed(1))
    assert torch.equal(y[perm], y) and sorted(perm.tolist()) == list(range(7))


def test_cr_losses() -> None:
    # members minimise the joint logit; the discriminator's BCE at logit 0 is 2 ln 2.
    joint, product = torch.zeros(4), torch.zeros(4)
    assert L.cr_member_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    assert L.cr_discriminator_loss(joint, product).item() == pytest.approx(2 * math.log(2))


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y, lam: L.sed_loss(z, y, lam, pair=(0, 2)),
        lambda z, y, lam: L.gncl_loss(z, y, lam, "ce"),
        lambda z, y, lam: L.gncl_loss(z, y, lam, "identity"),
        L.ncl_loss,
        L.balanced_loss,
    ],
    ids=["sed", "gncl", "ncl_logits", "ncl", "balanced"],
)
def test_lambda_zero_is_deep_ensemble_and_lambda_matters(loss) -> None:  # noqa: ANN001
    z, y = _logits()
    base = L.ensemble_ce(z, y)
    assert torch.equal(loss(z, y, 0.0), base)
    assert not torch.allclose(loss(z, y, 0.5), base)


def test_bad_logits_give_clear_errors() -> None:
    with pytest.raises(SoupsError, match=r"shape \[M, B, C\]"):
        L.ensemble_ce(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(SoupsError, match="labels must have shape"):
        L.ensemble_ce(torch.randn(2, 3, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(SoupsError, match=r"lie in \[0, 4\)"):
        L.ensemble_ce(torch.randn(2, 3, 4), torch.tensor([0, 1, 4]))

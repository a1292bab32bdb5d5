"""MixMo: w_r reweighting, patch schedule, mask area ratios and mixing, with hand-worked numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soups.utils import SoupsError
from vision.ensembles import mixmo


def test_reweight_wr_hand_worked() -> None:
    # κ = (.8, .2), r = 3: .8^(1/3) = .92832, .2^(1/3) = .58480, sum 1.51312;
    # w = 2 · (.92832, .58480) / 1.51312 = (1.22702, .77298)  (vs 2κ = (1.6, .4) without the reweighting)
    w = mixmo.reweight_wr(torch.tensor([0.8, 0.2]), r=3.0)
    assert w.tolist() == pytest.approx([1.22702, 0.77298], abs=1e-4)
    # r = 1 gives w = Mκ; equal ratios give equal weights 1; weights sum to M.
    assert mixmo.reweight_wr(torch.tensor([0.8, 0.2]), r=1.0).tolist() == pytest.approx([1.6, 0.4])
    assert mixmo.reweight_wr(torch.tensor([0.25] * 4)).tolist() == pytest.approx([1.0] * 4)
    assert mixmo.reweight_wr(torch.tensor([0.5, 0.3, 0.2])).sum().item() == pytest.approx(3.0)


def test_cut_probability_schedule() -> None:
    # T = 1200, last 1/12 = 100 steps: p = .5 up to step 1100, then .5 · (1200 − s) / 100.
    assert mixmo.cut_probability(0, 1200) == 0.5
    assert mixmo.cut_probability(1100, 1200) == 0.5
    assert mixmo.cut_probability(1150, 1200) == pytest.approx(0.25)
    assert mixmo.cut_probability(1200, 1200) == 0.0


def test_mask_area_ratios_hand_worked() -> None:
    # 8x8, κ = .25: rectangle sides round(8·√.25) = 4 -> 16 / 64 = .25 exactly.
    g = torch.Generator().manual_seed(0)
    assert mixmo.rect_mask(8, 8, 0.25, g).mean().item() == 0.25
    # complement form: rectangle of area .75 has sides round(8·.8660) = 7 -> 1 − 49/64 = 15/64 = .234375
    areas = {mixmo.cut_mask(8, 8, 0.25, g).mean().item() for _ in range(40)}
    assert areas == {0.25, 15 / 64}
    with pytest.raises(SoupsError, match="area ratio"):
        mixmo.rect_mask(8, 8, 1.5)


def test_linear_mixing_hand_worked() -> None:
    # M = 2, κ = (.3, .7), l₀ = 1, l₁ = 2: 2 · (.3 · 1 + .7 · 2) = 3.4 everywhere.
    enc = torch.stack([torch.ones(1, 2, 3, 3), 2 * torch.ones(1, 2, 3, 3)])
    out = mixmo.mix_features(enc, torch.tensor([[0.3, 0.7]]), cut=False)
    assert torch.allclose(out, torch.full((1, 2, 3, 3), 3.4))


def test_cut_mixing_pixels_come_from_one_member() -> None:
    # M = 2: each pixel is 2·l₀ = 2 or 2·l₁ = 6; the share of pixels from the patch member is the mask area.
    enc = torch.stack([torch.ones(1, 1, 8, 8), 3 * torch.ones(1, 1, 8, 8)])
    out = mixmo.mix_features(enc, torch.tensor([[0.25, 0.75]]), cut=True, generator=torch.Generator().manual_seed(3))
    values = set(out.unique().tolist())
    assert values <= {2.0, 6.0}
    frac0 = (out == 2.0).float().mean().item()
    assert frac0 in {0.25, 15 / 64, 0.75, 1 - 15 / 64}  # patch member 0 (κ = .25) or member 1 (κ = .75)
    with pytest.raises(SoupsError, match="kappa"):
        mixmo.mix_features(enc, torch.tensor([[0.25, 0.5, 0.25]]), cut=False)


def _tiny() -> mixmo.MixMoNet:
    core = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return mixmo.MixMoNet(core, in_channels=1, width=4, feature_dim=4, num_classes=3, num_members=2)


def test_mixmo_net_and_loss_backprop() -> None:
    net = _tiny()
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    assert net(x).shape == (2, 5, 3)
    loss = mixmo.mixmo_loss(net, x, y, cut_prob=0.5, repetitions=2, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.inputs.parameters())
    with pytest.raises(SoupsError, match="at least 2 members"):
        mixmo.MixMoNet(nn.Identity(), 1, 4, 4, 3, 1)


def test_inference_fuses_the_member_encoders_into_one_convolution() -> None:
    # Σ_m (W_m * x + b_m) = (Σ_m W_m) * x + Σ_m b_m: the fused forward equals the M encoders run and summed
    net = _tiny()
    x = torch.randn(5, 1, 6, 6)
    summed = net.encode(x.unsqueeze(0).expand(net.num_members, *x.shape)).sum(0)
    torch.testing.assert_close(net.fused_input(x), summed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(x), net.heads_forward(summed), rtol=1e-5, atol=1e-6)

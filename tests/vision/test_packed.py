"""Packed-Ensembles: grouped layers equal block-masked dense layers; parameter counts follow
α² C_j C_{j+1} s² / (M γ); members of a packed network are independent; the grouping is torch-uncertainty's
(its packed ResNet-18 parameter counts, the paper's 8.18M, pinned below)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from soups.utils import SoupsError
from vision.ensembles.packed import (
    PackedConv2d,
    PackedLinear,
    block_mask,
    grouped_to_dense,
    packed_digits_cnn,
    packed_resnet18,
    packed_weight_count,
)


def test_weight_count_formula_hand_worked() -> None:
    # α = 2, M = 4, γ = 2, C_j = 8, C_{j+1} = 16, s = 3: 4 · 8 · 16 · 9 / 8 = 576 weights.
    assert packed_weight_count(8, 16, 3, alpha=2, members=4, gamma=2) == 576
    conv = PackedConv2d(8, 16, 3, alpha=2, num_estimators=4, gamma=2, bias=False, min_channels_per_group=1)
    assert conv.weight.numel() == 576 and conv.groups == 8
    # With the default 64 input channels per group, 16 / 8 = 2 is too few: γ drops to 1, 4 groups, 1152 weights.
    conv = PackedConv2d(8, 16, 3, alpha=2, num_estimators=4, gamma=2, bias=False)
    assert (conv.gamma, conv.groups, conv.weight.numel()) == (1, 4, 1152)
    # α = √M = 2 with M = 4, γ = 1 matches one plain layer: 4 · 8 · 16 · 9 / 4 = 1152 = 8 · 16 · 9.
    assert PackedConv2d(8, 16, 3, alpha=2, num_estimators=4, gamma=1, bias=False).weight.numel() == 8 * 16 * 9
    # linear (s = 1): α = 2, M = 2, γ = 1, 6 -> 4: 4 · 6 · 4 / 2 = 48
    assert PackedLinear(6, 4, alpha=2, num_estimators=2, gamma=1, bias=False).weight.numel() == 48


@pytest.mark.parametrize("gamma", [1, 2])
def test_packed_conv_equals_block_masked_dense_conv(gamma: int) -> None:
    conv = PackedConv2d(4, 8, 3, alpha=2, num_estimators=2, gamma=gamma, padding=1, min_channels_per_group=1)
    assert conv.groups == 2 * gamma
    g, ob, ib = conv.groups, conv.out_channels // conv.groups, conv.in_channels // conv.groups
    # reference: a random dense kernel times the block mask; the grouped conv gets its diagonal blocks.
    dense = torch.randn(conv.out_channels, conv.in_channels, 3, 3)
    dense = dense * block_mask(conv.out_channels, conv.in_channels, g)[..., None, None]
    with torch.no_grad():
        for i in range(g):
            conv.weight[i * ob : (i + 1) * ob] = dense[i * ob : (i + 1) * ob, i * ib : (i + 1) * ib]
    x = torch.randn(3, conv.in_channels, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, dense, conv.bias, padding=1), atol=1e-5)
    assert torch.equal(grouped_to_dense(conv), dense)


def test_packed_linear_equals_block_masked_dense_linear() -> None:
    lin = PackedLinear(6, 6, alpha=2, num_estimators=3, gamma=2)  # 12 -> 12 features, 6 groups of 2 x 2
    assert (lin.in_features, lin.out_features, lin.groups) == (12, 12, 6)
    dense = torch.randn(12, 12) * block_mask(12, 12, 6)
    with torch.no_grad():
        for i in range(6):
            lin.weight[i] = dense[2 * i : 2 * i + 2, 2 * i : 2 * i + 2]
    x = torch.randn(5, 12)
    assert torch.allclose(lin(x), x @ dense.T + lin.bias, atol=1e-5)
    assert torch.equal(lin.dense_weight(), dense)


def test_member_outputs_depend_only_on_their_own_block() -> None:
    net = packed_digits_cnn(num_classes=5, in_chans=1, width=8, alpha=2, num_estimators=4, gamma=1).eval()
    x = torch.randn(2, 1, 8, 8)
    out = net(x)
    assert out.shape == (4, 2, 5)
    # perturb member 2's channels after the (shared, ungrouped) stem: only member 2's logits move
    body = net.body
    h = body[:3](x)
    block = h.shape[1] // 4
    h2 = h.clone()
    h2[:, 2 * block : 3 * block] += 1.0
    a = net.head(body[3:](h)).view(2, 4, 5)
    b = net.head(body[3:](h2)).view(2, 4, 5)
    moved = (a - b).abs().amax(dim=(0, 2))
    assert moved[2] > 1e-4 and torch.all(moved[[0, 1, 3]] == 0)


def test_packed_resnet18_shapes_and_plain_special_case() -> None:
    net = packed_resnet18(num_classes=10, in_chans=1, width=8, alpha=2, num_estimators=4, gamma=2)
    assert net(torch.randn(2, 1, 16, 16)).shape == (4, 2, 10)
    plain = packed_resnet18(num_classes=10, in_chans=1, width=8, alpha=1, num_estimators=1, gamma=1)
    assert all(m.groups == 1 for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    assert plain(torch.randn(2, 1, 16, 16)).shape == (1, 2, 10)


def test_gamma_grouping_rules() -> None:
    # Subgroups only where each keeps >= 64 input channels: 2 · 256 / (4 · 2) = 64 keeps γ = 2, 2 · 128 / 8 = 32
    # does not (γ = 1, M groups); 2 · 128 / (4 · 4) = 16 < 64 and 2 · 128 / (4 · 3) is not an integer, so γ = 4
    # falls back to 1 as well.
    assert (PackedConv2d(256, 256, 3, alpha=2, num_estimators=4, gamma=2).groups) == 8
    assert (PackedConv2d(128, 128, 3, alpha=2, num_estimators=4, gamma=2).groups) == 4
    assert (PackedConv2d(128, 128, 3, alpha=2, num_estimators=4, gamma=4).gamma) == 1
    # The last layer is grouped by M·γ like any other (members' outputs split into γ subgroups), not by M.
    head = PackedLinear(64, 10, alpha=2, num_estimators=4, gamma=2, last=True)
    assert (head.in_features, head.out_features, head.groups) == (128, 40, 8)
    # A first layer reads the image with one group.
    assert PackedConv2d(3, 64, 3, alpha=2, num_estimators=4, gamma=2, first=True).groups == 1


# torch-uncertainty 0.13 `packed_resnet(3, 10, 18, M, α, γ, style, width_multiplier=width / 64)` parameter counts
# (read off that library; layer shapes compared one by one as well). PE-(2, 4, 2) CIFAR at width 64 is the
# paper's 8.18M (Laurent et al. 2023, Table 1).
@pytest.mark.parametrize(
    ("alpha", "members", "gamma", "width", "small_input", "expected"),
    [
        (2, 4, 2, 64, True, 8_175_784),
        (2, 4, 1, 32, True, 2_805_864),
        (2, 4, 2, 32, True, 2_216_040),
        (4, 4, 2, 32, True, 8_175_784),
        (2, 4, 4, 32, False, 2_223_720),
        (3, 4, 2, 32, True, 4_973_704),
    ],
)
def test_packed_resnet18_parameter_count_matches_torch_uncertainty(
    alpha: int, members: int, gamma: int, width: int, small_input: bool, expected: int
) -> None:
    net = packed_resnet18(10, 3, width, alpha=alpha, num_estimators=members, gamma=gamma, small_input=small_input)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_indivisible_widths_are_refused() -> None:
    # 2 · 3 = 6 input channels split neither into M·γ = 8 nor, with γ lowered to 1, into M = 4 groups.
    with pytest.raises(SoupsError, match="6 input channels .* do not split into 4 groups"):
        PackedConv2d(3, 8, 3, alpha=2, num_estimators=4, gamma=2)
    # A first layer has one group, but its 2 · 3 = 6 outputs feed M·γ = 4 groups of the next layer.
    with pytest.raises(SoupsError, match="6 output channels .* do not split into 4 groups"):
        PackedConv2d(3, 3, 3, alpha=2, num_estimators=4, gamma=1, first=True)
    with pytest.raises(SoupsError, match="40 output channels .* do not split into 16 groups"):
        PackedLinear(64, 10, alpha=2, num_estimators=4, gamma=4, last=True)
    with pytest.raises(SoupsError, match="PackedLinear expects 12"):
        PackedLinear(6, 4, alpha=2, num_estimators=2)(torch.randn(2, 7))

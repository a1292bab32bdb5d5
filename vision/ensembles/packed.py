"""Packed-Ensembles (Laurent et al., ICLR 2023): M members stacked on the channel axis of one network.

Each packed layer widens its input/output channels by α and splits them into G = M·γ groups (grouped
convolution), so member m only ever reads the channels of block m. A layer with C_j → C_{j+1} channels and
kernel side s holds α² C_j C_{j+1} s² / (M γ) weights (`packed_weight_count`); α = √M with γ = 1 matches one
plain model's size. The first layer reads the raw image (`first=True`: input not widened, no groups: every
member sees all input channels); the last layer emits M × classes (`last=True`), laid out member-major, and
`PackedNet.forward` returns `[M, B, C]`.

The grouping rules are torch-uncertainty's (the paper's reference code), whose packed ResNet-18 has the
paper's 8.18M parameters for PE-(2, 4, 2) (tests/vision/test_packed.py pins 8,175,784):
- every non-first layer has M·γ groups, the last one included; a first layer has one group, but its α·C_out
  outputs must still split into M·γ (the next layer's groups);
- `PackedConv2d` lowers γ, down to 1, while α·C_in does not divide by M·γ or a group would get fewer than
  `min_channels_per_group` (64) input channels: narrow layers stay at γ = 1 (`.gamma` holds the γ used);
- in the ResNet, the stem, the first convolution of every basic block and the classifier use γ = 1; only the
  blocks' second convolutions and shortcuts are subdivided.
Shapes that cannot be split even at γ = 1 are refused with a `SoupsError`.

Why hand-written: torch-uncertainty 0.13 (which ships `PackedLinear`/`PackedConv2d`) pip-installs against our
torch but its package import fails without `lightning`, which our stack does not carry. The layers below
are short and are tested against block-masked dense layers instead (tests/vision/test_packed.py).

Weight soups are meaningless here: the members are disjoint channel blocks of one network, trained from
different random inits, with no shared init to interpolate around; averaging blocks would mix unrelated
features. Members are combined by averaging their softmax outputs (the paper) or logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soups.utils import SoupsError


def packed_weight_count(c_in: int, c_out: int, kernel: int, alpha: float, members: int, gamma: int) -> float:
    """Weights of a packed layer: α² C_j C_{j+1} s² / (M γ) (bias excluded).

    Args:
        c_in: C_j, the plain model's input channels.
        c_out: C_{j+1}, the plain model's output channels.
        kernel: s, kernel side (1 for linear layers).
        alpha: Width factor α.
        members: M.
        gamma: Subgroups per member γ.
    """
    return alpha**2 * c_in * c_out * kernel**2 / (members * gamma)


def _packed_sizes(
    in_features: int,
    out_features: int,
    alpha: float,
    members: int,
    gamma: int,
    first: bool,
    last: bool,
    what: str,
    min_channels_per_group: int | None = None,
) -> tuple[int, int, int, int]:
    """(extended in, extended out, groups, γ used) of a packed layer, refusing sizes that do not split; γ is
    lowered (convolutions) only when `min_channels_per_group` is given."""
    if members < 1 or gamma < 1 or alpha <= 0:
        raise SoupsError(f"{what}: need M >= 1, gamma >= 1, alpha > 0; got M={members}, gamma={gamma}, alpha={alpha}")
    ext_in = in_features if first else round(in_features * alpha)
    ext_out = out_features * members if last else round(out_features * alpha)
    if not first and min_channels_per_group is not None:
        # torch-uncertainty's rule (its `minimum_channels_per_group`): subgroups only where each keeps enough
        # input channels; without it PE-(2, 4, 2) ResNet-18 has 5.6M parameters instead of the paper's 8.18M.
        while gamma > 1 and (ext_in % (members * gamma) or ext_in // (members * gamma) < min_channels_per_group):
            gamma -= 1
    groups = 1 if first else members * gamma
    if ext_in % groups:
        raise SoupsError(
            f"{what}: {ext_in} input channels (alpha={alpha} x {in_features}) do not split into {groups} groups "
            f"(M={members} x gamma={gamma}); pick widths with alpha * C divisible by M * gamma"
        )
    # A first layer is ungrouped, but what it emits is split into M·γ groups by the next layer.
    if ext_out % (members * gamma):
        kind = f"M={members} x {out_features}" if last else f"alpha={alpha} x {out_features}"
        raise SoupsError(
            f"{what}: {ext_out} output channels ({kind}) do not split into {members * gamma} groups "
            f"(M={members} x gamma={gamma}); pick widths with alpha * C divisible by M * gamma"
        )
    return ext_in, ext_out, groups, gamma


class PackedConv2d(nn.Conv2d):
    """A grouped convolution standing for M member convolutions C_j → C_{j+1}.

    Args:
        in_channels: C_j of one plain member.
        out_channels: C_{j+1} of one plain member.
        kernel_size: s.
        alpha: Width factor α.
        num_estimators: M.
        gamma: Subgroups per member γ (lowered, down to 1, where a group would get too few input channels).
        first: Input is the raw image (not widened, one group).
        last: Output is M × out_channels (one block per member).
        min_channels_per_group: Fewest input channels per group that γ > 1 may leave (torch-uncertainty's 64).
        **kwargs: stride, padding, bias... as for `nn.Conv2d`.

    Shapes:
        `[B, ext_in, H, W]` → `[B, ext_out, H', W']`, ext = α · C (or as set by first/last).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, alpha: float = 2.0,
                 num_estimators: int = 4, gamma: int = 1, first: bool = False, last: bool = False,
                 min_channels_per_group: int = 64, **kwargs: object) -> None:
        ext_in, ext_out, groups, used = _packed_sizes(in_channels, out_channels, alpha, num_estimators, gamma, first,
                                                      last, "PackedConv2d", min_channels_per_group)
        super().__init__(ext_in, ext_out, kernel_size, groups=groups, **kwargs)  # type: ignore[arg-type]
        self.num_estimators, self.gamma = num_estimators, used


class PackedLinear(nn.Module):
    """A block-diagonal linear layer standing for M member layers (groups G = M·γ, 1 if `first`; γ is not
    lowered here, as in torch-uncertainty).

    Args:
        in_features: C_j of one plain member.
        out_features: C_{j+1} of one plain member (classes for the last layer).
        alpha, num_estimators, gamma, first, last: as `PackedConv2d`.
        bias: Add a bias.

    Shapes:
        `[B, ext_in]` → `[B, ext_out]`.
    """

    def __init__(self, in_features: int, out_features: int, alpha: float = 2.0, num_estimators: int = 4,
                 gamma: int = 1, first: bool = False, last: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.groups, self.gamma = _packed_sizes(
            in_features, out_features, alpha, num_estimators, gamma, first, last, "PackedLinear"
        )
        self.num_estimators = num_estimators
        g = self.groups
        # weight[g] maps the g-th input block to the g-th output block; same init scale as nn.Linear per block.
        bound = (self.in_features // g) ** -0.5
        shape = (g, self.out_features // g, self.in_features // g)
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """`[B, ext_in]` → `[B, ext_out]`."""
        if x.shape[-1] != self.in_features:
            raise SoupsError(f"PackedLinear expects {self.in_features} input features, got {tuple(x.shape)}")
        blocks = x.reshape(*x.shape[:-1], self.groups, self.in_features // self.groups)
        out = torch.einsum("...gi,goi->...go", blocks, self.weight).flatten(-2)
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> Tensor:
        """The equivalent block-diagonal dense weight `[ext_out, ext_in]` (for tests and inspection)."""
        return torch.block_diag(*self.weight)


def block_mask(out_channels: int, in_channels: int, groups: int) -> Tensor:
    """`[out, in]` 0/1 mask with ones on the `groups` diagonal blocks (grouped conv ≡ masked dense conv)."""
    return torch.block_diag(*[torch.ones(out_channels // groups, in_channels // groups)] * groups)


def grouped_to_dense(conv: nn.Conv2d) -> Tensor:
    """Dense `[out, in, s, s]` weight equal to a grouped conv's: its blocks on the diagonal, zeros elsewhere."""
    g, out_c, in_c = conv.groups, conv.out_channels, conv.in_channels
    dense = conv.weight.new_zeros(out_c, in_c, *conv.weight.shape[2:])
    ob, ib = out_c // g, in_c // g
    for i in range(g):
        dense[i * ob : (i + 1) * ob, i * ib : (i + 1) * ib] = conv.weight[i * ob : (i + 1) * ob]
    return dense


def _split_members(logits: Tensor, members: int) -> Tensor:
    """`[B, M·C]` member-major → `[M, B, C]`."""
    b, mc = logits.shape
    return logits.view(b, members, mc // members).transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Packed networks
# ----------------------------------------------------------------------------------------------------------------


class PackedBasicBlock(nn.Module):
    """ResNet basic block with packed 3×3 convolutions (and a packed 1×1 shortcut when the shape changes); γ
    subdivides the second convolution and the shortcut only."""

    def __init__(self, c_in: int, c_out: int, stride: int, alpha: float, m: int, gamma: int) -> None:
        super().__init__()
        kw = dict(alpha=alpha, num_estimators=m, bias=False)
        # no subgroups in the block's first convolution (torch-uncertainty's packed ResNet; the paper's 8.18M)
        self.conv1 = PackedConv2d(c_in, c_out, 3, stride=stride, padding=1, gamma=1, **kw)
        self.bn1 = nn.BatchNorm2d(self.conv1.out_channels)
        kw["gamma"] = gamma
        self.conv2 = PackedConv2d(c_out, c_out, 3, padding=1, **kw)
        self.bn2 = nn.BatchNorm2d(self.conv2.out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            conv = PackedConv2d(c_in, c_out, 1, stride=stride, **kw)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """`[B, α c_in, H, W]` → `[B, α c_out, H / stride, W / stride]`."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PackedNet(nn.Module):
    """A packed classifier returning `[M, B, C]` member logits.

    Args:
        body: Maps `[B, in_chans, H, W]` to `[B, α F]` packed features.
        head: `PackedLinear(F, C, last=True)`.
        num_estimators: M.
    """

    def __init__(self, body: nn.Module, head: PackedLinear, num_estimators: int) -> None:
        super().__init__()
        self.body, self.head, self.num_estimators = body, head, num_estimators

    def forward(self, x: Tensor) -> Tensor:
        """`[B, in_chans, H, W]` → `[M, B, C]`."""
        return _split_members(self.head(self.body(x)), self.num_estimators)


def packed_resnet18(num_classes: int, in_chans: int = 3, width: int = 64, alpha: float = 2.0,
                    num_estimators: int = 4, gamma: int = 1, small_input: bool = True) -> PackedNet:
    """Packed ResNet-18: [2, 2, 2, 2] basic blocks at widths (1, 2, 4, 8) × `width`, packed by (α, M, γ).

    torch-uncertainty's `packed_resnet(arch=18)` layer for layer (γ only in the blocks' second convolutions and
    shortcuts, and only where each group keeps ≥ 64 input channels): PE-(2, 4, 2) at width 64 with 10 classes has
    8,175,784 parameters, the paper's 8.18M. With α = M = γ = 1 this is exactly a plain ResNet-18 (the baseline
    of `benchmarks/bench_packed_speed.py`).

    Args:
        num_classes: C.
        in_chans: Image channels.
        width: Channels of the first stage of one plain member (64 for the standard ResNet-18).
        alpha, num_estimators, gamma: Packing (paper defaults α = γ = 2, M = 4).
        small_input: CIFAR-style 3×3 stem without max-pool (for 8–32 px images); else the 7×7/2 stem + max-pool.
    """
    m, kw = num_estimators, dict(alpha=alpha, num_estimators=num_estimators, gamma=1)  # stem and head: γ = 1
    stem_conv = (PackedConv2d(in_chans, width, 3, padding=1, bias=False, first=True, **kw) if small_input
                 else PackedConv2d(in_chans, width, 7, stride=2, padding=3, bias=False, first=True, **kw))
    layers: list[nn.Module] = [stem_conv, nn.BatchNorm2d(stem_conv.out_channels), nn.ReLU(inplace=True)]
    if not small_input:
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    c_in = width
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for j in range(2):
            layers.append(PackedBasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1, alpha, m, gamma))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    head = PackedLinear(8 * width, num_classes, last=True, **kw)
    return PackedNet(nn.Sequential(*layers), head, m)


def packed_digits_cnn(num_classes: int, in_chans: int = 1, width: int = 32, alpha: float = 2.0,
                      num_estimators: int = 4, gamma: int = 1) -> PackedNet:
    """Packed version of `vision.models.DigitsCNN` (3 convs, widths w, 2w, 2w), for like-for-like comparisons
    with deep ensembles of `digits_cnn` members on the digits benchmark.

    Grouped as `packed_resnet18`: γ only in the second and third convolutions, and only where each group keeps
    ≥ 64 input channels (so none at widths below 32 · M · γ / α; the stem and the head use γ = 1).
    """
    kw = dict(alpha=alpha, num_estimators=num_estimators, gamma=gamma)
    c1 = PackedConv2d(in_chans, width, 3, padding=1, bias=False, first=True, **{**kw, "gamma": 1})
    c2 = PackedConv2d(width, 2 * width, 3, stride=2, padding=1, bias=False, **kw)
    c3 = PackedConv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False, **kw)
    body = nn.Sequential(
        c1, nn.BatchNorm2d(c1.out_channels), nn.ReLU(inplace=True),
        c2, nn.BatchNorm2d(c2.out_channels), nn.ReLU(inplace=True),
        c3, nn.BatchNorm2d(c3.out_channels), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return PackedNet(body, PackedLinear(2 * width, num_classes, last=True, **{**kw, "gamma": 1}), num_estimators)

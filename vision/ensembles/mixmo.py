"""MixMo (thesis App. D): multi-input multi-output subnetworks with linear or cut mixing.

M members share one core network; member m owns an input convolution c_m and a classifier head. Training
mixes the M encoded inputs l_m = c_m(x_m) (each member gets a differently shuffled copy of the batch):
- Linear-MixMo: M · Σ_m κ_m l_m;
- Cut-MixMo: member k gets a rectangle of area κ_k (or the complement of a rectangle of area 1 − κ_k), the
  others are mixed linearly, weights κ_j / (1 − κ_k), outside it (for M = 2 this is exactly 2[1_M ⊙ l₀ +
  (1 − 1_M) ⊙ l₁]);
κ ~ Dirichlet(2, …, 2) (Beta(2, 2) for M = 2); the loss is Σ_m w_r(κ)_m CE_m with
w_r(κ)_m = M κ_m^{1/r} / Σ_j κ_j^{1/r}, r = 3 (= 2κ^{1/r} / (κ^{1/r} + (1 − κ)^{1/r}) for M = 2).
Cut mixing is used with a probability that stays at p₀ = 0.5 and decays linearly to 0 over the last 1/12 of
training. Batch repetition b repeats each batch b times before shuffling. Inference feeds Σ_m c_m(x) and
averages the heads. Written here: no maintained library ships MixMo.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soups.utils import SoupsError


def reweight_wr(kappa: Tensor, r: float = 3.0) -> Tensor:
    """w_r(κ)_m = M κ_m^{1/r} / Σ_j κ_j^{1/r}.

    Args:
        kappa: `[..., M]` mixing ratios on the simplex.
        r: Reweighting temperature (r = 1: w = Mκ; r → ∞: w → 1).

    Returns:
        `[..., M]` loss weights summing to M.
    """
    root = kappa.clamp_min(0).pow(1.0 / r)
    return kappa.shape[-1] * root / root.sum(-1, keepdim=True)


def cut_probability(step: int, total_steps: int, p0: float = 0.5, decay_fraction: float = 1 / 12) -> float:
    """Patch-mixing probability: p₀ until the last `decay_fraction` of training, then linear to 0 at the end.

    Args:
        step: Current step in [0, total_steps].
        total_steps: Training length.
        p0: Initial probability.
        decay_fraction: Fraction of training over which it decays.

    Returns:
        The probability of using cut mixing at `step`.
    """
    start = total_steps * (1 - decay_fraction)
    if step <= start:
        return p0
    return p0 * max(0.0, (total_steps - step) / (total_steps - start))


def rect_mask(height: int, width: int, area: float, generator: torch.Generator | None = None) -> Tensor:
    """A binary `[H, W]` mask holding one axis-aligned rectangle of (rounded) area `area` · H · W.

    The rectangle has the image's aspect ratio, sides round(H √area) and round(W √area), and a uniformly
    drawn position fully inside the image.
    """
    if not 0.0 <= area <= 1.0:
        raise SoupsError(f"mask area ratio must lie in [0, 1], got {area}")
    h = min(height, int(round(height * math.sqrt(area))))
    w = min(width, int(round(width * math.sqrt(area))))
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    mask = torch.zeros(height, width)
    mask[top : top + h, left : left + w] = 1.0
    return mask


def cut_mask(height: int, width: int, kappa: float, generator: torch.Generator | None = None) -> Tensor:
    """Cut-MixMo mask of area ≈ κ: a rectangle of area κ, or (with probability ½) the complement of a
    rectangle of area 1 − κ, so that the patch member can own most of the image."""
    if float(torch.rand((), generator=generator)) < 0.5:
        return rect_mask(height, width, kappa, generator)
    return 1.0 - rect_mask(height, width, 1.0 - kappa, generator)


def mix_features(
    encoded: Tensor, kappa: Tensor, cut: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Mixes M encoded inputs into one shared feature map.

    Args:
        encoded: `[M, B, K, H, W]` l_m = c_m(x_m).
        kappa: `[B, M]` ratios on the simplex.
        cut: Cut mixing (a patch for a random member k) instead of linear mixing.
        generator: Random source for the patch member and position.

    Returns:
        `[B, K, H, W]` = M Σ_m (per-pixel share of m) · l_m.
    """
    m, b, _, h, w = encoded.shape
    if kappa.shape != (b, m):
        raise SoupsError(f"kappa must have shape [B, M] = [{b}, {m}], got {tuple(kappa.shape)}")
    if not cut:
        return m * torch.einsum("bm,mbkhw->bkhw", kappa.to(encoded.dtype), encoded)
    shares = torch.empty(b, m, h, w, dtype=encoded.dtype, device=encoded.device)
    for n in range(b):
        k = int(torch.randint(0, m, (1,), generator=generator))
        mask = cut_mask(h, w, float(kappa[n, k]), generator).to(encoded)
        rest = (kappa[n] / (1 - kappa[n, k]).clamp_min(1e-12)).to(encoded)
        shares[n] = rest[:, None, None] * (1 - mask)
        shares[n, k] = mask
    return m * torch.einsum("bmhw,mbkhw->bkhw", shares, encoded)


def mask_area_shares(shares: Tensor) -> Tensor:
    """Fraction of pixels owned by each member, from per-pixel shares `[B, M, H, W]` → `[B, M]`."""
    return shares.mean(dim=(-2, -1))


class MixMoNet(nn.Module):
    """MixMo network: M input convolutions, a shared core, M linear heads.

    Args:
        core: Maps `[B, K, H, W]` to `[B, F]` features.
        in_channels: Image channels.
        width: K, channels of the encoded inputs.
        feature_dim: F.
        num_classes: C.
        num_members: M.
    """

    def __init__(self, core: nn.Module, in_channels: int, width: int, feature_dim: int, num_classes: int,
                 num_members: int) -> None:
        super().__init__()
        if num_members < 2:
            raise SoupsError(f"MixMo needs at least 2 members, got {num_members}")
        self.num_members = num_members
        self.inputs = nn.ModuleList(nn.Conv2d(in_channels, width, 3, padding=1) for _ in range(num_members))
        self.core = core
        self.heads = nn.ModuleList(nn.Linear(feature_dim, num_classes) for _ in range(num_members))

    def encode(self, xs: Tensor) -> Tensor:
        """`[M, B, Cin, H, W]` member inputs → `[M, B, K, H, W]`."""
        return torch.stack([conv(x) for conv, x in zip(self.inputs, xs)])

    def heads_forward(self, mixed: Tensor) -> Tensor:
        """`[B, K, H, W]` mixed features → `[M, B, C]` member logits."""
        feats = self.core(mixed)
        return torch.stack([head(feats) for head in self.heads])

    def fused_input(self, x: Tensor) -> Tensor:
        """Σ_m c_m(x) for one input `[B, Cin, H, W]` → `[B, K, H, W]`, as ONE convolution.

        Convolution is linear in its weights, so Σ_m (W_m * x + b_m) = (Σ_m W_m) * x + Σ_m b_m: at inference,
        where every member sees the same image, the M encoders cost one (equal to `encode(...).sum(0)` up to
        float rounding, tested).
        """
        first = self.inputs[0]
        weight = torch.stack([conv.weight for conv in self.inputs]).sum(0)
        bias = torch.stack([conv.bias for conv in self.inputs]).sum(0) if first.bias is not None else None
        return F.conv2d(x, weight, bias, stride=first.stride, padding=first.padding, dilation=first.dilation,
                        groups=first.groups)

    def forward(self, x: Tensor) -> Tensor:
        """Inference: the core sees Σ_m c_m(x); returns `[M, B, C]` (average them to predict)."""
        return self.heads_forward(self.fused_input(x))


def mixmo_loss(
    model: MixMoNet,
    x: Tensor,
    y: Tensor,
    cut_prob: float,
    repetitions: int = 2,
    r: float = 3.0,
    concentration: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One MixMo training loss: batch repetition, per-member shuffles, κ ~ Dir(2), mixing, w_r-weighted CE.

    Args:
        model: The MixMo network.
        x: `[B, Cin, H, W]` images.
        y: `[B]` labels.
        cut_prob: Probability of cut mixing for this batch (see `cut_probability`).
        repetitions: Batch repetition b.
        r: w_r temperature.
        concentration: Dirichlet/Beta concentration of κ.
        generator: Random source.

    Returns:
        Scalar mean over the repeated batch of Σ_m w_r(κ)_m CE_m / M (so equal weights give the mean CE).
    """
    m = model.num_members
    xr, yr = x.repeat(repetitions, *([1] * (x.ndim - 1))), y.repeat(repetitions)
    n = yr.numel()
    perms = [torch.arange(n)] + [torch.randperm(n, generator=generator) for _ in range(m - 1)]
    xs = torch.stack([xr[p] for p in perms])
    ys = torch.stack([yr[p] for p in perms])  # [M, N]
    gammas = torch._standard_gamma(torch.full((n, m), float(concentration)), generator=generator)
    kappa = gammas / gammas.sum(-1, keepdim=True)  # [N, M] ~ Dirichlet(concentration)
    cut = float(torch.rand((), generator=generator)) < cut_prob
    logits = model.heads_forward(mix_features(model.encode(xs), kappa, cut, generator))  # [M, N, C]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(m, n)
    return (reweight_wr(kappa, r).T.to(ce) * ce).sum(0).mean() / m

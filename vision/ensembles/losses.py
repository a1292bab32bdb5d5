"""Diversity losses for ensembles, as small pure functions on member outputs.

Conventions: member logits are `[M, B, C]`; the deep-ensemble loss is the mean over members of their
cross-entropies, `ensemble_ce`. Every diversity loss is written as `ensemble_ce + λ · term`, so λ = 0 gives the
deep-ensemble loss exactly (tested). Formulas follow methods.md §5; where the source sums over members we
take the mean (a 1/M rescaling of the whole objective, which only changes the effective learning rate) so the
λ = 0 reduction is an equality.

These are written here rather than taken from a library: no maintained package implements A2D/SED, GNCL,
SDDE or DICE (torch-uncertainty has the packed layers and metrics only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from soups.utils import SoupsError
from vision.ensembles.combine import check_member_logits


def ensemble_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Deep-ensemble loss: (1/M) Σ_m CE(z^m, y), each CE averaged over the batch.

    Args:
        logits: `[M, B, C]`.
        labels: `[B]`.

    Returns:
        Scalar.
    """
    m, b, c = check_member_logits(logits, labels)
    return F.cross_entropy(logits.reshape(m * b, c), labels.repeat(m))


# ----------------------------------------------------------------------------------------------------------------
# SED: A2D on all samples weighted by stop-gradient α_n (seed 000, Eq. 4–6)
# ----------------------------------------------------------------------------------------------------------------


def a2d(p: Tensor, q: Tensor) -> Tensor:
    """Agree-to-Disagree: A2D(p, q) = −log[p_ŷ (1 − q_ŷ) + (1 − p_ŷ) q_ŷ], ŷ = argmax p (seed 000 Eq. 4).

    Args:
        p: `[B, C]` probabilities of the first member.
        q: `[B, C]` probabilities of the second member.

    Returns:
        `[B]` per-sample A2D (≥ 0; 0 when the two members disagree completely on ŷ).
    """
    y_hat = p.argmax(-1, keepdim=True)
    p_y = p.gather(-1, y_hat).squeeze(-1)
    q_y = q.gather(-1, y_hat).squeeze(-1)
    return -torch.log((p_y * (1 - q_y) + (1 - p_y) * q_y).clamp_min(1e-12))


def sed_weights(logits: Tensor, labels: Tensor) -> Tensor:
    """SED sample weights α_n = CE(f̄; x_n, y_n) / (mean_B CE(f̄))², f̄ = mean member logits (Eq. 5), detached.

    Args:
        logits: `[M, B, C]`.
        labels: `[B]`.

    Returns:
        `[B]` non-negative weights (no gradient).
    """
    check_member_logits(logits, labels)
    ce = F.cross_entropy(logits.detach().mean(0), labels, reduction="none")
    return ce / ce.mean().clamp_min(1e-12) ** 2


def sed_diversity(logits: Tensor, labels: Tensor, pair: tuple[int, ...] | None = None) -> Tensor:
    """SED diversity term (1 / (N |I|(|I|−1))) Σ_n Σ_{m<l ∈ I} stopgrad(α_n) A2D(p^m(x_n), p^l(x_n)).

    Args:
        logits: `[M, B, C]`.
        labels: `[B]`.
        pair: The member subset I (|I| = 2 in SED's stochastic pairing); all members when None.

    Returns:
        Scalar.
    """
    m, _, _ = check_member_logits(logits, labels)
    idx = tuple(range(m)) if pair is None else tuple(pair)
    if len(idx) < 2 or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= m:
        raise SoupsError(f"SED member subset {idx} must hold >= 2 distinct indices in [0, {m})")
    alpha = sed_weights(logits, labels)
    probs = logits.softmax(-1)
    total = logits.new_zeros(())
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            total = total + (alpha * a2d(probs[idx[a]], probs[idx[b]])).sum()
    k = len(idx)
    return total / (logits.shape[1] * k * (k - 1))


def sed_loss(logits: Tensor, labels: Tensor, lam: float, pair: tuple[int, ...] | None = None) -> Tensor:
    """SED objective (Eq. 6): ensemble_ce + λ · sed_diversity (over the pair subset I)."""
    base = ensemble_ce(logits, labels)
    return base if lam == 0 else base + lam * sed_diversity(logits, labels, pair)


def random_pair(m: int, generator: torch.Generator | None = None, size: int = 2) -> tuple[int, ...]:
    """Draws SED's stochastic member subset I ⊂ {0..M−1}, |I| = size, sorted."""
    if m < size:
        raise SoupsError(f"SED needs at least {size} members for its pair subset, got M = {m}")
    return tuple(sorted(torch.randperm(m, generator=generator)[:size].tolist()))


# ----------------------------------------------------------------------------------------------------------------
# NCL / GNCL and the balanced loss (design-diversity paper, seed 003)
# ----------------------------------------------------------------------------------------------------------------


def gncl_penalty(logits: Tensor, hessian: str = "ce") -> Tensor:
    """(1/(2M)) · mean_B Σ_m d_mᵀ D d_m with d_m = z^m − f̄ (logit deviations from the mean logit).

    `hessian="ce"` uses the cross-entropy Hessian at the ensemble output, D = diag(p_f) − p_f p_fᵀ
    (p_f = softmax(f̄), detached: D is the curvature where the ensemble stands, not a quantity to optimise);
    `hessian="identity"` uses D = I (Liu & Yao's NCL for the squared loss).

    Args:
        logits: `[M, B, C]`.
        hessian: `ce` (GNCL) or `identity` (NCL).

    Returns:
        Scalar ≥ 0.
    """
    m, _, _ = check_member_logits(logits)
    mean = logits.mean(0, keepdim=True)
    d = logits - mean  # [M, B, C]
    if hessian == "identity":
        quad = (d * d).sum(-1)  # [M, B]
    elif hessian == "ce":
        p = mean.squeeze(0).softmax(-1).detach()  # [B, C]
        # dᵀ (diag(p) − p pᵀ) d = Σ_c p_c d_c² − (Σ_c p_c d_c)²
        quad = (p * d * d).sum(-1) - (p * d).sum(-1) ** 2
    else:
        raise SoupsError(f"unknown NCL hessian {hessian!r}; valid: ce, identity")
    return quad.sum(0).mean() / (2 * m)


def gncl_loss(logits: Tensor, labels: Tensor, lam: float, hessian: str = "ce") -> Tensor:
    """GNCL (Webb et al.): (1/M) [Σ_m ℓ(z^m, y) − (λ/2M) Σ_m d_mᵀ D d_m] = ensemble_ce − (λ/M) · gncl_penalty."""
    m = logits.shape[0] if logits.ndim == 3 else 1
    base = ensemble_ce(logits, labels)
    return base if lam == 0 else base - lam / m * gncl_penalty(logits, hessian)


def ncl_penalty(logits: Tensor) -> Tensor:
    """NCL penalty on the members' probability outputs: (1/(2M)) · mean_B Σ_m ‖p^m − p̄‖², p̄ = mean_m p^m.

    Liu & Yao's negative correlation is the D = I case of GNCL for outputs trained with the squared loss. Taken
    on logits under CE (`gncl_penalty(logits, "identity")`) it is unbounded: members can push wrong-class logits
    apart without limit at almost no CE cost, and `CE − λ · penalty` diverges to −∞ for any λ > 0 (it did on
    the digits bench). On probabilities the penalty is bounded (≤ 1 per sample: ‖p − p̄‖² ≤ 2), so the
    objective is bounded below and λ trades member accuracy for spread.

    Args:
        logits: `[M, B, C]`.

    Returns:
        Scalar in [0, 1].
    """
    m, _, _ = check_member_logits(logits)
    p = logits.softmax(-1)
    d = p - p.mean(0, keepdim=True)  # [M, B, C]
    return (d * d).sum(-1).sum(0).mean() / (2 * m)


def ncl_loss(logits: Tensor, labels: Tensor, lam: float) -> Tensor:
    """NCL: ensemble_ce − (λ/M) · ncl_penalty (same scaling as `gncl_loss`)."""
    m = logits.shape[0] if logits.ndim == 3 else 1
    base = ensemble_ce(logits, labels)
    return base if lam == 0 else base - lam / m * ncl_penalty(logits)


def balanced_loss(logits: Tensor, labels: Tensor, lam: float) -> Tensor:
    """Balanced loss (Rosales et al.): λ ℓ(f̄, y) + (1 − λ) mean_m ℓ(z^m, y), f̄ the mean logit."""
    base = ensemble_ce(logits, labels)
    if lam == 0:
        return base
    return lam * F.cross_entropy(logits.mean(0), labels) + (1 - lam) * base


def attribution_variance(grads: Tensor, normalize: bool = True, eps: float = 1e-12) -> Tensor:
    """Attribution diversity A = mean_B Σ_{c,p} Var_members(a^m) (population variance over members).

    With `normalize` (the default), a^m = |∂out/∂x| / ‖∂out/∂x‖₂ per member and sample, so A = mean_B
    (1 − ‖ā‖²) ∈ [0, 1] measures how differently the members spread their attribution over the pixels. The raw
    variance (`normalize=False`, a^m = |∂out/∂x|) grows with the gradient scale, so `CE − λ · A` is unbounded
    below: members inflate their input gradients instead of moving them (it diverged to chance accuracy on the
    digits bench at λ = 1).

    Args:
        grads: `[M, B, ...]` input gradients of each member's output (e.g. its true-class logit).
        normalize: Unit-L2-normalise each member's attribution map per sample first.
        eps: Added to the norm so all-zero gradients do not divide by zero.

    Returns:
        Scalar ≥ 0 (≤ 1 when normalised).
    """
    if grads.ndim < 3:
        raise SoupsError(f"attribution grads must have shape [M, B, ...], got {tuple(grads.shape)}")
    a = grads.abs().flatten(2)  # [M, B, P]
    if normalize:
        a = a / (a.norm(dim=-1, keepdim=True) + eps)
    return a.var(0, unbiased=False).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# SDDE: Grad-CAM cosine diversity (seed 004)
# ----------------------------------------------------------------------------------------------------------------


def grad_cam(features: Tensor, grads: Tensor, relu: bool = True) -> Tensor:
    """Grad-CAM map S = ReLU(Σ_k w_k A_k) with w_k = mean_{h,w} ∂z_y/∂A_k.

    Args:
        features: `[..., K, H, W]` activations A.
        grads: `[..., K, H, W]` gradients of the true-class logit w.r.t. A (keep the graph for double backprop).
        relu: Apply the ReLU of standard Grad-CAM.

    Returns:
        `[..., H, W]`.
    """
    weights = grads.mean(dim=(-2, -1), keepdim=True)
    cam = (weights * features).sum(-3)
    return cam.relu() if relu else cam


def saliency_cosine(maps: Tensor, border: int = 1, eps: float = 1e-6) -> Tensor:
    """SDDE diversity: mean over ordered pairs i ≠ j and the batch of cos(S^i, S^j) after cropping a `border`
    pixel frame and standardising each map (zero mean, unit std).

    Args:
        maps: `[M, B, H, W]` saliency maps.
        border: Pixels cropped on each side.
        eps: Added to the std so constant maps do not divide by zero.

    Returns:
        Scalar in [−1, 1]; lower is more diverse.
    """
    if maps.ndim != 4 or maps.shape[0] < 2:
        raise SoupsError(f"saliency maps must have shape [M >= 2, B, H, W], got {tuple(maps.shape)}")
    if border:
        if maps.shape[-1] <= 2 * border or maps.shape[-2] <= 2 * border:
            raise SoupsError(f"saliency maps {tuple(maps.shape)} too small to crop a {border}-pixel border")
        maps = maps[..., border:-border, border:-border]
    flat = maps.flatten(2)
    flat = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True) + eps)
    unit = F.normalize(flat, dim=-1, eps=eps)  # [M, B, P]
    sim = torch.einsum("ibp,jbp->ijb", unit, unit)  # [M, M, B]
    m = maps.shape[0]
    off = ~torch.eye(m, dtype=torch.bool, device=maps.device)
    return sim[off].mean()


# ----------------------------------------------------------------------------------------------------------------
# DICE: VCEB per member and conditional redundancy (thesis ch. 3)
# ----------------------------------------------------------------------------------------------------------------


def gaussian_kl_to_unit(mu: Tensor, logvar: Tensor, prior_mu: Tensor) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(b, I)) = ½ Σ_d [σ² + (μ − b)² − 1 − log σ²].

    Args:
        mu: `[B, D]`.
        logvar: `[B, D]` log σ².
        prior_mu: `[B, D]` the backward encoder's class mean b(y).

    Returns:
        `[B]`.
    """
    return 0.5 * (logvar.exp() + (mu - prior_mu) ** 2 - 1 - logvar).sum(-1)


def vceb(logits: Tensor, labels: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor, beta: float) -> Tensor:
    """Variational conditional entropy bottleneck of one member: mean_B [(1/β) KL(e(·|x) ‖ b(·|y)) − log d(y|z)].

    Args:
        logits: `[B, C]` classifier output on a sampled z.
        labels: `[B]`.
        mu, logvar: `[B, D]` encoder Gaussian.
        prior_mu: `[B, D]` class embeddings b(y) of the labels.
        beta: Bottleneck strength (β → ∞ recovers plain CE).

    Returns:
        Scalar.
    """
    return F.cross_entropy(logits, labels) + gaussian_kl_to_unit(mu, logvar, prior_mu).mean() / beta


def same_class_permutation(labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A permutation π of the batch with labels[π(n)] = labels[n], shuffling inside each class.

    Args:
        labels: `[B]`.

    Returns:
        `[B]` long indices.
    """
    perm = torch.arange(labels.numel(), device=labels.device)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        perm[idx] = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
    return perm


def cr_member_loss(disc_logit_joint: Tensor) -> Tensor:
    """Members' conditional-redundancy loss L^CR = mean over joint pairs of log(w / (1 − w)) = the
    discriminator's logit (w = sigmoid(logit)).

    Args:
        disc_logit_joint: `[B]` discriminator logits on joint pairs (z₁(x_n), z₂(x_n), y_n).

    Returns:
        Scalar.
    """
    return disc_logit_joint.mean()


def cr_discriminator_loss(disc_logit_joint: Tensor, disc_logit_product: Tensor) -> Tensor:
    """BCE of the discriminator: joint pairs labelled 1, same-class product pairs labelled 0.

    Args:
        disc_logit_joint: `[B]`.
        disc_logit_product: `[B]`.

    Returns:
        Scalar.
    """
    return F.binary_cross_entropy_with_logits(
        disc_logit_joint, torch.ones_like(disc_logit_joint)
    ) + F.binary_cross_entropy_with_logits(disc_logit_product, torch.zeros_like(disc_logit_product))

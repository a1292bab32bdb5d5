"""PPO maths for causal LMs: masked statistics, GAE, clipped losses, per-token KL, KL controllers, entropy.

Everything here is a small pure function on tensors of shape [B, T] (B sequences, T response tokens) with a
0/1 `mask` of the same shape marking real response tokens (1) and right padding after EOS (0). These are
written by hand rather than imported from trl because trl's PPO was moved to `trl.experimental` and is
removed after 1.12 (see the README's PPO section); the formulas follow Schulman et al. 2017 (PPO), Schulman
et al. 2016 (GAE), Ziegler et al. 2019 (KL penalty, adaptive controller) and Schulman's "Approximating KL
divergence" note (k1/k2/k3 estimators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soups.utils import SoupsError

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


# ----------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1.

    Args:
        x: Values, shape [B, T] (any shape works).
        mask: 0/1 mask, same shape as `x`.
        dim: Reduce along this dimension only (e.g. `dim=1` gives one mean per sequence, shape [B]); `None`
            reduces everything to a scalar.

    Returns:
        The masked mean: a scalar, or a tensor with `dim` removed.

    Raises:
        SoupsError: the shapes differ, or (for `dim=None`) the mask is empty.
    """
    if x.shape != mask.shape:
        raise SoupsError(f"masked_mean: values have shape {tuple(x.shape)} but mask has {tuple(mask.shape)}")
    mask = mask.to(x.dtype)
    if dim is None:
        count = mask.sum()
        if count.item() == 0:
            raise SoupsError("masked_mean: the mask selects no element")
        return (x * mask).sum() / count
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of `x` (Bessel-corrected by default).

    Args:
        x: Values, shape [B, T].
        mask: 0/1 mask, shape [B, T].
        unbiased: Multiply the population variance by n / (n - 1), n = number of masked entries.

    Returns:
        A scalar tensor.

    Raises:
        SoupsError: fewer than 2 masked entries with `unbiased=True` (the variance is undefined).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().item()
        if n < 2:
            raise SoupsError(f"masked_var: need at least 2 masked entries for an unbiased variance, got {n:g}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Standardises the masked entries of `x`: (x - mean) / sqrt(var + eps); masked-out entries become 0.

    Args:
        x: Values, shape [B, T] (e.g. advantages).
        mask: 0/1 mask, shape [B, T].
        shift_mean: If false, the mean is added back (only the scale is normalised), as for rewards.
        eps: Added to the variance for numerical safety.

    Returns:
        The whitened tensor, shape [B, T].
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL
# ----------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token.

    Args:
        logits: Shape [B, T, V], the logits that predict `tokens`.
        tokens: Shape [B, T], token ids.

    Returns:
        Shape [B, T]: log softmax(logits)[b, t, tokens[b, t]].
    """
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits), per position.

    H = logsumexp(z) - Σ_v softmax(z)_v z_v.

    Args:
        logits: Shape [B, T, V].

    Returns:
        Shape [B, T], in nats.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the log-probabilities of the sampled tokens.

    With d = log π(y_t) - log π_ref(y_t) and y_t ~ π:
    `k1` = d (unbiased, may be negative); `k2` = d² / 2 (biased, low variance); `k3` = exp(-d) - 1 + d
    (unbiased and ≥ 0); `abs` = |d|.

    Args:
        logprobs: Shape [B, T], the policy's log-probabilities of the sampled tokens.
        ref_logprobs: Shape [B, T], the reference policy's.
        estimator: One of `KL_ESTIMATORS`.

    Returns:
        Shape [B, T].

    Raises:
        SoupsError: unknown estimator.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise SoupsError(f"unknown KL estimator {estimator!r}; valid names: {', '.join(KL_ESTIMATORS)}")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of Ziegler et al.: r_t = -β kl_t, plus the sequence score on the last real token.

    Args:
        scores: Shape [B], the scalarised reward of each response.
        kl: Shape [B, T], per-token KL estimates.
        mask: Shape [B, T], 0/1; each row must have at least one 1.
        kl_coef: β ≥ 0.

    Returns:
        (rewards [B, T], non_score_rewards [B, T]) where non_score_rewards = -β kl · mask.

    Raises:
        SoupsError: a row of the mask is empty (an empty response has no token to reward).
    """
    mask_f = mask.to(kl.dtype)
    lengths = mask.long().sum(1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise SoupsError(f"token_rewards: response {row} has no token (empty mask row)")
    non_score = -kl_coef * kl * mask_f
    rewards = non_score.clone()
    # Last real token of each row: the highest index whose mask is 1 (masks are right-padded).
    last = (mask_f * torch.arange(1, mask.shape[1] + 1, dtype=kl.dtype)).argmax(1)
    rewards[torch.arange(mask.shape[0]), last] += scores.to(kl.dtype)
    return rewards, non_score


# ----------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    δ_t = r_t + γ V_{t+1} m_{t+1} - V_t and A_t = δ_t + γ λ m_{t+1} A_{t+1}, with V and A zero after the last
    token. Masked-out (padding) positions get A = 0 and return 0.

    Args:
        rewards: Shape [B, T], per-token rewards.
        values: Shape [B, T], value estimates V(s_t) (the state before token t).
        mask: Shape [B, T], 0/1 right-padded mask.
        gamma: Discount γ in [0, 1].
        lam: GAE λ in [0, 1].

    Returns:
        (advantages [B, T], returns [B, T]) with returns = advantages + values on real tokens.
    """
    mask_f = mask.to(values.dtype)
    rewards = rewards * mask_f
    values = values * mask_f
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_mask = mask_f[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask_f
    return advantages, (advantages + values) * mask_f


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PolicyLossOut:
    """The clipped policy loss and its diagnostics (all scalar tensors)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> PolicyLossOut:
    """PPO's clipped surrogate: mean_t max(-A ρ, -A clip(ρ, 1-ε, 1+ε)), ρ = exp(log π - log π_old).

    Args:
        logprobs: Shape [B, T], current policy (with gradient).
        old_logprobs: Shape [B, T], the rollout policy's (no gradient).
        advantages: Shape [B, T].
        mask: Shape [B, T], 0/1.
        clip: ε > 0.

    Returns:
        The loss (masked mean over tokens), the fraction of tokens where the clipped term was active,
        approx KL(π_old || π) = mean ½ (log ρ)², and the mean ratio.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return PolicyLossOut(loss, clipfrac.detach(), approx_kl, masked_mean(ratio.detach(), mask))


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss: ½ mean_t max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²).

    Args:
        values: Shape [B, T], current value head (with gradient).
        old_values: Shape [B, T], values at rollout time.
        returns: Shape [B, T], GAE returns.
        mask: Shape [B, T], 0/1.
        clip: ε_v > 0.

    Returns:
        (loss, clipfrac): scalars; clipfrac is the fraction of tokens where the clipped error was larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask).detach()
    return loss, clipfrac


# ----------------------------------------------------------------------------------------------------------
# KL controllers (Ziegler et al. 2019)
# ----------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, init_kl_coef: float) -> None:
        if not math.isfinite(init_kl_coef) or init_kl_coef < 0:
            raise SoupsError(f"kl.init_coef must be a finite number >= 0, got {init_kl_coef}")
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for the common interface)."""

    def state_dict(self) -> dict[str, float]:
        """The controller's state, JSON-serialisable."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restores `state_dict()`."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller: β ← β (1 + clip(KL/KL_target - 1, -0.2, 0.2) n / horizon).

    Args:
        init_kl_coef: Initial β.
        target: KL_target (nats per sequence), > 0.
        horizon: Horizon in samples, > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        if not target > 0 or not horizon > 0:
            raise SoupsError(f"adaptive KL needs kl.target > 0 and kl.horizon > 0, got {target} and {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Updates β after a batch of `n_steps` samples whose mean sequence KL was `current_kl`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

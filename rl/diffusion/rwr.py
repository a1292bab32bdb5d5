"""Reward-weighted regression (RWR) for text-to-image diffusion: the maths, as small pure functions.

Thesis §6.3.3 and Lee et al. 2023 ("Aligning text-to-image models using human feedback"): generate images with
the current model, score them, keep the best `keep` fraction for the run's (scalarised) reward, and fine-tune on
the kept images with the denoising loss, each image weighted by a function of its reward:

    L(θ) = Σ_i w_i ‖ε_i − ε_θ(x_{t_i}, t_i, c_i)‖² / Σ_i w_i

where x_{t_i} = √ᾱ_t x_0 + √(1 − ᾱ_t) ε_i noises the kept latent x_0 at a uniform timestep t_i. The squared norm is
taken as a mean over the latent's elements (C·H·W), which only rescales the learning rate, and matches diffusers'
training scripts (`F.mse_loss(..., reduction="mean")`) when every w_i is equal.

Weightings (`rwr.weighting`), over the kept set K (their sum is normalised to 1):

- `uniform`: w_i = 1/|K| — the thesis' setting (drop the lowest half, then plain fine-tuning on the rest);
- `raw`: w_i ∝ r_i − min_j r_j, the minimum taken over the whole GENERATED set (not only the kept one). Shifting
  makes the weights ≥ 0 for any reward (MORL's normalised rewards are negative half the time) and invariant to a
  constant added to the reward; taking the generated set's minimum keeps the weakest kept image's weight > 0
  whenever it beats the worst generated image. When every generated reward is equal, the weights are uniform.
- `softmax`: w_i ∝ exp(r_i / T) with temperature T (`rwr.temperature`): T → ∞ is uniform, T → 0 is the arg max.

Prior preservation (`rwr.prior_weight` β > 0; DreamBooth, Ruiz et al. 2023, §3.3): fine-tuning only on the model's
own kept samples drifts it away from what it was pre-trained to do (on the embedded task, every RWR expert lost
prompt fidelity whatever its reward). Each step then also denoises a batch of prior images x'_j (`rwr.prior_data`:
the init's pre-training scenes, or the init's own round-0 samples as in DreamBooth) with their prompts:

    L(θ) = L_RWR(θ) + β · (1/m) Σ_j ‖ε'_j − ε_θ(x'_{t_j}, t_j, c'_j)‖²

β = 0 is the thesis' RWR exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from evals.errors import SoupsError

__all__ = ["WEIGHTINGS", "effective_sample_size", "keep_count", "prior_preserved_loss", "rwr_weights", "select_top",
           "select_top_per_group", "weighted_denoising_loss"]

WEIGHTINGS = ("uniform", "raw", "softmax")


def keep_count(n: int, keep: float) -> int:
    """How many of `n` images the top-`keep` selection keeps: ceil(keep · n), at least 1.

    Ceil, so a fraction never rounds to an empty set and keep=0.5 of an odd n keeps the middle image
    (0.5 · 5 = 2.5 -> 3); 0.5 of 10,000 is 5,000 as in the thesis.

    Raises:
        SoupsError: keep not in (0, 1] or n < 1.
    """
    if not 0.0 < float(keep) <= 1.0 or not math.isfinite(float(keep)):
        raise SoupsError(f"rwr.keep={keep!r} must be a fraction in (0, 1]")
    if int(n) < 1:
        raise SoupsError(f"rwr: nothing to select from ({n} images)")
    return max(1, min(int(n), math.ceil(float(keep) * int(n) - 1e-9)))


def select_top(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices of the top-`keep` fraction of `scores`, best first; ties go to the lower index (stable).

    Args:
        scores: Tensor[N], the scalarised reward of each generated image (finite).
        keep: Fraction kept, in (0, 1] (see `keep_count`).

    Returns:
        LongTensor[k] with k = keep_count(N, keep); e.g. scores [0.1, 0.9, 0.5, 0.9], keep 0.5 -> [1, 3].
    """
    if scores.ndim != 1:
        raise SoupsError(f"rwr: scores must be one value per image, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise SoupsError("rwr: cannot select on non-finite scores")
    k = keep_count(scores.shape[0], keep)
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:k]


def select_top_per_group(scores: torch.Tensor, groups: Sequence[Any], keep: float) -> torch.Tensor:
    """`select_top` within each group (e.g. the images of one prompt), so every group keeps its best `keep` share.

    Selecting over the whole round keeps the *prompts* the reward likes (vivid colour words for colourfulness)
    rather than the better renderings of every prompt; within a prompt, the kept images differ only by their
    seed, so the expert learns how to draw any prompt for its reward.

    Args:
        scores: Tensor[N], the scalarised reward of each image (finite).
        groups: N hashable group labels (e.g. the prompts).
        keep: Fraction kept in each group, in (0, 1] (see `keep_count`).

    Returns:
        LongTensor of the kept indices, best first within each group, groups in order of first appearance;
        e.g. scores [0.1, 0.9, 0.5, 0.2], groups [a, a, b, b], keep 0.5 -> [1, 2].
    """
    if len(groups) != scores.shape[0]:
        raise SoupsError(f"rwr: {len(groups)} group labels for {scores.shape[0]} scores")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    kept = []
    for idx in members.values():
        index = torch.tensor(idx, dtype=torch.long)
        kept.append(index[select_top(scores[index], keep)])
    return torch.cat(kept)


def rwr_weights(kept: torch.Tensor, generated: torch.Tensor, weighting: str, temperature: float = 1.0) -> torch.Tensor:
    """Per-image weights of the kept images, summing to 1 (see the module docstring for each weighting).

    Args:
        kept: Tensor[k], the scalarised rewards of the kept images.
        generated: Tensor[N], the scalarised rewards of every generated image (the kept ones among them); `raw`
            shifts by its minimum.
        weighting: One of `WEIGHTINGS`.
        temperature: The softmax temperature T > 0 (`softmax` only).

    Returns:
        Tensor[k] float64, ≥ 0, summing to 1. E.g. generated [0, 1, 2, 3], kept [3, 2]: uniform [0.5, 0.5];
        raw (3 − 0, 2 − 0) / 5 = [0.6, 0.4]; softmax T=1: e^3 / (e^3 + e^2) = 1 / (1 + e^-1) = [0.7311, 0.2689].
    """
    if weighting not in WEIGHTINGS:
        raise SoupsError(f"rwr.weighting={weighting!r} is not valid; valid options: {', '.join(WEIGHTINGS)}")
    if kept.ndim != 1 or kept.shape[0] < 1:
        raise SoupsError(f"rwr: the kept rewards must be a non-empty vector, got shape {tuple(kept.shape)}")
    r = kept.double()
    if weighting == "uniform":
        return torch.full_like(r, 1.0 / r.shape[0])
    if weighting == "raw":
        shifted = r - generated.double().min()
        if float(shifted.min()) < 0:
            raise SoupsError("rwr: the kept rewards must be among the generated ones (a kept reward is below the "
                             "generated minimum)")  # fmt: skip
        total = float(shifted.sum())
        return shifted / total if total > 0 else torch.full_like(r, 1.0 / r.shape[0])
    if not float(temperature) > 0 or not math.isfinite(float(temperature)):
        raise SoupsError(f"rwr.temperature={temperature!r} must be a finite number > 0")
    return torch.softmax(r / float(temperature), dim=0)


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size (Σ w)² / Σ w² of Tensor[k] weights: k for uniform weights, 1 for one-hot.

    E.g. [0.6, 0.4]: 1 / (0.36 + 0.16) = 1.923.
    """
    w = weights.double()
    return float(w.sum() ** 2 / (w**2).sum())


def weighted_denoising_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reward-weighted denoising loss Σ_i w_i mean(‖target_i − pred_i‖²) / Σ_i w_i.

    Args:
        pred: Tensor[B, C, H, W], the UNet's prediction ε_θ(x_t, t, c) (or v, with a v-prediction target).
        target: Tensor[B, C, H, W], what it should predict (the noise ε for ε-prediction).
        weights: Tensor[B] ≥ 0 with a positive sum, the images' RWR weights (normalised here over the batch).

    Returns:
        A scalar tensor (differentiable in `pred`), float32 for float32 inputs. E.g. per-image squared errors
        [1, 3] with weights [3, 1]: (3·1 + 1·3) / 4 = 1.5.
    """
    if pred.shape != target.shape or pred.ndim < 2 or weights.shape != (pred.shape[0],):
        raise SoupsError(f"rwr loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and weights "
                         f"{tuple(weights.shape)} do not match")  # fmt: skip
    per_image = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)  # [B]
    w = weights.to(per_image.device, per_image.dtype)
    return (w * per_image).sum() / w.sum()


def prior_preserved_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, prior_pred: torch.Tensor,
    prior_target: torch.Tensor, prior_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The RWR loss plus β × the prior-preservation loss (see the module docstring), and the prior term alone.

    Args:
        pred: Tensor[B, C, H, W], the UNet's prediction on the kept images.
        target: Tensor[B, C, H, W], its target (ε).
        weights: Tensor[B] ≥ 0, the kept images' RWR weights (`weighted_denoising_loss`).
        prior_pred: Tensor[M, C, H, W], the UNet's prediction on the prior images.
        prior_target: Tensor[M, C, H, W], its target.
        prior_weight: β ≥ 0.

    Returns:
        (total, prior) scalar tensors: total = weighted_denoising_loss(pred, target, weights) + β · prior, prior =
        the plain mean squared error on the prior batch. E.g. kept per-image squared errors [1, 3] with weights
        [3, 1] (RWR term 1.5), prior per-image errors [2, 4] (prior term 3), β = 0.5: total 1.5 + 0.5·3 = 3.0.
    """
    if not float(prior_weight) >= 0 or not math.isfinite(float(prior_weight)):
        raise SoupsError(f"rwr.prior_weight={prior_weight!r} must be a finite number >= 0")
    if prior_pred.shape != prior_target.shape or prior_pred.ndim < 2:
        raise SoupsError(f"prior loss: pred {tuple(prior_pred.shape)} and target {tuple(prior_target.shape)} do not "
                         "match")  # fmt: skip
    main = weighted_denoising_loss(pred, target, weights)
    prior = ((prior_pred.float() - prior_target.float()) ** 2).mean()
    return main + float(prior_weight) * prior, prior

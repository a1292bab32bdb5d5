"""Metric rewards of captioning and the SCST loss (self-critical sequence training, Rennie et al. 2017).

Rewards are caption metrics of `evals.captioning` (pycocoevalcap's BLEU, ROUGE-L, CIDEr-D, METEOR); every
configured objective is computed on every batch from ONE scorer call (METEOR's Java process is fed once per
batch) and scalarised by the shared `RewardSet` (an expert: one metric; `morl`: Σ μ_i metric_i), so logging,
MORL weights and normalisation are those of every other trainer.

`REWARDS` maps an objective name to the metric it reads (`bleu1` → BLEU-1, `cider` → CIDEr-D, ...); CIDEr-D's
document frequencies come from the training references, as in SCST.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from evals.captioning import METRICS, CaptionScorer
from rl.runtime import RewardSet, morl_weights
from soups.utils import SoupsError

__all__ = [
    "BASELINES",
    "REWARDS",
    "ScstLoss",
    "build_caption_rewards",
    "greedy_baseline",
    "leave_one_out_baseline",
    "scst_loss",
]

# Objective name -> metric of `evals.captioning` (the names users type in `reward.objectives`).
REWARDS: dict[str, str] = {"bleu1": "bleu1", "bleu2": "bleu2", "bleu3": "bleu3", "bleu4": "bleu4",
                           "meteor": "meteor", "rouge": "rouge_l", "rouge_l": "rouge_l", "cider": "cider"}  # fmt: skip
BASELINES = ("greedy", "leave_one_out")


class _MetricBatch:
    """Scores a batch once for every objective; each objective's function reads its column."""

    def __init__(self, scorer: CaptionScorer) -> None:
        self.scorer = scorer
        self._key: tuple[Any, ...] | None = None
        self._scores: dict[str, Any] = {}

    def column(self, metric: str, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> torch.Tensor:
        # by content, not identity: a freed batch's id can be reused by the next one
        key = (tuple(responses), tuple(tuple(s["refs"]) for s in samples))
        if key != self._key:
            self._scores = self.scorer.scores(list(responses), [s["refs"] for s in samples])
            self._key = key
        return torch.as_tensor(self._scores[metric], dtype=torch.float32)


class _Objective:
    def __init__(self, batch: _MetricBatch, metric: str) -> None:
        self.batch, self.metric = batch, metric

    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> torch.Tensor:
        return self.batch.column(self.metric, samples, responses)


def build_caption_rewards(
    cfg: Mapping[str, Any], train_refs: Sequence[Sequence[str]], *, java: str = "java"
) -> tuple[RewardSet, CaptionScorer]:
    """The run's `RewardSet` over caption metrics, and the scorer behind it (close it at the end).

    Args:
        cfg: The `reward` node: `objectives` (names of `REWARDS`), `optimize` (one of them, or `morl`),
            `weights` (MORL μ), `normalize`, `tokenizer` ("simple" or "ptb").
        train_refs: The training references per image (CIDEr-D's document frequencies).
        java: The java executable (METEOR, PTB).
    """
    names = [str(n) for n in cfg.get("objectives") or []]
    if not names:
        raise SoupsError("reward.objectives is empty; e.g. objectives: [bleu1, rouge]")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise SoupsError(f"unknown caption reward(s) {unknown}; valid: {', '.join(sorted(REWARDS))}")
    if len(set(names)) != len(names):
        raise SoupsError(f"reward.objectives has duplicates: {names}")
    metrics = sorted({REWARDS[n] for n in names}, key=METRICS.index)
    scorer = CaptionScorer(metrics, tokenizer=str(cfg.get("tokenizer", "simple")), java=java,
                           cider_df_refs=train_refs if "cider" in metrics else None)  # fmt: skip
    batch = _MetricBatch(scorer)
    objectives = [(n, _Objective(batch, REWARDS[n])) for n in names]
    optimize = str(cfg.get("optimize", names[0]))
    weights_cfg = cfg.get("weights")
    if optimize == "morl":
        if weights_cfg is None:
            raise SoupsError(f"reward.optimize=morl needs reward.weights, one per objective {names}")
        weights = morl_weights(list(weights_cfg), names)
    elif optimize in names:
        if weights_cfg is not None:
            raise SoupsError(f"reward.weights is only used with reward.optimize=morl, not optimize={optimize}")
        weights = torch.zeros(len(names))
        weights[names.index(optimize)] = 1.0
    else:
        raise SoupsError(f"reward.optimize={optimize!r} is not an objective; valid: {', '.join([*names, 'morl'])}")
    return RewardSet(objectives, weights, optimize, normalize=bool(cfg.get("normalize", False))), scorer


# ----------------------------------------------------------------------------------------------------------
# SCST
# ----------------------------------------------------------------------------------------------------------


def greedy_baseline(greedy_rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Rennie et al.'s baseline: each of an image's K samples is compared with that image's greedy caption.

    Args:
        greedy_rewards: Tensor[B], the reward of each image's greedy caption.
        k: Samples per image.

    Returns:
        Tensor[B * K] (image-major: the K samples of image 0 first).
    """
    return greedy_rewards.repeat_interleave(k)


def leave_one_out_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The mean reward of the image's other K − 1 samples (the "new self-critical" variant, Luo 2020).

    Args:
        rewards: Tensor[B * K], image-major.
        k: Samples per image (>= 2).

    Returns:
        Tensor[B * K]: for sample j of image i, (Σ_l r_il − r_ij) / (K − 1).
    """
    if k < 2:
        raise SoupsError(f"the leave-one-out baseline needs scst.samples >= 2, got {k}")
    grouped = rewards.reshape(-1, k)
    return ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).reshape(-1)


class ScstLoss(NamedTuple):
    """The SCST loss and what is logged with it."""

    loss: torch.Tensor
    advantage: torch.Tensor


def scst_loss(logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor) -> ScstLoss:
    """REINFORCE on the sequence log-probability with the baseline: −mean_s (r_s − b_s) · Σ_t log p(w_st).

    Args:
        logprobs: Tensor[N, T] per-token log-probabilities of the sampled captions.
        mask: Tensor[N, T], 1 on the caption's tokens (through EOS), 0 after.
        rewards: Tensor[N] scalar rewards of the samples.
        baseline: Tensor[N] baselines (no gradient flows through them).

    Returns:
        (loss, advantages r − b).
    """
    advantage = (rewards - baseline).detach().to(logprobs.dtype)
    seq_logprob = (logprobs * mask.to(logprobs.dtype)).sum(1)
    return ScstLoss(-(advantage * seq_logprob).mean(), advantage)

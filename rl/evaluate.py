"""Text evaluation of a policy: generate responses to prompts and score them with every objective.

`evaluate_policy` is what `python -m soups.pareto` calls for each λ of a text front: it decodes the prompts
(greedy by default, as the rewarded-soups evaluation did), scores the responses with a `RewardSet`, and
returns each objective's mean, standard error and count with the generated texts. Generation goes through
`model.generate`, so any HF causal LM (a plain model, a `PeftModel`, a model whose weights a `Soup` is
switching in place) is evaluated the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rl.rewards import RewardSet
from soups.cli import bar_disabled
from soups.utils import SoupsError


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean, s / √n with the sample standard deviation s (ddof = 1).

    Args:
        values: Tensor[N], N ≥ 1.

    Returns:
        (mean, stderr); the stderr of a single value is 0.0 (nothing to estimate it from).
    """
    n = values.numel()
    if n == 0:
        raise SoupsError("mean_stderr: no values")
    x = values.detach().double().flatten()
    mean = float(x.mean())
    if n == 1:
        return mean, 0.0
    return mean, float(x.std(unbiased=True)) / math.sqrt(n)


def summarize_rewards(rewards: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Per-objective summary of raw rewards.

    Args:
        rewards: Tensor[N, K].
        names: K objective names.

    Returns:
        {name: {"mean": float, "stderr": float, "n": int}} in objective order.
    """
    if rewards.ndim != 2 or rewards.shape[1] != len(names):
        raise SoupsError(f"summarize_rewards: rewards {tuple(rewards.shape)} do not match objectives {list(names)}")
    out: dict[str, dict[str, float | int]] = {}
    for k, name in enumerate(names):
        mean, stderr = mean_stderr(rewards[:, k])
        out[name] = {"mean": mean, "stderr": stderr, "n": int(rewards.shape[0])}
    return out


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[str]:
    """Decodes a response per prompt (prompt tokens removed, special tokens skipped).

    Prompts are tokenised without special tokens and left-padded, so every row's response starts at the
    same column. Sampling draws from torch's global generator (seed it, or use `evaluate_policy`).

    Args:
        model: An HF causal LM (or PeftModel) with `generate`.
        tokenizer: Its tokenizer (a pad token is required; eos is used as pad when missing).
        prompts: N prompt strings.
        max_new_tokens: Response length cap.
        do_sample: Sample instead of greedy decoding.
        temperature, top_k, top_p: Sampling settings (ignored when greedy).
        batch_size: Prompts per `generate` call.
        show_progress: Draw a tqdm bar over batches.

    Returns:
        N response strings.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise SoupsError(f"generate: max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SoupsError("generate: the tokenizer has neither a pad nor an eos token")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": pad_id,
                              "eos_token_id": tokenizer.eos_token_id, "do_sample": bool(do_sample)}
    if do_sample:
        kwargs.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    else:  # do not let a checkpoint's generation_config turn greedy decoding into sampling
        kwargs.update(temperature=None, top_k=None, top_p=None)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", disable=bar_disabled(show_progress), leave=False):
            batch = list(prompts[start : start + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    reward_set: RewardSet,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Generates a response per sample and scores it with every objective of `reward_set`.

    Deterministic: greedy decoding is; sampling runs under a forked RNG seeded with `seed`, so the caller's
    random state is left untouched and the same seed gives the same texts.

    Args:
        model: An HF causal LM (or PeftModel).
        tokenizer: Its tokenizer.
        samples: N task samples with "prompt" (and the fields the rewards read).
        reward_set: The objectives (all are computed; NaN rewards raise `SoupsError` naming the objective).
        max_new_tokens, do_sample, temperature, top_k, top_p, batch_size: Decoding settings.
        seed: Seed of the sampling RNG.
        show_progress: Draw a tqdm bar over generation batches.

    Returns:
        {"objectives": {name: {"mean", "stderr", "n"}}, "names": [K names], "texts": [N responses],
         "rewards": [N lists of K floats], "decoding": {settings and seed}}.
    """
    if not samples:
        raise SoupsError("evaluate_policy: no samples to evaluate")
    prompts = []
    for i, sample in enumerate(samples):
        if "prompt" not in sample:
            raise SoupsError(f"evaluate_policy: sample {i} has no 'prompt' (keys: {sorted(sample)})")
        prompts.append(str(sample["prompt"]))
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        texts = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, batch_size=batch_size, show_progress=show_progress,
        )  # fmt: skip
    rewards = reward_set(samples, texts)
    return {
        "objectives": summarize_rewards(rewards, reward_set.names),
        "names": list(reward_set.names),
        "texts": texts,
        "rewards": rewards.tolist(),
        "decoding": {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                     "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p), "seed": int(seed)},
    }

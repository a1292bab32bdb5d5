"""Supervised fine-tuning of a causal LM on (prompt, target) pairs: the shared init of the RL experts.

The loss is the next-token cross-entropy on the target tokens only (prompt tokens are masked with -100),
with an end-of-sequence token appended to every target so the model learns when to stop. It is a plain
loop rather than `transformers.Trainer` because the embedded init must build in about a minute on CPU,
deterministically, with no output directory of its own (the caller saves the model atomically).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from soups.cli import bar_disabled
from soups.utils import SoupsError


def build_sft_batch(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenises pairs as `prompt + target + eos`, right-padded, with labels only on target + eos.

    Args:
        tokenizer: A tokenizer with `pad_token_id` and `eos_token_id`.
        prompts: B prompt strings.
        targets: B target strings (the continuation to learn).

    Returns:
        input_ids, attention_mask, labels: LongTensor[B, T]; labels are -100 on prompt and padding.
    """
    if len(prompts) != len(targets):
        raise SoupsError(f"sft batch: {len(prompts)} prompts but {len(targets)} targets")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise SoupsError("sft batch: the tokenizer needs a pad and an eos token")
    rows, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def sft_train(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 20,
    seed: int = 0,
    show_progress: bool = True,
) -> list[float]:
    """Trains `model` in place with AdamW (linear warm-up then cosine decay) on random mini-batches.

    Args:
        model: A causal LM accepting `labels` (HF convention: loss shifted inside the model).
        tokenizer: Its tokenizer.
        prompts: N prompts.
        targets: N targets.
        steps: Optimiser steps.
        batch_size: Pairs per step, drawn by a seeded sampler (epochs without replacement).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: Linear warm-up steps.
        seed: Seeds the batch order.
        show_progress: Draw a tqdm bar.

    Returns:
        The training loss of every step.
    """
    if not prompts:
        raise SoupsError("sft: no training pairs")
    if steps < 0 or batch_size < 1:
        raise SoupsError(f"sft: steps={steps}, batch_size={batch_size} must be >= 0 and >= 1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="sft", disable=bar_disabled(show_progress), leave=False)
    for _ in bar:
        if len(order) < batch_size:
            fresh = list(range(len(prompts)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        batch = build_sft_batch(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise SoupsError(f"sft: non-finite loss {loss.item()} at step {len(losses)}; lower sft lr ({lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% at `total`."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

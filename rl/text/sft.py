"""Supervised fine-tuning of a causal LM on (prompt, target) pairs: the shared init of the RL experts.

`ensure_sft_init` builds the embedded task's shared init (a tiny decoder-only model SFT-trained on imperfect
summaries, `SFTInitConfig`) once per directory; the quickstart and `rl/train_ppo.py` start every expert from it.

The loss is the next-token cross-entropy on the target tokens only (prompt tokens are masked with -100),
with an end-of-sequence token appended to every target so the model learns when to stop. It is a plain
loop rather than `transformers.Trainer` because the embedded init must build in about a minute on CPU,
deterministically, with no output directory of its own (the caller saves the model atomically).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rl.text.models import build_tiny_causal_lm, build_tokenizer
from rl.text.task import FactsSummaryConfig, default_cache_dir, generate_facts_summary
from soups.cli import bar_disabled
from soups.utils import SoupsError, atomic_dir, seed_everything


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


# ----------------------------------------------------------------------------------------------------------
# The shared init of the embedded task
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SFTInitConfig:
    """The tiny policy and its SFT run. `smoke=True` in `ensure_sft_init` shrinks steps for tests."""

    seed: int = 0
    arch: str = "llama"  # "llama" or "gpt2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    n_train: int = 4096
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3


def ensure_sft_init(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    smoke: bool = False,
    overrides: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Builds (if missing) the SFT model + tokenizer of the embedded task and returns its directory.

    Idempotent and deterministic: an existing complete directory (with `sft_info.json`) is returned as is.
    The directory is written atomically, so a killed build leaves nothing half-written. The SFT data are
    imperfect summaries drawn from the task generator with a seed disjoint from the RL prompts.

    Args:
        output_dir: Target directory; default `<cache>/facts_summary_sft/seed<seed>[-smoke]`.
        seed: Seeds the data, the init and the SFT order.
        smoke: A few-second build (fewer steps and samples) for tests; same model shape.
        overrides: Fields of `SFTInitConfig` to change (e.g. {"arch": "gpt2", "steps": 100}).
        show_progress: Draw a tqdm bar over SFT steps.

    Returns:
        The directory, loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    settings = SFTInitConfig(seed=seed)
    if smoke:
        settings.n_train, settings.steps, settings.batch_size = 512, 60, 16
    for key, value in dict(overrides or {}).items():
        if not hasattr(settings, key):
            raise SoupsError(f"sft init: unknown setting {key!r}; valid: {', '.join(f.name for f in fields(settings))}")
        setattr(settings, key, value)
    if output_dir is None:
        output_dir = default_cache_dir() / "facts_summary_sft" / f"seed{seed}{'-smoke' if smoke else ''}"
    target = Path(output_dir)
    info_path = target / "sft_info.json"
    if info_path.exists():
        built = json.loads(info_path.read_text()).get("settings", {})
        if built != asdict(settings):
            raise SoupsError(f"sft init: {target} was built with other settings {built}; remove it or pick another dir")
        return target

    from soups.utils import atomic_dir, seed_everything, write_json

    seed_everything(settings.seed)
    tokenizer = build_tokenizer()
    model = build_tiny_causal_lm(settings, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    data_cfg = FactsSummaryConfig(seed=settings.seed)
    samples = generate_facts_summary(data_cfg, settings.n_train, "sft")
    with torch.device("cpu"):
        losses = sft_train(
            model, tokenizer, [s["prompt"] for s in samples], [s["reference"] for s in samples],
            steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
            show_progress=show_progress,
        )  # fmt: skip
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "sft_info.json", {
                "task": "facts_summary", "settings": asdict(settings), "data": asdict(data_cfg),
                "final_loss": losses[-1] if losses else None, "loss_curve": losses[:: max(1, len(losses) // 50)],
            })  # fmt: skip
    except SoupsError:
        if not info_path.exists():  # another process finished the same build first: that one is as good
            raise
    return target


def build_smoke_experts(root: str | Path, n: int, seed: int, scale: float = 0.05) -> list[Path]:
    """Tiny full-checkpoint experts of the embedded text task, built offline in seconds (kept if present).

    The smoke experts of `python -m soups.serve` (`soups.serve.SMOKE_EXPERT_MODULES` names this module).

    The shared init is the quickstart's tiny LLaMA (untrained) with the task's word tokenizer, so the text
    evaluator scores it like any expert of that task; expert i is the init plus a perturbation of scale `scale`
    seeded by `seed + 1 + i`, saved with `save_pretrained` beside the tokenizer.

    Returns:
        The expert directories (absolute).
    """
    root = Path(root).absolute()
    paths = [root / f"expert{i}" for i in range(n)]
    if all((p / "config.json").is_file() for p in paths):
        return paths
    seed_everything(seed)
    tokenizer = build_tokenizer()
    init = build_tiny_causal_lm(SFTInitConfig(seed=seed), len(tokenizer), tokenizer.pad_token_id,
                                tokenizer.eos_token_id)  # fmt: skip
    base = {k: v.clone() for k, v in init.state_dict().items()}
    for i, path in enumerate(paths):
        if (path / "config.json").is_file():
            continue
        generator = torch.Generator().manual_seed(seed + 1 + i)
        init.load_state_dict({k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point()
                              else v for k, v in base.items()})  # fmt: skip
        with atomic_dir(path, overwrite=True) as tmp:
            init.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return paths

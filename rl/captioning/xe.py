"""The shared init of captioning experts: cross-entropy (teacher forcing) training on every reference caption.

`xe_train` trains any HF captioner in place; `ensure_xe_init` builds the embedded task's init (the tiny ViT +
GPT-2 captioner of `rl.captioning.models`, trained on the procedural scenes) once per directory, atomically, and
refuses a directory built with other settings. `rl/train_captioning.py stage=xe` and the quickstart's init stage
both use it; every SCST expert starts from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rl import runtime
from rl.captioning.models import (
    CaptionModel,
    build_scene_tokenizer,
    build_tiny_captioner,
    caption_logprobs,
    load_captioner,
    model_kwargs,
    tiny_image_processor,
)
from rl.captioning.task import CAPTIONS_VERSION, CaptionTask, build_caption_task, load_images
from soups.utils import SoupsError, atomic_dir, seed_everything, write_json

__all__ = ["build_captioner", "ensure_xe_init", "start_token", "step_images", "caption_tokens", "xe_train"]


def step_images(seed: int, step: int, n_images: int, count: int) -> list[int]:
    """The training images of one step, a pure function of (seed, step) so a resumed run draws the same."""
    rng = np.random.default_rng([seed, step])
    return [int(i) for i in rng.choice(n_images, size=count, replace=count > n_images)]


def caption_tokens(tokenizer: Any, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption tokens + EOS, right-padded: (tokens [B, T], mask [B, T])."""
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return tokens, mask


def start_token(model: Any) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        raise SoupsError("the captioner's config has no decoder_start_token_id")
    return int(start)


def _resolve(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy stage
# ----------------------------------------------------------------------------------------------------------


def xe_train(captioner: CaptionModel, task: CaptionTask, cfg: Mapping[str, Any], *, seed: int, device: torch.device,
             progress: bool, metrics_path: Path | None = None) -> list[float]:  # fmt: skip
    """Teacher-forced cross-entropy on every (image, reference) pair of the training split; returns the losses.

    Args:
        captioner: The model to train (in place), with its tokenizer and processor.
        task: The data.
        cfg: The `xe` node: steps, batch_size, lr, weight_decay, max_grad_norm.
        seed: Seeds the batch order.
        device: Where to train.
        progress: Draw a bar.
        metrics_path: Append one row per step there.
    """
    model, tok = captioner.model, captioner.tokenizer
    pairs = [(i, r) for i, s in enumerate(task.train) for r in s["refs"]]
    images = load_images(task.train) if all("image" in s for s in task.train) else None
    start = start_token(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)))
    steps, bsz = int(cfg["steps"]), int(cfg["batch_size"])
    losses = []
    model.train()
    for step in runtime.progress(0, steps, desc="xe", enabled=progress):
        t0 = time.perf_counter()
        picks = step_images(seed, step, len(pairs), bsz)
        batch_imgs = [images[pairs[i][0]] for i in picks] if images is not None else load_images(
            [task.train[pairs[i][0]] for i in picks])  # fmt: skip
        tokens, mask = caption_tokens(tok, [pairs[i][1] for i in picks], device)
        logp, _ = caption_logprobs(model, captioner.pixels(batch_imgs, device), tokens, start)
        loss = -(logp * mask).sum() / mask.sum()
        if not torch.isfinite(loss):
            raise SoupsError(f"xe step {step + 1}: the loss is {loss.item()}; lower xe.lr={cfg['lr']}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if float(cfg.get("max_grad_norm", 0)) > 0:
            torch.nn.utils.clip_grad_norm_(params, float(cfg["max_grad_norm"]))
        opt.step()
        losses.append(loss.item())
        if metrics_path is not None:
            runtime.append_metrics(metrics_path, {"step": step + 1, "xe/loss": losses[-1],
                                                  "time/step_s": time.perf_counter() - t0})  # fmt: skip
    model.eval()
    return losses


def build_captioner(cfg: Mapping[str, Any], *, seed: int, device: torch.device) -> CaptionModel:
    """`model.name_or_path` (any HF captioner), or a fresh tiny ViT + GPT-2 captioner of the scenes (seeded)."""
    name = cfg.get("name_or_path")
    if name:
        return load_captioner(str(name), device=device)
    seed_everything(seed)
    tok = build_scene_tokenizer()
    shape = model_kwargs(cfg["tiny"])
    model = build_tiny_captioner(tok, **shape).to(device)
    return CaptionModel(model, tok, tiny_image_processor(shape["image_size"]))


def ensure_xe_init(cfg: DictConfig, *, device: torch.device, progress: bool) -> Path:
    """The embedded XE init directory (`model.init_dir`), built once (atomically) with this config's `xe`,
    `task` and `model.tiny` settings and the scenes' `CAPTIONS_VERSION`; an existing one built with other settings
    (or on other references) is refused."""
    settings = {"xe": _resolve(cfg.xe), "task": _resolve(cfg.task), "tiny": _resolve(cfg.model.tiny),
                "seed": int(cfg.model.init_seed), "captions_version": CAPTIONS_VERSION}  # fmt: skip
    target = Path(str(cfg.model.init_dir)).absolute()
    info = target / "xe_info.json"
    if info.is_file():
        built = json.loads(info.read_text()).get("settings")
        if built != settings:
            raise SoupsError(f"the XE init {target} was built with other settings {built}; remove it, or set "
                             "model.init_dir to another directory")
        return target
    task = build_caption_task(cfg.task)
    captioner = build_captioner({"name_or_path": None, "tiny": settings["tiny"]}, seed=settings["seed"],
                                device=device)  # fmt: skip
    losses = xe_train(captioner, task, settings["xe"], seed=settings["seed"], device=device, progress=progress)
    try:
        with atomic_dir(target) as tmp:
            captioner.save(tmp)
            write_json(tmp / "xe_info.json", {"settings": settings, "final_loss": losses[-1] if losses else None,
                                              "loss_curve": losses[:: max(1, len(losses) // 50)]})  # fmt: skip
    except SoupsError:
        if not info.is_file():  # another run finished the same build first: that one is as good
            raise
    return target

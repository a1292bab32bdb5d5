"""Captioning experts by self-critical sequence training (SCST): one rewarded-soups expert per caption metric.

    accelerate launch rl/train_captioning.py reward=cider                 # an SCST expert on the embedded scenes
    accelerate launch rl/train_captioning.py stage=xe                     # the shared cross-entropy init
    accelerate launch rl/train_captioning.py reward=morl reward.weights=[0.5,0.5]    # MORL on BLEU1 and ROUGE-L
    python rl/train_captioning.py experiment=smoke                        # < 1 minute, for tests
    accelerate launch rl/train_captioning.py experiment=coco_vit_gpt2     # the COCO preset (GPU, Karpathy split)

`stage=xe` trains the shared init with teacher forcing on every reference caption. `stage=scst` starts from
`model.name_or_path` (null: the embedded XE init, built once and cached), and each step samples K captions per
image, scores them with EVERY configured metric (logged), scalarises (one metric, or MORL Σ μ_i R_i), and takes a
REINFORCE step on the sequence log-probability with (reward − baseline), the baseline being the greedy caption's
reward (Rennie et al.) or the mean of the other K − 1 samples. The whole decoder is trained, or a LoRA adapter on
it; the encoder stays frozen. Token entropy and the KL to the init are logged. Outputs under `output_dir`:

    checkpoints/step-XXXXXX/   trainable weights, optimizer and RNG states (the runtime's atomic checkpoints)
    model/                     the final captioner (full weights, LoRA merged), tokenizer, image processor
    adapter/                   the LoRA adapter (scst.params=lora only)
    metrics.jsonl              one row per step

Metrics run in Python, except METEOR (one long-lived java process per run; see `evals/captioning.py`).
Checkpoints, resume, metrics and guards are the trainer runtime's (`rl/runtime.py`); the scalarisation is the
shared `RewardSet`.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/train_captioning")  # a bad command line fails here, before torch

import copy
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rl import runtime
from rl.captioning.models import CaptionModel, caption_logprobs, decode_captions, load_captioner, sequence_mask
from rl.captioning.rewards import BASELINES, build_caption_rewards, greedy_baseline, leave_one_out_baseline, scst_loss
from rl.captioning.task import build_caption_task, load_images
from rl.captioning.xe import build_captioner, ensure_xe_init, start_token, step_images, xe_train
from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything, write_json

CONFIG_PATH = "../configs/train_captioning"

__all__ = ["ensure_xe_init", "train", "validate_config"]


# ----------------------------------------------------------------------------------------------------------
# Config and small helpers
# ----------------------------------------------------------------------------------------------------------


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Checks every numeric and named setting before anything is built.

    Raises:
        SoupsError: naming the key, its value and the valid range or options.
    """
    num, choice = runtime.check_number, runtime.check_choice
    choice("stage", cfg["stage"], ("xe", "scst"))
    num("seed", cfg["seed"], low=0, integer=True)
    xe, sc, ck = cfg["xe"], cfg["scst"], cfg["checkpoint"]
    num("xe.steps", xe["steps"], low=0, integer=True)  # 0: save the init unchanged (a Hub captioner re-saved)
    num("xe.batch_size", xe["batch_size"], low=1, integer=True)
    num("xe.lr", xe["lr"], low=0, low_open=True)
    num("scst.steps", sc["steps"], low=0, integer=True)
    for key in ("batch_size", "samples", "max_new_tokens"):
        num(f"scst.{key}", sc[key], low=1, integer=True)
    num("scst.lr", sc["lr"], low=0, low_open=True)
    num("scst.temperature", sc["temperature"], low=0, low_open=True)
    choice("scst.baseline", sc["baseline"], BASELINES)
    choice("scst.params", sc["params"], ("decoder", "lora"))
    if sc["baseline"] == "leave_one_out" and int(sc["samples"]) < 2:
        raise SoupsError(f"scst.baseline=leave_one_out needs scst.samples >= 2, got {sc['samples']}")
    for node in ("xe", "scst"):
        num(f"{node}.max_grad_norm", cfg[node]["max_grad_norm"], low=0)
    num("checkpoint.every", ck["every"], low=0, integer=True)
    num("checkpoint.keep", ck["keep"], low=0, integer=True)


# ----------------------------------------------------------------------------------------------------------
# SCST: the trainable part, checkpoints
# ----------------------------------------------------------------------------------------------------------


def make_trainable(captioner: CaptionModel, cfg: DictConfig) -> Any:
    """Freezes everything but the decoder (`scst.params=decoder`), or wraps the decoder in LoRA (`lora`);
    returns the model to train (the same object, or the PEFT wrapper)."""
    model = captioner.model
    if str(cfg.scst.params) == "decoder":
        decoder = getattr(model, "decoder", None) or getattr(model, "text_decoder", None)
        if decoder is None:
            raise SoupsError(f"{type(model).__name__} has no .decoder/.text_decoder; use scst.params=lora")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in decoder.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    targets = "|".join(str(t) for t in lc.target_modules)
    config = LoraConfig(r=int(lc.r), lora_alpha=int(lc.alpha), lora_dropout=float(lc.dropout), bias="none",
                        target_modules=rf".*decoder.*\.({targets})")  # fmt: skip
    return get_peft_model(model, config)


def save_scst_checkpoint(root: Path, step: int, *, model: torch.nn.Module, optimizer: Any, state: dict[str, Any],
                         cfg: DictConfig) -> Path:  # fmt: skip
    """The runtime's torch checkpoint (trainable weights, optimizer, RNG) of this run."""
    return runtime.save_trainable_checkpoint(root, step, model=model, optimizer=optimizer, state=state, config=cfg,
                                             lr_hint=f"scst.lr={cfg.scst.lr}")  # fmt: skip


def load_scst_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Restores the trainable weights, optimizer and RNG of a checkpoint; returns its trainer state."""
    return runtime.load_trainable_checkpoint(path, model=model, optimizer=optimizer, hint="resume with the same config")


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(cfg: DictConfig) -> Path:
    """Runs the configured stage and returns the final model directory (`output_dir/model`)."""
    # ---- set-up: config, output dir, seed -------------------------------------------------------------------
    validate_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process: several would write the same outputs
        raise SoupsError(f"rl/train_captioning.py trains in one process; WORLD_SIZE={os.environ['WORLD_SIZE']}: "
                         "launch it with `accelerate launch --num_processes 1` (or plain python)")
    out = Path(cfg.output_dir).absolute()
    ckpt_root, final_dir, metrics_path = out / "checkpoints", out / "model", out / "metrics.jsonl"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    progress = bool(cfg.logging.progress_bar)
    runtime.prepare_run_dir(out, [ckpt_root, final_dir, out / "adapter", metrics_path], resume=bool(cfg.resume),
                            overwrite=bool(cfg.overwrite), is_main=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    seed_everything(int(cfg.seed))

    if str(cfg.stage) == "xe":
        # ---- XE: the shared init, trained and saved as a full captioner ----------------------------------
        if cfg.resume:
            warnings.warn("stage=xe is short and not checkpointed: resume=true retrains it", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
        metrics_path.unlink(missing_ok=True)
        task = build_caption_task(cfg.task)
        captioner = build_captioner(cfg.model, seed=int(cfg.seed), device=device)
        losses = xe_train(captioner, task, cfg.xe, seed=int(cfg.seed), device=device, progress=progress,
                          metrics_path=metrics_path)  # fmt: skip
        with atomic_dir(final_dir, overwrite=True) as tmp:
            captioner.save(tmp)
            save_resolved_config(cfg, tmp)
            write_json(tmp / "train_summary.json", {"stage": "xe", "steps": len(losses),
                                                    "final_loss": losses[-1] if losses else None})  # fmt: skip
        print(f"xe init: {final_dir}" + (f" (final loss {losses[-1]:.3f})" if losses else " (saved unchanged)"))
        return final_dir

    # ---- SCST set-up: task, rewards (a bad reward or missing java fails before any init is built), init, ------
    #      trainable part, reference for the KL
    task = build_caption_task(cfg.task)
    reward_set, scorer = build_caption_rewards(cfg.reward, [s["refs"] for s in task.train], java=str(cfg.java))
    state_before = runtime.rng_state()
    init = str(cfg.model.name_or_path or ensure_xe_init(cfg, device=device, progress=progress))
    runtime.set_rng_state(state_before)  # the run is the same whether the init was just built or found cached
    names = list(reward_set.names)
    captioner = load_captioner(init, device=device)
    reference = None if str(cfg.scst.params) == "lora" else copy.deepcopy(captioner.model).eval()
    model = make_trainable(captioner, cfg)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    sc = cfg.scst
    optimizer = torch.optim.AdamW(params, lr=float(sc.lr), weight_decay=float(sc.get("weight_decay", 0.0)))
    start_step = 0
    if cfg.resume:
        good, broken = runtime.newest_valid_checkpoint(ckpt_root, runtime.check_torch_file)
        for path, why in broken:
            moved = runtime.set_aside(path)
            warnings.warn(f"checkpoint {path} is broken ({why}); set aside as {moved.name}", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
        if good is not None:
            start_step = int(load_scst_checkpoint(good, model=model, optimizer=optimizer)["step"])
            reward_set.load_state_dict({k: torch.tensor(v) for k, v in
                                        runtime.load_state(good).get("reward_normalizer", {}).items()})  # fmt: skip
            print(f"resuming from {good} (step {start_step})")
        else:
            print(f"resume=true but no valid checkpoint under {ckpt_root}: starting from step 0")
    runtime.truncate_metrics(metrics_path, start_step)
    train_images = load_images(task.train) if all("image" in s for s in task.train) else None
    start = start_token(captioner.model)
    eos = int(captioner.tokenizer.eos_token_id)
    k, bsz, total = int(sc.samples), int(sc.batch_size), int(sc.steps)
    gen = {"max_new_tokens": int(sc.max_new_tokens), "pad_token_id": captioner.tokenizer.pad_token_id,
           "eos_token_id": eos, "decoder_start_token_id": start}  # fmt: skip

    # ---- SCST loop ---------------------------------------------------------------------------------------------
    bar = runtime.progress(start_step, total, desc="scst", enabled=progress)
    for step in bar:
        t0 = time.perf_counter()
        idx = step_images(int(cfg.seed), step, len(task.train), bsz)
        samples = [task.train[i] for i in idx]
        images = [train_images[i] for i in idx] if train_images is not None else load_images(samples)
        pixels = captioner.pixels(images, device)
        with torch.no_grad():
            sampled = model.generate(pixel_values=pixels, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=float(sc.temperature), num_return_sequences=k, **gen)[:, 1:]
            greedy = model.generate(pixel_values=pixels, do_sample=False, num_beams=1, **gen)[:, 1:] \
                if str(sc.baseline) == "greedy" else None  # fmt: skip
        texts = decode_captions(captioner.tokenizer, sampled, eos)
        expanded = [s for s in samples for _ in range(k)]
        gen_s = time.perf_counter() - t0

        # -- rewards of every objective (logged), scalarised; the baseline
        raw = reward_set(expanded, texts, check=False)
        try:
            runtime.check_finite(raw, names)
        except SoupsError as err:
            raise runtime.stop_error(ckpt_root, step + 1, str(err)) from err
        rewards = reward_set.scalar(raw)
        if greedy is not None:
            greedy_texts = decode_captions(captioner.tokenizer, greedy, eos)
            greedy_scalar = reward_set.scalar(reward_set(samples, greedy_texts), update=False)
            baseline = greedy_baseline(greedy_scalar, k)
        else:
            baseline = leave_one_out_baseline(rewards, k)
        reward_s = time.perf_counter() - t0 - gen_s

        # -- REINFORCE on the sequence log-probability; eval mode (no dropout) so the log-probabilities are those of
        #    the distribution the captions were sampled from, and the KL to the init is 0 before the first update
        mask = sequence_mask(sampled, eos)
        pix_k = pixels.repeat_interleave(k, dim=0)
        logp, logsm = caption_logprobs(model, pix_k, sampled, start, with_logits=True)
        sl = scst_loss(logp, mask, rewards.to(device), baseline.to(device))
        if not torch.isfinite(sl.loss):
            raise runtime.stop_error(ckpt_root, step + 1, f"the SCST loss is {sl.loss.item()}; lower scst.lr")
        optimizer.zero_grad(set_to_none=True)
        sl.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(sc.max_grad_norm)) if float(sc.max_grad_norm) > 0 \
            else torch.tensor(0.0)  # fmt: skip
        optimizer.step()
        bad = runtime.nonfinite({n: p for n, p in model.named_parameters() if p.requires_grad})
        if bad:
            raise runtime.stop_error(ckpt_root, step + 1, f"the update made {', '.join(bad[:3])} non-finite; "
                                     f"lower scst.lr={sc.lr}")  # fmt: skip

        # -- entropy and KL to the init (per token on the samples, k1 estimator summed over each caption)
        with torch.no_grad():
            m = mask.to(logsm.dtype)
            entropy = float((-(logsm.exp() * logsm).sum(-1) * m).sum() / m.sum())
            if reference is not None:
                ref_logp, _ = caption_logprobs(reference, pix_k, sampled, start)
            else:
                with model.disable_adapter():
                    ref_logp, _ = caption_logprobs(model, pix_k, sampled, start)
            kl = float(((logp.detach() - ref_logp) * m).sum(1).mean())
        step_s = time.perf_counter() - t0
        metrics: dict[str, float] = {f"objective/{n}": float(raw[:, j].mean()) for j, n in enumerate(names)}
        metrics.update({
            "reward/scalar": float(rewards.mean()), "reward/baseline": float(baseline.mean()),
            "scst/advantage_std": float(sl.advantage.std()), "scst/loss": float(sl.loss.detach()),
            "scst/entropy": entropy, "scst/kl_to_init": kl, "scst/grad_norm": float(grad_norm),
            "caption/length": float(mask.sum(1).float().mean()),
            "time/generate_s": gen_s, "time/reward_s": reward_s, "time/step_s": step_s,
            "perf/samples_per_s": bsz * k / max(step_s, 1e-9),
        })  # fmt: skip
        runtime.append_metrics(metrics_path, {"step": step + 1, "samples": (step + 1) * bsz * k, **metrics})
        bar.set_postfix({n: f"{metrics[f'objective/{n}']:.3f}" for n in names} | {"kl": f"{kl:.2f}"})

        every = int(cfg.checkpoint.every)
        if (every > 0 and (step + 1) % every == 0) or step + 1 == total:
            state = {"objectives": names, "seed": int(cfg.seed), "init": init,
                     "reward_normalizer": {k_: v.tolist() for k_, v in reward_set.state_dict().items()}}  # fmt: skip
            save_scst_checkpoint(ckpt_root, step + 1, model=model, optimizer=optimizer, state=state, cfg=cfg)
            runtime.prune_checkpoints(ckpt_root, int(cfg.checkpoint.keep))
    bar.close()
    scorer.close()

    # ---- save: the final captioner (full weights; a LoRA adapter merged, and kept beside) ---------------------
    if str(sc.params) == "lora":
        with atomic_dir(out / "adapter", overwrite=True) as tmp:
            model.save_pretrained(tmp)
        model = model.merge_and_unload()
    final = CaptionModel(model, captioner.tokenizer, captioner.processor)
    with atomic_dir(final_dir, overwrite=True) as tmp:
        final.save(tmp)
        save_resolved_config(cfg, tmp)
        write_json(tmp / "train_summary.json", {"stage": "scst", "steps": total, "objectives": names,
                                                "optimize": reward_set.optimize, "init": init,
                                                "metrics": str(metrics_path)})  # fmt: skip
    print(f"final captioner: {final_dir}")
    return final_dir


@entry(CONFIG_PATH)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `accelerate launch rl/train_captioning.py reward=cider`."""
    train(cfg)


if __name__ == "__main__":
    sys.exit(main())

"""Diffusion benchmarks on the tiny text-to-image pipeline: generation, RWR training steps, λ points of a front.

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion.py                      # all three; prints a table
    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion.py --init runs/qs_diffusion/init \\
        --experts runs/qs_diffusion/experts/colourfulness/expert runs/qs_diffusion/experts/fidelity/expert

Without `--init`, the tiny pipeline is built from configs (`rl.diffusion.models.build_tiny_pipeline`, random
weights: timings do not depend on what it learnt); without `--experts`, two LoRA experts with random factors are
made on it (`add_trainable` + `save_expert`).

**Generation.** Images per second of the pipeline (`StableDiffusionPipeline.__call__`, DDIM, `--steps` steps,
`--batch` images per call, guidance 1 and 5: one or two UNet passes per step), after one warm-up call.

**Training.** Optimizer steps per second at batch `--train-batch` of LoRA (rank 4) fine-tuning:
- ours: `rl/train_diffusion.py`'s RWR step (the kept images' latents and prompt embeddings computed once per
  round, then noise, UNet, reward-weighted MSE, clip, AdamW, a NaN check, a metrics line), read from its
  `metrics.jsonl` (`time/step_s`, median over the steps after the first); round 0 is generated before the clock;
- hand-rolled: the textbook diffusers `train_text_to_image` inner loop on the same pipeline and LoRA: VAE-encode
  the batch's images, noise, text-encode the batch's prompts, UNet, MSE, clip, AdamW (median step time).

**Front.** λ points per minute of a 2-expert LoRA front scored like `evaluator=diffusion` (P prompts × S seeds from
fixed latents, colourfulness), two ways:
- resident: one pipeline (without UNet) and one resident `Soup` whose UNet is switched in place per λ (what
  `python -m soups.pareto evaluator=diffusion` does);
- reload: per λ, `DiffusionPipeline.from_pretrained(init)`, `load_lora_weights` of both experts and
  `set_adapters([a, b], [λ, 1 − λ])` (the diffusers way to blend LoRAs), then the same generation and scoring.
The two ways' images are compared (max abs pixel difference) to show they compute the same front.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_init(path: str | None, tmp: Path) -> Path:
    """The pipeline to time: `path`, else the tiny pipeline built from configs, saved into `tmp`."""
    if path:
        return Path(path)
    from rl.diffusion.models import build_tiny_pipeline
    from rl.diffusion.task import vocabulary

    out = tmp / "init"
    build_tiny_pipeline(vocabulary(), seed=0).save_pretrained(out)
    return out


def make_experts(paths: list[str] | None, init: Path, tmp: Path) -> list[str]:
    """The two LoRA experts: `paths`, else two rank-4 LoRAs with random factors on `init`."""
    if paths:
        return list(paths)
    import torch

    from rl.diffusion.models import add_trainable, load_pipeline, save_expert

    out = []
    for k in range(2):
        unet = load_pipeline(str(init)).unet
        torch.manual_seed(100 + k)
        add_trainable(unet, "lora", rank=4, alpha=4.0, target_modules=TARGETS)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        out.append(str(save_expert(unet, tmp / f"expert{k}", "lora", base=str(init))))
    return out


def bench_generation(init: Path, *, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """Images/s of the pipeline at guidance 1 and 5."""
    import torch

    from rl.diffusion.models import load_pipeline
    from rl.diffusion.task import scene_prompts

    pipe = load_pipeline(str(init))
    prompts = scene_prompts(batch, 1)
    out: dict[str, Any] = {"batch": batch, "steps": steps}
    for guidance in (1.0, 5.0):
        def call(guidance: float = guidance) -> None:
            with torch.no_grad():
                pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                     generator=torch.Generator().manual_seed(0))  # fmt: skip

        call()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[f"images_per_s_guidance{guidance:g}"] = batch / statistics.median(times)
    return out


def bench_train_ours(init: Path, tmp: Path, *, batch: int, steps: int) -> float:
    """Median seconds per RWR step of rl/train_diffusion.py (round 0 generated before the clock)."""
    from hydra import compose, initialize_config_dir

    from rl.train_diffusion import train

    overrides = [f"model.name_or_path={init}", f"output_dir={tmp / 'rwr'}", "reward=colourfulness",
                 "reward.objectives=[colourfulness]",
                 f"rwr.n_images={2 * batch}", f"rwr.batch_size={batch}", "rwr.inference_steps=4",
                 f"rwr.steps={steps}", f"rwr.train_batch_size={batch}", "checkpoint.every=0", "logging.log_with=[]",
                 "logging.progress_bar=false", "overwrite=true", "device=cpu"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train_diffusion"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    train(cfg)
    lines = [json.loads(x) for x in (tmp / "rwr" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return statistics.median([x["time/step_s"] for x in lines if "time/step_s" in x][1:])


def bench_train_handrolled(init: Path, *, batch: int, steps: int) -> float:
    """Median seconds per step of the textbook diffusers text-to-image loop, LoRA rank 4, on the same pipeline."""
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812
    from diffusers import DDPMScheduler

    from rl.diffusion.models import add_trainable, load_pipeline
    from rl.diffusion.task import generate_scenes

    torch.manual_seed(0)
    pipe = load_pipeline(str(init))
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    add_trainable(unet, "lora", rank=4, alpha=4.0, target_modules=TARGETS)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    scenes = generate_scenes(4 * batch, seed=3, size=size)
    pixels = torch.from_numpy(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    ids = tokenizer([s["prompt"] for s in scenes], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    unet.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        pos = torch.randint(0, len(scenes), (batch,))
        latents = vae.encode(pixels[pos]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,)).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(ids[pos], return_dict=False)[0]
        pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_front(init: Path, experts: list[str], *, points: int, prompts: int, seeds: int, steps: int) -> dict:
    """λ points per minute: resident pipeline + Soup vs from_pretrained + load_lora_weights per λ."""
    import numpy as np
    import torch

    from rl.diffusion.evaluator import DiffusionEvaluator, load_base_pipeline
    from rl.diffusion.models import load_pipeline
    from rl.diffusion.rewards import build_reward
    from rl.diffusion.task import scene_prompts
    from soups.front import open_soup

    device = torch.device("cpu")
    lambdas = np.linspace(0.0, 1.0, points)
    reward = {"colourfulness": build_reward("colourfulness", {})}
    prompt_list = scene_prompts(prompts, 2026)

    def evaluator(pipe: Any) -> DiffusionEvaluator:
        size = int(pipe.vae_scale_factor) * 16
        return DiffusionEvaluator(pipe, reward, prompt_list, latent_shape=(4, 16, 16), seeds=seeds, steps=steps,
                                  guidance_scale=1.0, height=size, width=size, batch_size=16)  # fmt: skip

    t0 = time.perf_counter()  # resident: set-up included
    ev = evaluator(load_base_pipeline(str(init), device=device))
    soup = open_soup(experts, base_model=None, device=device, dtype=torch.float32)
    resident_images = []
    for lam in lambdas:
        soup.set_weights([float(lam), 1.0 - float(lam)])
        ev.evaluate(soup.model)
        resident_images.append(ev.last_images.copy())
    t_resident = time.perf_counter() - t0

    t0 = time.perf_counter()
    reload_images = []
    for lam in lambdas:
        pipe = load_pipeline(str(init))
        pipe.load_lora_weights(experts[0], adapter_name="a")
        pipe.load_lora_weights(experts[1], adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[float(lam), 1.0 - float(lam)])
        ev_reload = evaluator(pipe)
        ev_reload.evaluate(pipe.unet)
        reload_images.append(ev_reload.last_images.copy())
    t_reload = time.perf_counter() - t0
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(resident_images, reload_images))
    return {"points": points, "images_per_point": prompts * seeds, "steps": steps,
            "resident_s": t_resident, "reload_s": t_reload,
            "resident_points_per_min": 60 * points / t_resident, "reload_points_per_min": 60 * points / t_reload,
            "speedup": t_reload / t_resident, "max_abs_pixel_diff_uint8": diff}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default=None, help="pipeline dir (default: the tiny pipeline built from configs)")
    parser.add_argument("--experts", nargs=2, default=None, help="two LoRA expert dirs on --init")
    parser.add_argument("--only", choices=["generation", "training", "front"], default=None)
    parser.add_argument("--batch", type=int, default=16, help="images per generation call")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (generation and the front)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--points", type=int, default=5, help="λ points of the front")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    from soups.utils import steady_malloc

    steady_malloc()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the reload baseline's load_lora_weights warns on every call
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        init = make_init(args.init, tmp)
        if args.only in (None, "generation"):
            gen = bench_generation(init, batch=args.batch, steps=args.steps, repeats=args.repeats)
            results["generation"] = gen
            print(f"generation ({args.batch} images/call, {args.steps} DDIM steps): "
                  f"{gen['images_per_s_guidance1']:.2f} images/s without guidance, "
                  f"{gen['images_per_s_guidance5']:.2f} with guidance 5", flush=True)  # fmt: skip
        if args.only in (None, "training"):
            hand = bench_train_handrolled(init, batch=args.train_batch, steps=args.train_steps)
            ours = bench_train_ours(init, tmp, batch=args.train_batch, steps=args.train_steps)
            results["training"] = {"batch": args.train_batch, "steps": args.train_steps, "ours_s_per_step": ours,
                                   "handrolled_s_per_step": hand, "ours_steps_per_s": 1 / ours,
                                   "handrolled_steps_per_s": 1 / hand, "ratio": hand / ours}  # fmt: skip
            print(f"training (batch {args.train_batch}, LoRA r=4): ours {1 / ours:.2f} steps/s, hand-rolled diffusers "
                  f"loop {1 / hand:.2f} steps/s, ratio {hand / ours:.2f}×", flush=True)  # fmt: skip
        if args.only in (None, "front"):
            experts = make_experts(args.experts, init, tmp)
            front = bench_front(init, experts, points=args.points, prompts=args.prompts, seeds=args.seeds,
                                steps=args.steps)  # fmt: skip
            results["front"] = front
            print(f"front ({args.points} λ, {front['images_per_point']} images each, {args.steps} steps): resident "
                  f"{front['resident_points_per_min']:.2f} λ points/min, reload per λ "
                  f"{front['reload_points_per_min']:.2f}, speed-up {front['speedup']:.2f}× (max pixel diff "
                  f"{front['max_abs_pixel_diff_uint8']}/255)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

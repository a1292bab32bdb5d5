"""The `diffusion` evaluator of `python -m soups.pareto`: images of the resident UNet, scored by every image reward.

    python -m soups.pareto evaluator=diffusion experts=[runs/colourfulness/expert,runs/fidelity/expert] init=INIT

The `Soup` mixes only the UNet (the resident module of the diffusers checkpoint kind); this evaluator holds the rest
of the pipeline (text encoder, tokenizer, VAE, scheduler), loaded ONCE from the experts' base pipeline without its
UNet. For a λ, `evaluate(model)` puts the resident UNet into that pipeline and generates P prompts × S seeds from
initial latents drawn once, at build time, from a seeded generator: every λ, the init and the MORL runs denoise the
same noise with the same deterministic DDIM steps and guidance (common random numbers), so neighbouring λ give
neighbouring images and differences between points are paired. Every configured reward (`rl.diffusion.rewards`,
built once) scores every image; each objective is reported as mean ± stderr over the P·S images.

Besides `front.jsonl`, `summary.json` and `front.png` (written by `soups.pareto`), the evaluator writes, through
the front's optional `OutputWriter` hook:

- `lambda_grid.png`: a contact sheet, one row per λ (then the init and MORL rows) and one column per
  (prompt, seed), so the images morph from one expert to the other down a column;
- `sample_scores.jsonl`: every point's per-image scores, in the same (prompt, seed) order for every point, for
  paired comparisons (e.g. the paired stderr of one expert's margin over the other).

Prompts are the embedded task's held-out captions (`rl.diffusion.task.scene_prompts` from `prompt_seed`, a seed
the trainer's prompts do not use) or a prompt file (one prompt per line; a missing or empty file is an error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.diffusion.sheet import contact_sheet, save_contact_sheet
from rl.diffusion.task import load_prompts, scene_prompts
from soups.pareto_registry import EVALUATORS, ObjectiveStat, mean_stderr
from soups.utils import SoupsError

__all__ = ["DiffusionEvaluator", "build_diffusion_evaluator", "contact_sheet", "expert_base", "reward_specs",
           "save_contact_sheet"]

EXPERT_FILE = "soups_expert.json"  # written beside every expert by rl.diffusion.models.save_expert
HELD_OUT_PROMPT_SEED = 2_026  # the embedded held-out prompts; the trainer draws its prompts from other seeds


# ---------------------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------------------


class DiffusionEvaluator:
    """Generates P prompts × S seeds with the resident UNet from fixed latents and scores them with every reward.

    Args:
        pipeline: A diffusers text-to-image pipeline (its UNet is replaced by the resident model at each
            `evaluate`; it may be loaded without one).
        rewards: Objective name -> image reward (`rl.diffusion.rewards.ImageReward`: images float [B, 3, H, W] in
            [0, 1] and prompts -> float [B], higher is better).
        prompts: The P prompts.
        latent_shape: (C, h, w) of one initial latent (the UNet's in_channels and sample size).
        seeds: S, initial latents per prompt.
        seed: Seeds the generator that draws the P·S initial latents, once.
        steps: Denoising steps (DDIM with η = 0: deterministic given the latents).
        guidance_scale: Classifier-free guidance scale.
        height: Image height in pixels (latent height × the VAE's scale factor).
        width: Image width in pixels.
        batch_size: Images per pipeline call.
        sheet_columns: (prompt, seed) columns kept per point for the contact sheet (the first ones).
        sheet_scale: Upscaling of the contact sheet's images.
        device: Where the resident UNet lives (the pipeline is moved there).

    Attributes:
        objectives: The reward names, in order.
        latents: float32, shape [P·S, C, h, w], on CPU: image i is prompt i // S from latent i.
        last_images: uint8 [P·S, H, W, 3] of the last `evaluate`.
        last_scores: Objective -> float64 [P·S] of the last `evaluate`.
    """

    def __init__(
        self,
        pipeline: Any,
        rewards: Mapping[str, Any],
        prompts: Sequence[str],
        *,
        latent_shape: tuple[int, int, int],
        seeds: int = 2,
        seed: int = 0,
        steps: int = 20,
        guidance_scale: float = 5.0,
        height: int,
        width: int,
        batch_size: int = 16,
        sheet_columns: int = 8,
        sheet_scale: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        if seeds < 1 or steps < 1 or batch_size < 1 or sheet_columns < 1:
            raise SoupsError(f"evaluator: seeds={seeds}, steps={steps}, batch_size={batch_size} and "
                             f"sheet_columns={sheet_columns} must all be ≥ 1")  # fmt: skip
        if not prompts:
            raise SoupsError("evaluator: no prompts to generate from")
        self.pipeline = pipeline
        self.rewards = dict(rewards)
        self.objectives = list(self.rewards)
        self.prompts = list(prompts)
        self.seeds, self.seed, self.steps = int(seeds), int(seed), int(steps)
        self.guidance_scale = float(guidance_scale)
        self.height, self.width, self.batch_size = int(height), int(width), int(batch_size)
        self.sheet_columns, self.sheet_scale = int(sheet_columns), int(sheet_scale)
        self.device = torch.device(device)
        # image i: prompt i // S, latent i; drawn once, so every point denoises the same noise
        self.image_prompts = [p for p in self.prompts for _ in range(self.seeds)]
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.latents = torch.randn((len(self.image_prompts), *latent_shape), generator=generator, dtype=torch.float32)
        self.last_images: np.ndarray | None = None
        self.last_scores: dict[str, np.ndarray] = {}
        self._placed: tuple[torch.device, torch.dtype] | None = None
        if hasattr(pipeline, "set_progress_bar_config"):
            from soups.cli import bar_disabled

            pipeline.set_progress_bar_config(disable=bar_disabled(True))

    @property
    def column_labels(self) -> list[str]:
        """The contact sheet's column labels: prompt and seed of each kept (prompt, seed) column."""
        n = min(self.sheet_columns, len(self.image_prompts))
        return [f"{self.image_prompts[i]} (seed {i % self.seeds})" for i in range(n)]

    def generate(self, unet: torch.nn.Module) -> torch.Tensor:
        """The P·S images of `unet` put into the pipeline, from the fixed latents.

        Returns:
            float32, shape [P·S, 3, H, W], in [0, 1], on CPU.
        """
        pipe = self.pipeline
        pipe.unet = unet
        dtype = next(unet.parameters()).dtype
        if self._placed != (self.device, dtype):  # the rest of the pipeline follows the resident UNet, once
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module) and component is not unet:
                    first = next(component.parameters(), None)
                    if first is not None and (first.dtype != dtype or first.device != self.device):
                        component.to(self.device, dtype)
            self._placed = (self.device, dtype)
        out = []
        with torch.no_grad():
            for i in range(0, len(self.image_prompts), self.batch_size):
                latents = self.latents[i : i + self.batch_size].to(self.device, dtype)
                result = pipe(prompt=self.image_prompts[i : i + self.batch_size], latents=latents,
                              num_inference_steps=self.steps, guidance_scale=self.guidance_scale, eta=0.0,
                              height=self.height, width=self.width, output_type="pt")  # fmt: skip
                out.append(result.images.float().cpu())
        return torch.cat(out)

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every reward of `images` (float [B, 3, H, W] in [0, 1], in `image_prompts` order): name -> float [B]."""
        scores = {}
        with torch.no_grad():
            for name, reward in self.rewards.items():
                out = []
                for i in range(0, len(images), self.batch_size):
                    batch = images[i : i + self.batch_size].to(self.device)
                    out.append(reward(batch, self.image_prompts[i : i + self.batch_size]).detach().float().cpu())
                scores[name] = torch.cat(out).flatten()
                if scores[name].numel() != len(images):
                    raise SoupsError(f"reward {name!r} returned {scores[name].numel()} scores for {len(images)} "
                                     "images")  # fmt: skip
        return scores

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """Every reward's mean ± stderr over the P·S images of the resident UNet; its weights are not touched."""
        if not hasattr(model, "config") or not hasattr(model.config, "in_channels"):
            raise SoupsError(f"the diffusion evaluator scores a diffusers UNet, got a {type(model).__name__}; are the "
                             "experts directories written by rl/train_diffusion.py?")  # fmt: skip
        was_training = model.training
        model.eval()
        try:
            images = self.generate(model)
        finally:
            model.train(was_training)
        if not torch.isfinite(images).all():
            raise SoupsError("the mixed UNet generated non-finite images")
        scores = self.score(images)
        self.last_images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.last_scores = {name: s.double().numpy() for name, s in scores.items()}
        return {name: mean_stderr(s) for name, s in scores.items()}

    # ---- the front's OutputWriter hook ------------------------------------------------------------------------

    def last_outputs(self) -> dict[str, Any]:
        """What the last `evaluate` leaves for the files: the contact sheet's images (uint8 [K, H, W, 3], the first K
        = `sheet_columns` (prompt, seed) pairs) and every image's scores (name -> list of P·S floats)."""
        if self.last_images is None:
            raise SoupsError("last_outputs() before any evaluate()")
        return {"images": self.last_images[: self.sheet_columns].copy(),
                "scores": {name: s.tolist() for name, s in self.last_scores.items()}}  # fmt: skip

    def write_outputs(self, directory: Path, rows: Sequence[Mapping[str, Any]], outputs: Sequence[Any]) -> None:
        """Writes `lambda_grid.png` and `sample_scores.jsonl` into the front's (temporary) output directory.

        Args:
            directory: The front's output directory (being written atomically).
            rows: The `front.jsonl` rows.
            outputs: `last_outputs()` of each row's evaluation (None for rows scored otherwise).
        """
        kept = [(row, out) for row, out in zip(rows, outputs) if out is not None]
        if not kept:
            return
        with (Path(directory) / "sample_scores.jsonl").open("w") as handle:
            for row, out in kept:
                handle.write(json.dumps({"kind": row["kind"], "name": row["name"], "lambda": row["lambda"],
                                         "prompts": self.image_prompts, "scores": out["scores"]}) + "\n")  # fmt: skip
        # λ rows first (grid order), then the init and the MORL runs
        order = [pair for pair in kept if pair[0]["kind"] in ("expert", "soup")]
        order += [pair for pair in kept if pair[0]["kind"] not in ("expert", "soup")]
        images = np.stack([out["images"] for _, out in order])  # [R, C, H, W, 3]
        labels = [_row_label(row) for row, _ in order]
        save_contact_sheet(Path(directory) / "lambda_grid.png", images, labels, self.column_labels,
                           scale=self.sheet_scale,
                           title=f"same initial noise in every row; {self.steps} DDIM steps, guidance "
                                 f"{self.guidance_scale:g}")  # fmt: skip


def _row_label(row: Mapping[str, Any]) -> str:
    """A contact-sheet row label: λ of soups and experts (the expert's name too), the name of the others."""
    lam = row.get("lambda")
    if row["kind"] in ("expert", "soup") and lam is not None:
        text = "λ=" + ",".join(f"{x:.2f}" for x in lam)
        return f"{row['name']}\n{text}" if row["kind"] == "expert" else text
    return str(row["name"])


# ---------------------------------------------------------------------------------------------------------------
# Building it from the front's config
# ---------------------------------------------------------------------------------------------------------------


def expert_base(path: str | Path) -> str:
    """The base pipeline (dir or Hub id) named by an expert's `soups_expert.json`, absolute when it is a local
    path (relative to the cwd or the expert).

    Raises:
        SoupsError: the expert has no readable `soups_expert.json` or it names no base.
    """
    meta_file = Path(path) / EXPERT_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise SoupsError(f"{meta_file}: cannot read the expert's description ({err}); is {path} an expert written "
                         "by rl/train_diffusion.py? Else set evaluator.pipeline=<base pipeline>") from err
    base = meta.get("base") if isinstance(meta, dict) else None
    if not base:
        raise SoupsError(f"{meta_file} names no base pipeline; set evaluator.pipeline=<base pipeline>")
    for candidate in (Path(base), Path(path) / base):
        if candidate.exists():
            return str(candidate.resolve())
    return str(base)


def reward_specs(rewards: Sequence[Any] | None, experts: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """The front's objectives as (name, build_reward options): `rewards` (names of `rl.diffusion.rewards.REWARDS` or
    mappings {name, type, **options}, as `reward.objectives` of rl/train_diffusion.py), else the union of the
    experts' training objectives (their `config.yaml`'s `reward.objectives`), in expert order.

    Raises:
        SoupsError: `rewards` is null and an expert has no training config, a spec has no name, or fewer than one
            objective.
    """
    from rl.text.evaluator import training_node

    if rewards is None:
        specs: list[Any] = []
        for expert in experts:
            for spec in training_node(expert, "reward").get("objectives") or []:
                name = spec if isinstance(spec, str) else dict(spec).get("name")
                if name not in [s if isinstance(s, str) else dict(s).get("name") for s in specs]:
                    specs.append(spec)
    else:
        specs = list(rewards)
    out = []
    for spec in specs:
        if isinstance(spec, str):
            out.append((spec, {}))
            continue
        options = dict(spec)
        if "name" not in options:
            raise SoupsError(f"evaluator.rewards entry {spec} has no 'name'")
        out.append((str(options.pop("name")), options))
    if not out:
        raise SoupsError("evaluator.rewards is empty; e.g. evaluator.rewards=[colourfulness,fidelity]")
    return out


def sampler_settings(steps: int | None, guidance_scale: float | None, experts: Sequence[str]) -> dict[str, Any]:
    """DDIM steps and guidance of the front: as given, else the first expert's training sampler (its config.yaml's
    `rwr.inference_steps` and `rwr.guidance_scale`, what its RWR images were generated with), else 20 and 1.0."""
    from rl.text.evaluator import find_training_config

    trained: dict[str, Any] = {}
    if steps is None or guidance_scale is None:
        from omegaconf import OmegaConf

        path = find_training_config(experts[0]) if experts else None
        if path is not None:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            trained = dict(loaded.get("rwr") or {}) if isinstance(loaded, dict) else {}
    return {"steps": int(steps if steps is not None else trained.get("inference_steps", 20)),
            "guidance_scale": float(guidance_scale if guidance_scale is not None
                                    else trained.get("guidance_scale", 1.0))}  # fmt: skip


def load_base_pipeline(name_or_path: str, *, device: torch.device) -> Any:
    """The base pipeline (`rl.diffusion.models.load_pipeline`) with its UNet dropped: the resident model replaces it.

    Raises:
        SoupsError: it cannot be loaded (naming it).
    """
    from rl.diffusion import models

    if not Path(name_or_path).exists() and "/" not in name_or_path:
        raise SoupsError(f"pipeline {name_or_path} does not exist (neither a directory nor a Hub id)")
    pipeline = models.load_pipeline(name_or_path, device=device)
    pipeline.unet = None  # freed now; every evaluate puts the resident UNet in its place
    return pipeline


def build_prompts(prompt_file: str | None, n_prompts: int | None, prompt_seed: int) -> list[str]:
    """The evaluation prompts: the first `n_prompts` of `prompt_file`, else `n_prompts` embedded held-out prompts.

    Raises:
        SoupsError: a missing or empty prompt file, fewer prompts than asked, or n_prompts < 1.
    """
    if n_prompts is not None and int(n_prompts) < 1:
        raise SoupsError(f"evaluator.n_prompts={n_prompts} must be ≥ 1")
    if prompt_file:
        prompts = load_prompts(prompt_file)
        if n_prompts is not None and int(n_prompts) > len(prompts):
            raise SoupsError(f"evaluator.n_prompts={n_prompts} but prompt file {prompt_file} has {len(prompts)}")
        return prompts[: int(n_prompts)] if n_prompts is not None else prompts
    return scene_prompts(int(n_prompts or 8), int(prompt_seed))


@EVALUATORS.register("diffusion")
def build_diffusion_evaluator(cfg: Mapping[str, Any], *, experts: Sequence[str], device: torch.device) -> Any:
    """Builds the evaluator from its config node (configs/pareto/evaluator/diffusion.yaml): the base pipeline (without
    UNet, once), the rewards (once), the prompts and the fixed latents."""
    from omegaconf import OmegaConf

    from rl.diffusion.rewards import build_reward

    node = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    prompts = build_prompts(node.get("prompts"), node.get("n_prompts", 8), int(node.get("prompt_seed",
                                                                                         HELD_OUT_PROMPT_SEED)))
    source = str(node.get("pipeline") or expert_base(experts[0]))
    pipeline = load_base_pipeline(source, device=device)
    unet_config = _unet_config(source)
    scale = int(getattr(pipeline, "vae_scale_factor", 1) or 1)
    sample = unet_config["sample_size"]
    sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
    height = int(node.get("height") or sample[0] * scale)
    width = int(node.get("width") or sample[1] * scale)
    latent_shape = (int(unet_config["in_channels"]), height // scale, width // scale)
    sampler = sampler_settings(node.get("steps"), node.get("guidance_scale"), experts)
    rewards = {name: build_reward(name, options, device=device)
               for name, options in reward_specs(node.get("rewards"), experts)}  # fmt: skip
    return DiffusionEvaluator(pipeline, rewards, prompts, latent_shape=latent_shape,
                              seeds=int(node.get("seeds", 2)), seed=int(node.get("seed", 0)),
                              steps=int(sampler["steps"]), guidance_scale=float(sampler["guidance_scale"]),
                              height=height, width=width, batch_size=int(node.get("batch_size", 16)),
                              sheet_columns=int(node.get("sheet_columns", 8)),
                              sheet_scale=int(node.get("sheet_scale", 4)), device=device)  # fmt: skip


def _unet_config(source: str) -> dict[str, Any]:
    """The base pipeline's UNet config (in_channels, sample_size), read without loading weights."""
    from diffusers import UNet2DConditionModel

    try:
        return dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
    except (OSError, ValueError) as err:
        raise SoupsError(f"cannot read the UNet config of {source}: {' '.join(str(err).split())[:300]}") from err

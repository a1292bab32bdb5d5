"""Image rewards of the diffusion family: a registry of scorers of (image, prompt) batches, higher is better.

An `ImageReward` has a `name` and is called as `reward(images, prompts)`: images float32 Tensor[B, 3, H, W] in
[0, 1] (what a diffusers pipeline returns with `output_type="pt"`), prompts B strings; it returns float32
Tensor[B] on the images' device. Non-finite values are NOT filtered here (an image holding NaN scores NaN): the
trainer's `RewardSet` check stops the run on them. Model rewards see images as 8-bit (`to_uint8`, as trl's DDPO
scorers and saved PNGs do) through the model's own Hub processor.

`build_reward(name, cfg, device=...)` builds one from the registry `REWARDS` (an unknown name or option lists the
valid ones); `build_reward_set(cfg, device=...)` builds a run's objectives and scalarisation as the shared
`RewardSet` (rl/text/rewards.py, re-exported by rl/runtime.py), whose `(samples, responses)` call takes
`(images, prompts)`. Configs: configs/train_diffusion/reward/*.yaml.

Embedded rewards (offline, the default task; they conflict on purpose):
- `colourfulness`: Hasler & Süsstrunk (2003), "Measuring colourfulness in natural images", a rule on 0..255 RGB:
  rg = R − G, yb = ½(R + G) − B, M = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²), per image (population σ over
  the pixels). A grey image scores 0, a uniform red one 0.3·|(255, 127.5)| = 85.5. (pyimagesearch's popular
  version takes |R − G| and |yb|, which changes σ and μ; the paper's signed differences are used here.)
- `fidelity`: PickScore's score exp(logit_scale)·cos(image, prompt) under a tiny `CLIPModel` (ViT 16×16 images,
  patch 4; text tower on the tiny tokenizer of `rl.diffusion.models`) trained contrastively on `generate_scenes`
  (`ensure_fidelity_model`: cached with `save_pretrained` beside its `CLIPProcessor` and `fidelity_info.json`,
  atomically, refused when built with other settings) and loaded by `load_clip`, the code `pickscore` takes. On a
  dull prompt ("a grey square on a white background") it prefers the right dull scene to the same scene
  recoloured vividly, which colourfulness prefers: the two rewards pull apart.

Hub presets (each id and head checked with the project's search tool; sources in brackets):
- `ava`: the LAION aesthetic predictor v2 ("improved-aesthetic-predictor", C. Schuhmann), the thesis' ava reward:
  the image embedding of CLIP ViT-L/14 (`openai/clip-vit-large-patch14`, 768-d, L2-normalised) into an MLP
  Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
  Linear(16, 1), with no activations (keys `layers.{0,2,4,6,7}`). The weights `sac+logos+ava1-l14-linearMSE.pth`
  are on the Hub as `trl-lib/ddpo-aesthetic-predictor` / `aesthetic-model.pth` (3.71 MB, a pickled OrderedDict of
  tensors; that repo's history shows the upload of sac+logos+ava1-l14-linearMSE.pth renamed to
  aesthetic-model.pth; its README points to improved-aesthetic-predictor) [huggingface.co/trl-lib/
  ddpo-aesthetic-predictor; trl's examples/scripts/ddpo.py `MLP` and `AestheticScorer`; the
  improved-aesthetic-predictor README]. Read with `torch.load(weights_only=True)` (or a .safetensors file).
- `cafe`: `cafeai/cafe_aesthetic`, a BEiT image classifier (`BeitForImageClassification`, Hub tags "beit",
  "Image Classification"), labels {0: "aesthetic", 1: "not_aesthetic"}; its score is the softmax probability (or
  the logit) of "aesthetic", the index looked up in `label2id` [huggingface.co/cafeai/cafe_aesthetic; its demo
  Space and users' code reading `pipeline("image-classification", "cafeai/cafe_aesthetic")`].
- `pickscore`: `yuvalkirstain/PickScore_v1` (AutoModel) with the processor of
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (AutoProcessor); score exp(logit_scale)·cos(text, image) of the
  L2-normalised `get_text_features` / `get_image_features` [the PickScore v1 model card's code].
- `clipscore`: any CLIP model; CLIPScore = w·max(cos, 0), w = 2.5 (Hessel et al. 2021); torchmetrics' `CLIPScore`
  is the same with w = 100 (tested against it).
- Not provided: `imagereward` and `hps`. Neither package (`image-reward`, `hpsv2`) is installed here, and neither
  loads from a model built from a config: ImageReward's BLIP loader needs `ImageReward.pt` and `med_config.json`
  from `THUDM/ImageReward` and the `bert-base-uncased` tokenizer, HPS v2 an open_clip ViT-H-14 plus
  `xswu/HPSv2`'s checkpoint, all fixed full-size architectures, so their loading code could not be tested offline
  on a tiny model as every preset here is.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from soups.registry import Registry
from soups.utils import SoupsError

__all__ = [
    "FIDELITY_INFO",
    "REWARDS",
    "AestheticMLP",
    "AvaReward",
    "CafeReward",
    "ClipReward",
    "ColourfulnessReward",
    "FidelityConfig",
    "ImageReward",
    "build_fidelity_clip",
    "build_reward",
    "build_reward_set",
    "check_images",
    "colourfulness",
    "conflict_on_scenes",
    "ensure_fidelity_model",
    "load_clip",
    "resolve_device",
    "to_uint8",
    "train_fidelity_model",
]


@runtime_checkable
class ImageReward(Protocol):
    """A reward on generated images: one float per (image, prompt), higher is better."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores images float32 Tensor[B, 3, H, W] in [0, 1] against prompts (B strings): float32 Tensor[B]."""
        ...


# Registry name -> builder(**options, device=..., name=...) -> ImageReward.
REWARDS: Registry[Callable[..., ImageReward]] = Registry("image reward")


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else as `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_images(images: torch.Tensor, prompts: Sequence[str] | None, reward: str) -> None:
    """Raises `SoupsError` unless images is a float Tensor[B, 3, H, W] (and prompts, if given, has B strings)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SoupsError(f"reward {reward!r}: images must be a Tensor[B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise SoupsError(f"reward {reward!r}: images must be floating point in [0, 1], got {images.dtype}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise SoupsError(f"reward {reward!r}: {images.shape[0]} images but {len(prompts)} prompts")


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------


def build_reward(name: str, cfg: Mapping[str, Any] | None = None, *, device: str | torch.device = "cpu") -> ImageReward:
    """One image reward from its registry name and options.

    Args:
        name: The objective's name; also the registry name unless `cfg` has `type`.
        cfg: Options of the reward's builder (see each builder's docstring), plus optionally `type` (the registry
            name when `name` is a custom objective name, e.g. name=ava_l14, type=ava) and `device` (overrides the
            argument when not null).
        device: Where a model reward runs (`auto` = CUDA when present); rule rewards run where the images are.

    Raises:
        UnknownNameError: The type is not registered (the message lists the valid names).
        SoupsError: An option the builder does not take (the valid ones are listed).
    """
    options = dict(_to_container(cfg or {}))
    kind = str(options.pop("type", name))
    options.pop("name", None)
    if options.get("device") is not None:  # the objective's own device (e.g. `auto`) wins over the run's
        device = options["device"]
    options.pop("device", None)
    builder = REWARDS.get(kind)
    accepted = [p for p in inspect.signature(builder).parameters if p != "name"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SoupsError(f"reward {name!r} ({kind}): unknown option(s) {unknown}; valid: {', '.join(accepted)}")
    return builder(**options, device=device, name=name)


def build_reward_set(cfg: Mapping[str, Any] | Any, *, device: str | torch.device = "cpu") -> Any:
    """The run's `RewardSet` over image rewards, from the `reward` config node.

    Keys (as for rl/train_ppo.py): `objectives` (names of `REWARDS`, or mappings {name, type, **options}),
    `optimize` (an objective name, or `morl`), `weights` (MORL μ on the simplex, only with `morl`),
    `normalize` (running mean/std normalisation before scalarising). The set is called as
    `reward_set(images, prompts)` and returns the raw rewards Tensor[B, K] (CPU, checked finite).
    """
    from rl.runtime import RewardSet, morl_weights

    data = _to_container(cfg)
    specs = list(data.get("objectives") or [])
    if not specs:
        raise SoupsError("reward.objectives is empty; e.g. objectives: [colourfulness, fidelity]")
    objectives = []
    for spec in specs:
        if isinstance(spec, str):
            objectives.append((spec, build_reward(spec, {}, device=device)))
            continue
        spec = dict(spec)
        if "name" not in spec:
            raise SoupsError(f"reward objective {spec} has no 'name'")
        objectives.append((str(spec["name"]), build_reward(str(spec.pop("name")), spec, device=device)))
    names = [n for n, _ in objectives]
    optimize = str(data.get("optimize", names[0] if len(names) == 1 else ""))
    raw_weights = data.get("weights")
    if optimize == "morl":
        if raw_weights is None:
            raise SoupsError(f"reward.optimize=morl needs reward.weights, one per objective {names}")
        weights = morl_weights(list(raw_weights), names)
    elif optimize in names:
        if raw_weights is not None:
            raise SoupsError(f"reward.weights={list(raw_weights)} is only used with reward.optimize=morl, "
                             f"not optimize={optimize}")  # fmt: skip
        weights = torch.zeros(len(names))
        weights[names.index(optimize)] = 1.0
    else:
        raise SoupsError(f"reward.optimize={optimize!r} is not an objective; valid: {', '.join([*names, 'morl'])}")
    return RewardSet(objectives, weights, optimize, normalize=bool(data.get("normalize", False)))


def _to_container(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise SoupsError(f"reward config must be a mapping, got {type(cfg).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Colourfulness (rule)
# ----------------------------------------------------------------------------------------------------------


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Süsstrunk's colourfulness M of each image (see the module docstring).

    Args:
        images: float Tensor[B, 3, H, W], RGB in [0, 1] (scaled to 0..255 here, the paper's units).

    Returns:
        float32 Tensor[B] (0 for any grey image; about 0..300 for 8-bit images), on the images' device.
    """
    rgb = images.to(torch.float64) * 255.0
    r, g, b = rgb[:, 0].flatten(1), rgb[:, 1].flatten(1), rgb[:, 2].flatten(1)  # [B, H*W]
    rg, yb = r - g, 0.5 * (r + g) - b
    std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return (std + 0.3 * mean).to(torch.float32)


class ColourfulnessReward:
    """The `colourfulness` reward: Hasler–Süsstrunk M of the image, divided by `scale`; the prompt is ignored.

    Args:
        scale: Divides M (1 keeps the paper's units, about 0..300 on 8-bit images).
        name: The objective's name.
    """

    def __init__(self, scale: float = 1.0, name: str = "colourfulness") -> None:
        if not float(scale) > 0:
            raise SoupsError(f"reward {name!r}: scale must be > 0, got {scale}")
        self.scale, self.name = float(scale), name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Tensor[B] float32: M / scale for images Tensor[B, 3, H, W] in [0, 1]."""
        check_images(images, prompts, self.name)
        return colourfulness(images) / self.scale


@REWARDS.register("colourfulness")
def _build_colourfulness(
    *, scale: float = 1.0, device: str | torch.device = "cpu", name: str = "colourfulness"
) -> ImageReward:
    """Hasler–Süsstrunk colourfulness (a rule: runs where the images are; `device` is unused)."""
    del device
    return ColourfulnessReward(scale=scale, name=name)


# ----------------------------------------------------------------------------------------------------------
# Shared by the model rewards: images to the processors' input, CLIP loading and scoring
# ----------------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Images in [0, 1] -> 8-bit images, as trl's DDPO scorers and saved PNGs see them.

    Args:
        images: float Tensor[B, 3, H, W] in [0, 1].

    Returns:
        (B uint8 Tensor[3, H, W] on CPU, the input of a Hub image processor; bool Tensor[B], True where the image
        was entirely finite; a non-finite image is zeroed here and its score set to NaN by the caller).
    """
    finite = torch.isfinite(images.flatten(1)).all(dim=1).cpu()
    safe = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=1.0, neginf=0.0)
    pixels = (safe * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return list(pixels), finite


def _features(output: Any) -> torch.Tensor:
    """`get_image_features` / `get_text_features` output -> Tensor[B, D] (transformers 5 returns a ModelOutput)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _nan_where(scores: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite.to(scores.device), scores, torch.full_like(scores, float("nan")))


def load_clip(
    name_or_path: str, processor: str | None = None, *, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:  # fmt: skip
    """A CLIP model and its processor through `AutoModel` / `AutoProcessor.from_pretrained` (a Hub id or a local
    directory; no remote code), as PickScore's model card loads them.

    Args:
        name_or_path: The model (e.g. `yuvalkirstain/PickScore_v1`, `openai/clip-vit-large-patch14`, or a
            directory written by `save_pretrained`).
        processor: Where the processor is, when not beside the model (PickScore:
            `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
        device: Where the model goes.
        dtype: The model's floating dtype.

    Returns:
        (model in eval mode, processor).

    Raises:
        SoupsError: either cannot be loaded (named, with the reason on the same line).
    """
    from transformers import AutoModel, AutoProcessor

    what = name_or_path
    try:
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=False)
        what = processor or name_or_path
        proc = AutoProcessor.from_pretrained(what, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SoupsError(f"cannot load the CLIP reward model {what}: {' '.join(str(err).split())[:300]}") from err
    if not hasattr(model, "get_image_features"):
        raise SoupsError(f"{name_or_path} is a {type(model).__name__}, not a CLIP-like model (no get_image_features)")
    return model.to(device).eval(), proc


class ClipReward:
    """An image-text score of a CLIP model: PickScore's or CLIPScore.

    - `pickscore` (Kirstain et al. 2023, the model card's code): s = exp(logit_scale) · cos(image, text);
    - `clipscore` (Hessel et al. 2021): s = w · max(cos(image, text), 0), w = 2.5 (torchmetrics' `CLIPScore` is
      100 · max(cos, 0) of the same embeddings).

    Images go to the processor as 8-bit (`to_uint8`), prompts padded and truncated to the tokenizer's length.

    Args:
        name_or_path: The CLIP model (Hub id or directory).
        processor: The processor's Hub id or directory, when not beside the model.
        score: `pickscore` or `clipscore`.
        w: CLIPScore's weight.
        batch_size: Images per forward pass.
        device: Where the model runs.
        name: The objective's name.
    """

    SCORES = ("pickscore", "clipscore")

    def __init__(
        self, name_or_path: str, *, processor: str | None = None, score: str = "pickscore", w: float = 2.5,
        batch_size: int = 64, device: torch.device | str = "cpu", name: str = "pickscore",
    ) -> None:  # fmt: skip
        if score not in self.SCORES:
            raise SoupsError(f"reward {name!r}: score={score!r}; valid: {', '.join(self.SCORES)}")
        if int(batch_size) < 1:
            raise SoupsError(f"reward {name!r}: batch_size must be >= 1, got {batch_size}")
        self.name, self.score, self.w, self.batch_size = name, score, float(w), int(batch_size)
        self.device = resolve_device(device)
        self.model, self.processor = load_clip(str(name_or_path), processor, device=self.device)

    def to(self, device: torch.device | str) -> ClipReward:
        """Moves the model to `device`."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, float32 Tensor[B, D] each, for images Tensor[B, 3, H, W]."""
        pixels, _ = to_uint8(images)
        img = self.processor(images=pixels, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        txt = self.processor(text=list(prompts), padding=True, truncation=True, return_tensors="pt")
        txt = {k: v.to(self.device) for k, v in txt.items() if k in ("input_ids", "attention_mask")}
        image_embs = _features(self.model.get_image_features(pixel_values=img)).float()
        text_embs = _features(self.model.get_text_features(**txt)).float()
        return (image_embs / image_embs.norm(dim=-1, keepdim=True), text_embs / text_embs.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """float32 Tensor[B] on the images' device (NaN for an image holding a non-finite value)."""
        check_images(images, prompts, self.name)
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            image_embs, text_embs = self.embed(images[start:stop], prompts[start:stop])
            cos = (image_embs * text_embs).sum(dim=-1)
            if self.score == "pickscore":
                out.append(self.model.logit_scale.exp().float() * cos)
            else:
                out.append(self.w * cos.clamp(min=0))
        scores = torch.cat(out) if out else torch.zeros(0)
        return _nan_where(scores.float().to(images.device), torch.isfinite(images.flatten(1)).all(dim=1))


def _resolve_file(repo_or_path: str, filename: str, what: str) -> Path:
    """A file from a local file, a local directory (+ filename), or a Hub repo (`hf_hub_download`)."""
    path = Path(repo_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise SoupsError(f"{what}: {path} has no {filename}")
        return path / filename
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_or_path, filename))
    except Exception as err:  # offline, missing repo or file: one clear line
        raise SoupsError(f"{what}: cannot get {filename} from {repo_or_path}: {' '.join(str(err).split())[:300]}") \
            from err


# ----------------------------------------------------------------------------------------------------------
# fidelity: a tiny CLIP trained on the scenes, loaded like PickScore
# ----------------------------------------------------------------------------------------------------------

FIDELITY_INFO = "fidelity_info.json"


@dataclass
class FidelityConfig:
    """Settings of the tiny CLIP behind `fidelity` (`smoke=True` in `ensure_fidelity_model` shrinks the run).

    Attributes:
        seed: Seeds the scenes, the init, the batch order and the augmentation.
        image_size: Image side (the scenes' and the tiny pipeline's, 16).
        patch_size: ViT patch side (16 / 4 -> 16 patches).
        hidden_size: Width of both towers.
        num_layers: Layers of each tower.
        num_heads: Attention heads.
        projection_dim: The joint embedding's dimension.
        n_train: Training scenes.
        n_eval: Held-out scenes (top-1 caption retrieval within batches of `batch_size`; also counted on the two
            colours only, since nearly all errors are circle/square confusions at 16 px).
        steps: Optimiser steps.
        batch_size: Scenes per contrastive batch (in-batch negatives).
        lr: AdamW learning rate (cosine decay to 0).
        noise: Max std of Gaussian pixel noise added to training images (in [0, 1] units), so generated images,
            which are noisier than renders, stay in distribution.
    """

    seed: int = 0
    image_size: int = 16
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    projection_dim: int = 32
    n_train: int = 8192
    n_eval: int = 1024
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.1


def build_fidelity_clip(cfg: FidelityConfig) -> tuple[Any, Any]:
    """A random tiny `CLIPModel` (from a `CLIPConfig`) and its `CLIPProcessor` (an offline `CLIPImageProcessor`
    with OpenAI CLIP's normalisation, and the tiny tokenizer of `rl.diffusion.models`, one token per word)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rl.diffusion.models import tiny_tokenizer
    from rl.diffusion.task import vocabulary

    tokenizer = tiny_tokenizer(vocabulary())
    width = dict(hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                 num_attention_heads=cfg.num_heads, projection_dim=cfg.projection_dim)  # fmt: skip
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **width),
        vision_config=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, **width),
        projection_dim=cfg.projection_dim,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                         crop_size={"height": cfg.image_size, "width": cfg.image_size})  # fmt: skip
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _scene_batch(processor: Any, scenes: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = [torch.from_numpy(s["image"]).permute(2, 0, 1) for s in scenes]
    images = processor(images=pixels, return_tensors="pt")["pixel_values"]
    text = processor(text=[s["prompt"] for s in scenes], padding="max_length", truncation=True, return_tensors="pt")
    return images, {k: text[k] for k in ("input_ids", "attention_mask")}


def train_fidelity_model(cfg: FidelityConfig, *, show_progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Trains the tiny CLIP contrastively (CLIP's symmetric InfoNCE, in-batch negatives) on `generate_scenes`.

    Returns:
        (model, processor, info): info holds the settings, the held-out top-1 retrieval accuracy (an image's
        highest-scoring caption among its batch's is its own caption; identical captions count as right), the
        same accuracy at init, the loss curve and the training time.
    """
    from tqdm.auto import tqdm

    from rl.diffusion.task import generate_scenes
    from soups.cli import bar_disabled
    from soups.utils import seed_everything

    seed_everything(cfg.seed)
    model, processor = build_fidelity_clip(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    train = generate_scenes(cfg.n_train, seed=cfg.seed * 1000 + 1, size=cfg.image_size)
    held_out = generate_scenes(cfg.n_eval, seed=cfg.seed * 1000 + 2, size=cfg.image_size)
    images, text = _scene_batch(processor, train)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    accuracy_at_init = _retrieval_accuracy(model, processor, held_out, cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    rng = random.Random(f"fidelity/{cfg.seed}")
    generator = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(cfg.steps), desc="fidelity CLIP", disable=bar_disabled(show_progress), leave=False):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = torch.tensor(order[: cfg.batch_size]), order[cfg.batch_size :]
        pixel_values = images[idx]
        sigma = cfg.noise * torch.rand(len(idx), 1, 1, 1, generator=generator)
        pixel_values = pixel_values + sigma * torch.randn(pixel_values.shape, generator=generator) / std
        out = model(pixel_values=pixel_values, input_ids=text["input_ids"][idx],
                    attention_mask=text["attention_mask"][idx], return_loss=True)  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach().item())
    model.eval()
    info = {
        "settings": asdict(cfg),
        "eval_top1_retrieval": _retrieval_accuracy(model, processor, held_out, cfg.batch_size),
        "eval_top1_retrieval_colours": _retrieval_accuracy(model, processor, held_out, cfg.batch_size,
                                                           colours_only=True),
        "eval_top1_retrieval_at_init": accuracy_at_init,
        "retrieval_batch": cfg.batch_size,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 40)],
        "train_seconds": round(time.perf_counter() - t0, 2),
        "train_cpu_seconds": round(time.process_time() - c0, 2),  # all threads; wall time depends on the load
        "torch_threads": torch.get_num_threads(),
        "score": "pickscore: exp(logit_scale) * cos(image, text)",
    }
    return model, processor, info


@torch.no_grad()
def _retrieval_accuracy(
    model: Any, processor: Any, scenes: Sequence[Mapping[str, Any]], batch_size: int, *, colours_only: bool = False
) -> float:
    """Held-out top-1 caption retrieval: per image, is the best caption of its batch its own (by text)? With
    `colours_only`, a retrieved caption counts when its shape colour and background colour are right."""
    was_training = model.training
    model.eval()
    right = 0

    def key(scene: Mapping[str, Any]) -> Any:
        return (scene["scene"].colour, scene["scene"].background) if colours_only else scene["prompt"]

    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        images, text = _scene_batch(processor, batch)
        image_embs = _features(model.get_image_features(pixel_values=images))
        text_embs = _features(model.get_text_features(**text))
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        sims = image_embs @ (text_embs / text_embs.norm(dim=-1, keepdim=True)).T
        best = sims.argmax(dim=1).tolist()
        right += sum(key(batch[i]) == key(batch[j]) for i, j in enumerate(best))
    model.train(was_training)
    return right / max(len(scenes), 1)


def ensure_fidelity_model(
    directory: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    smoke: bool = False,
    overrides: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Builds (if missing) the tiny CLIP of `fidelity` and returns its directory.

    The directory holds what `save_pretrained` writes for the model and the processor, plus `fidelity_info.json`
    (settings, held-out accuracy); it is published atomically, reused when its settings match, and refused (with
    the two settings named) when they do not.

    Args:
        directory: Where; default `<$SOUPS_CACHE or ~/.cache/soups>/diffusion_fidelity/seed<seed>[-smoke]`.
        seed: See `FidelityConfig`.
        smoke: A seconds-long build for tests (fewer scenes and steps).
        overrides: Fields of `FidelityConfig` to change.
        show_progress: Draw the tqdm bar (on a terminal only).

    Returns:
        The directory; `AutoModel.from_pretrained` / `AutoProcessor.from_pretrained` load it.
    """
    from rl.text.task import default_cache_dir
    from soups.utils import atomic_dir, write_json

    cfg = FidelityConfig(seed=seed)
    if smoke:
        cfg.n_train, cfg.n_eval, cfg.steps, cfg.batch_size = 1536, 256, 100, 64
    valid = [f.name for f in fields(cfg)]
    for key, value in dict(overrides or {}).items():
        if key not in valid:
            raise SoupsError(f"fidelity model: unknown setting {key!r}; valid: {', '.join(valid)}")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    if directory is None:
        directory = default_cache_dir() / "diffusion_fidelity" / f"seed{seed}{'-smoke' if smoke else ''}"
    target = Path(directory)
    info_path = target / FIDELITY_INFO
    if info_path.exists():
        built = json.loads(info_path.read_text()).get("settings")
        if built != asdict(cfg):
            raise SoupsError(f"fidelity model: {target} was built with settings {built}, not {asdict(cfg)}; remove "
                             "it or choose another reward.dir")  # fmt: skip
        return target
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 150k-parameter model: more threads only contend (2 threads on 2 loaded cores: 10×
    try:  # slower in CPU time than 1), and the result does not depend on it
        model, processor, info = train_fidelity_model(cfg, show_progress=show_progress)
    finally:
        torch.set_num_threads(threads)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SoupsError(f"fidelity model: tensor {key} is not finite after training; not saved")
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            write_json(tmp / FIDELITY_INFO, info)
    except SoupsError:
        if not info_path.exists():  # another process published the same build first
            raise
    return target


def conflict_on_scenes(fidelity: ImageReward, colour: ImageReward, *, n_scenes: int = 2000, seed: int = 5,
                       size: int = 16) -> dict[str, Any]:  # fmt: skip
    """The embedded rewards' conflict on rendered scenes: each all-dull scene of `generate_scenes(n_scenes, seed)`
    (shape and background in white, grey, black, brown) against the same scene recoloured with a random vivid shape
    colour and another vivid background, both scored on the dull scene's prompt.

    Returns:
        {"pairs": n, "fidelity_right"/"fidelity_recoloured"/"colourfulness_right"/"colourfulness_recoloured": mean
        scores, "fidelity_prefers_right"/"colourfulness_prefers_recoloured": fractions of pairs,
        "fidelity_gap_stderr": the stderr of the paired fidelity difference}.
    """
    from rl.diffusion.task import caption, generate_scenes, render

    dull_names = ("white", "grey", "black", "brown")
    vivid_names = ("red", "green", "blue", "yellow", "purple", "orange")
    rng = random.Random(f"conflict/{seed}")
    dull = [s["scene"] for s in generate_scenes(n_scenes, seed, size)
            if s["scene"].colour in dull_names and s["scene"].background in dull_names]  # fmt: skip
    if not dull:
        raise SoupsError(f"conflict_on_scenes: no all-dull scene among {n_scenes}; draw more")
    vivid = []
    for scene in dull:
        shape_colour = rng.choice(vivid_names)
        background = rng.choice([v for v in vivid_names if v != shape_colour])
        vivid.append(replace(scene, colour=shape_colour, background=background))

    def batch(scenes: Sequence[Any]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(render(s, size)).permute(2, 0, 1) for s in scenes]).float() / 255

    right, recoloured, prompts = batch(dull), batch(vivid), [caption(s) for s in dull]
    fr, fv = fidelity(right, prompts).double(), fidelity(recoloured, prompts).double()
    cr, cv = colour(right, prompts).double(), colour(recoloured, prompts).double()
    gap = fr - fv
    return {
        "pairs": len(dull), "fidelity_right": fr.mean().item(), "fidelity_recoloured": fv.mean().item(),
        "colourfulness_right": cr.mean().item(), "colourfulness_recoloured": cv.mean().item(),
        "fidelity_prefers_right": (gap > 0).double().mean().item(),
        "colourfulness_prefers_recoloured": (cv > cr).double().mean().item(),
        "fidelity_gap_stderr": (gap.std() / len(dull) ** 0.5).item() if len(dull) > 1 else float("nan"),
    }  # fmt: skip


@REWARDS.register("fidelity")
def _build_fidelity(
    *, dir: str | None = None, seed: int = 0, smoke: bool = False, overrides: Mapping[str, Any] | None = None,  # noqa: A002
    batch_size: int = 256, device: str | torch.device = "cpu", name: str = "fidelity",
) -> ImageReward:  # fmt: skip
    """Prompt fidelity: PickScore's score under the tiny CLIP trained on the scenes (built on first use, ~1 min on
    2 cores; `smoke` a few seconds), loaded by path through `load_clip`, the code PickScore takes.

    Args:
        dir: The model's directory (default under $SOUPS_CACHE, see `ensure_fidelity_model`).
        seed, smoke, overrides: Build settings.
        batch_size: Images per forward pass.
    """
    path = ensure_fidelity_model(dir, seed=seed, smoke=smoke, overrides=overrides, show_progress=False)
    return ClipReward(str(path), score="pickscore", batch_size=batch_size, device=device, name=name)


# ----------------------------------------------------------------------------------------------------------
# Hub presets
# ----------------------------------------------------------------------------------------------------------


@REWARDS.register("pickscore")
def _build_pickscore(
    *, name_or_path: str = "yuvalkirstain/PickScore_v1",
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", batch_size: int = 16,
    device: str | torch.device = "auto", name: str = "pickscore",
) -> ImageReward:  # fmt: skip
    """PickScore v1: exp(logit_scale) · cos(image, text) of the CLIP-H fine-tuned on Pick-a-Pic."""
    return ClipReward(name_or_path, processor=processor, score="pickscore", batch_size=batch_size, device=device,
                      name=name)  # fmt: skip


@REWARDS.register("clipscore")
def _build_clipscore(
    *, name_or_path: str = "openai/clip-vit-large-patch14", processor: str | None = None, w: float = 2.5,
    batch_size: int = 32, device: str | torch.device = "auto", name: str = "clipscore",
) -> ImageReward:  # fmt: skip
    """CLIPScore (Hessel et al. 2021): w · max(cos(image, text), 0) under any CLIP model."""
    return ClipReward(name_or_path, processor=processor, score="clipscore", w=w, batch_size=batch_size,
                      device=device, name=name)  # fmt: skip


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor v2 head (improved-aesthetic-predictor's `MLP`, as trl's DDPO example loads it):
    Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
    Linear(16, 1), no activations ("linearMSE"); the state dict's keys are `layers.{0,2,4,6,7}.{weight,bias}`.

    Args:
        in_dim: The CLIP image embedding's size (768 for ViT-L/14).
    """

    def __init__(self, in_dim: int = 768) -> None:
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        """embed: Tensor[B, d] (L2-normalised CLIP image embeddings) -> Tensor[B, 1]."""
        return self.layers(embed)


def load_aesthetic_head(path: str | os.PathLike[str]) -> AestheticMLP:
    """Reads an `AestheticMLP` from a `.pth` (`torch.load(weights_only=True)`: tensors only, no code) or a
    `.safetensors` file; the input size comes from the first layer's weight; the keys must match exactly."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpicklable, truncated, not a state dict
        raise SoupsError(f"ava: cannot read the aesthetic head {path}: {' '.join(str(err).split())[:300]}") from err
    if not isinstance(state, Mapping) or "layers.0.weight" not in state:
        raise SoupsError(f"ava: {path} is not an aesthetic MLP state dict (no layers.0.weight)")
    head = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise SoupsError(f"ava: {path} does not match the aesthetic MLP layout: {' '.join(str(err).split())[:300]}") \
            from err
    return head.eval()


class AvaReward:
    """The LAION aesthetic predictor v2 (the thesis' `ava` reward): head(CLIP image embedding / ‖·‖), one float per
    image on AVA's 1..10 scale; the prompt is ignored.

    Args:
        clip: The CLIP model (Hub id or directory) whose image embedding the head reads (ViT-L/14).
        head: The head: a Hub repo, a directory or a file.
        head_file: The head's file name in `head` (when a repo or a directory).
        batch_size: Images per forward pass.
        device: Where it runs.
        name: The objective's name.
    """

    def __init__(
        self, clip: str, head: str, head_file: str, *, batch_size: int = 32, device: torch.device | str = "cpu",
        name: str = "ava",
    ) -> None:  # fmt: skip
        self.name, self.batch_size, self.device = name, int(batch_size), resolve_device(device)
        self.model, self.processor = load_clip(clip, device=self.device)
        self.head = load_aesthetic_head(_resolve_file(head, head_file, f"reward {name!r}")).to(self.device)
        dim = self.model.config.projection_dim
        if self.head.layers[0].in_features != dim:
            raise SoupsError(f"reward {name!r}: the head reads {self.head.layers[0].in_features}-d embeddings but "
                             f"{clip} embeds images in {dim} dimensions")  # fmt: skip

    def to(self, device: torch.device | str) -> AvaReward:
        """Moves both models to `device`."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.head.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """float32 Tensor[B] on the images' device (NaN for an image holding a non-finite value)."""
        check_images(images, prompts, self.name)
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels, _ = to_uint8(images[start : start + self.batch_size])
            inputs = self.processor(images=pixels, return_tensors="pt")["pixel_values"].to(self.device)
            embed = _features(self.model.get_image_features(pixel_values=inputs.to(self.model.dtype))).float()
            embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
            out.append(self.head(embed).squeeze(1))
        scores = torch.cat(out) if out else torch.zeros(0)
        return _nan_where(scores.float().to(images.device), torch.isfinite(images.flatten(1)).all(dim=1))


@REWARDS.register("ava")
def _build_ava(
    *, clip: str = "openai/clip-vit-large-patch14", head: str = "trl-lib/ddpo-aesthetic-predictor",
    head_file: str = "aesthetic-model.pth", batch_size: int = 32, device: str | torch.device = "auto",
    name: str = "ava",
) -> ImageReward:  # fmt: skip
    """The LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) on CLIP ViT-L/14."""
    return AvaReward(clip, head, head_file, batch_size=batch_size, device=device, name=name)


class CafeReward:
    """An image classifier's label as a reward (`cafeai/cafe_aesthetic`: a BEiT, labels aesthetic / not_aesthetic),
    through `AutoModelForImageClassification` and `AutoImageProcessor`, as the `image-classification` pipeline
    loads it; the prompt is ignored.

    Args:
        name_or_path: The classifier (Hub id or directory).
        label: The label scored (looked up in the config's `label2id`).
        output: `prob` (softmax probability of `label`) or `logit` (its logit).
        batch_size: Images per forward pass.
        device: Where it runs.
        name: The objective's name.
    """

    OUTPUTS = ("prob", "logit")

    def __init__(
        self, name_or_path: str, *, label: str = "aesthetic", output: str = "prob", batch_size: int = 32,
        device: torch.device | str = "cpu", name: str = "cafe",
    ) -> None:  # fmt: skip
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if output not in self.OUTPUTS:
            raise SoupsError(f"reward {name!r}: output={output!r}; valid: {', '.join(self.OUTPUTS)}")
        self.name, self.output, self.batch_size, self.device = name, output, int(batch_size), resolve_device(device)
        try:
            self.model = AutoModelForImageClassification.from_pretrained(name_or_path, trust_remote_code=False)
            self.processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SoupsError(f"cannot load the image classifier {name_or_path}: {' '.join(str(err).split())[:300]}") \
                from err
        labels = {str(k): int(v) for k, v in self.model.config.label2id.items()}
        if label not in labels:
            raise SoupsError(f"reward {name!r}: {name_or_path} has no label {label!r}; its labels: "
                             f"{', '.join(sorted(labels))}")  # fmt: skip
        self.index = labels[label]
        self.model.to(self.device).eval()

    def to(self, device: torch.device | str) -> CafeReward:
        """Moves the model to `device`."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """float32 Tensor[B] on the images' device (NaN for an image holding a non-finite value)."""
        check_images(images, prompts, self.name)
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels, _ = to_uint8(images[start : start + self.batch_size])
            inputs = self.processor(images=pixels, return_tensors="pt")["pixel_values"].to(self.device)
            logits = self.model(pixel_values=inputs.to(self.model.dtype)).logits.float()
            out.append(logits.softmax(-1)[:, self.index] if self.output == "prob" else logits[:, self.index])
        scores = torch.cat(out) if out else torch.zeros(0)
        return _nan_where(scores.float().to(images.device), torch.isfinite(images.flatten(1)).all(dim=1))


@REWARDS.register("cafe")
def _build_cafe(
    *, name_or_path: str = "cafeai/cafe_aesthetic", label: str = "aesthetic", output: str = "prob",
    batch_size: int = 32, device: str | torch.device = "auto", name: str = "cafe",
) -> ImageReward:  # fmt: skip
    """cafe_aesthetic's probability (or logit) of "aesthetic"."""
    return CafeReward(name_or_path, label=label, output=output, batch_size=batch_size, device=device, name=name)

"""Image rewards of the diffusion family: a registry of scorers of (image, prompt) batches, higher is better.

An `ImageReward` has a `name` and is called as `reward(images, prompts)`: images float32 Tensor[B, 3, H, W] in
[0, 1] (what a diffusers pipeline returns with `output_type="pt"`), prompts B strings; it returns float32
Tensor[B] on the images' device. Non-finite values are NOT filtered here (an image holding NaN scores NaN): the
trainer's `RewardSet` check stops the run on them.

`build_reward(name, cfg, device=...)` builds one from the registry `REWARDS` (an unknown name lists the valid
ones); `build_reward_set(cfg, device=...)` builds a run's objectives and scalarisation as the shared `RewardSet`
(rl/text/rewards.py, re-exported by rl/runtime.py), whose `(samples, responses)` call takes `(images, prompts)`.

Embedded rewards (offline, the default task):
- `colourfulness`: Hasler & Süsstrunk (2003), "Measuring colourfulness in natural images", a rule on 0..255 RGB:
  rg = R − G, yb = ½(R + G) − B, M = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²), per image (population σ over
  the pixels). A grey image scores 0, a uniform red one 0.3·|(255, 127.5)| = 85.5.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from soups.registry import Registry
from soups.utils import SoupsError

__all__ = [
    "REWARDS",
    "ColourfulnessReward",
    "ImageReward",
    "build_reward",
    "build_reward_set",
    "check_images",
    "colourfulness",
    "resolve_device",
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
            name when `name` is a custom objective name, e.g. name=ava_l14, type=ava).
        device: Where a model reward runs (`auto` = CUDA when present); rule rewards run where the images are.

    Raises:
        UnknownNameError: The type is not registered (the message lists the valid names).
        SoupsError: An option the builder does not take (the valid ones are listed).
    """
    options = dict(_to_container(cfg or {}))
    kind = str(options.pop("type", name))
    options.pop("name", None)
    builder = REWARDS.get(kind)
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("device", "name")]
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

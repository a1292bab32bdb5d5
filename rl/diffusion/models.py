"""The diffusion family's models: the tiny Stable-Diffusion-layout pipeline built from configs, and loading.

`build_tiny_pipeline` builds, from configs only (nothing downloads), a `StableDiffusionPipeline` whose every
component is the real diffusers/transformers class that Stable Diffusion 1.5 uses:

- `UNet2DConditionModel`, 16×16 latents, (32, 64) cross-attention blocks, one layer per block (about 1M params);
- `CLIPTextModel` (2 layers, width 32) with a `CLIPTokenizer` whose BPE vocabulary and merges are built offline
  from the embedded captions' words (each word is one token);
- `AutoencoderKL` with a single block, so its scale factor is 1 (latents are 4×16×16 for 16×16 images);
- `DDIMScheduler` with Stable Diffusion's betas.

It is saved with `save_pretrained`, so every later step loads it with `DiffusionPipeline.from_pretrained`, the
code path that `stable-diffusion-v1-5/stable-diffusion-v1-5` takes.

Also here: `ensure_init` (the shared init: the tiny pipeline pre-trained on the scenes, cached, with its check
`init_check.json` / `init_samples.png`; settings `INIT_DEFAULTS`, `INIT_SMOKE`), `load_pipeline` (any diffusers
pipeline), `add_trainable` (`lora` | `difffit`) and `save_expert` (the expert in diffusers format plus
`soups_expert.json`), and the denoising loss pieces (`encode_prompts`, `denoising_loss`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soups.registry import Registry
from soups.utils import SoupsError

__all__ = [
    "DIFFFIT_GAMMA",
    "INIT_DEFAULTS",
    "INIT_FILES",
    "INIT_SMOKE",
    "LORA_TARGETS",
    "TRAINABLES",
    "add_trainable",
    "build_tiny_pipeline",
    "check_init",
    "colour_accuracy",
    "denoising_loss",
    "difffit_targets",
    "encode_prompts",
    "ensure_init",
    "fold_difffit",
    "init_settings",
    "load_pipeline",
    "prompt_colours",
    "save_expert",
    "scene_colours",
    "tiny_tokenizer",
    "tokenizer_vocab_merges",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tokenizer_vocab_merges(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list under which each of `words` is exactly one token.

    CLIP's BPE splits a word into characters, the last one suffixed with `</w>`, then applies merges by rank.
    Merging left to right (r e -> re, re d</w> -> red</w>) and keeping every intermediate in the vocabulary makes
    each word one token whatever order the merges of different words fire in; any other word falls back to its
    characters, which are all in the vocabulary.

    Returns:
        (vocab: token -> id, with BOS and EOS last, merges: ordered pairs).
    """
    chars = sorted({c for w in words for c in w})
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            if parts[0] not in tokens:
                tokens.append(parts[0])
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def tiny_tokenizer(words: Sequence[str], max_length: int = 16) -> Any:
    """A `CLIPTokenizer` for `words`, built offline (see `tokenizer_vocab_merges`).

    Args:
        words: The words that must be single tokens.
        max_length: `model_max_length`; the pipeline pads/truncates prompts to it (it must be set, or the
            pipeline's default of 1e30 overflows).
    """
    import json
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab_merges(words)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length,
                             bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)  # fmt: skip


def build_tiny_pipeline(
    words: Sequence[str],
    *,
    seed: int = 0,
    image_size: int = 16,
    block_out_channels: Sequence[int] = (32, 64),
    text_width: int = 32,
    max_length: int = 16,
    vae_width: int = 32,
    vae_attention: bool = True,
    attention_heads: int = 8,
    full_resolution_attention: bool = True,
) -> Any:
    """The tiny text-to-image pipeline, randomly initialised from `seed` (see the module docstring).

    Args:
        words: The tokenizer's words (e.g. `rl.diffusion.task.vocabulary()`).
        seed: Seeds every component's initialisation.
        image_size: Image side in pixels (= latent side: the VAE has scale factor 1).
        block_out_channels: The UNet's block widths.
        text_width: The text encoder's hidden size (= the UNet's cross-attention dim).
        max_length: The tokenizer's and text encoder's maximum length.
        vae_width: The VAE's channels (its one block's width).
        vae_attention: Whether the VAE's mid blocks have self-attention (Stable Diffusion's do; the 16×16 scenes
            need none, and it is a sixth of a VAE step's cost).
        attention_heads: The UNet's attention heads per block (diffusers' `attention_head_dim`, which is, for
            this UNet, the number of heads).
        full_resolution_attention: Whether the outermost UNet blocks (at the image's resolution) have
            transformer (self- and cross-attention) layers; without, they are plain ResNet blocks
            (`DownBlock2D`/`UpBlock2D`) and only the lower resolutions attend, three times cheaper to train.

    Returns:
        A `StableDiffusionPipeline` on CPU in float32, without safety checker.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(words, max_length)
    down = ["CrossAttnDownBlock2D"] * len(block_out_channels)
    if not full_resolution_attention:
        down[0] = "DownBlock2D"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=tuple(reversed([kind.replace("Down", "Up") for kind in down])),
        cross_attention_dim=text_width,
        attention_head_dim=attention_heads,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(vae_width,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        mid_block_add_attention=vae_attention,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Loading any diffusers pipeline
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_loading(progress: bool) -> Iterator[None]:
    """diffusers' and transformers' weight loading/saving bars off unless `progress` and stderr is a terminal."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    quiet = not (progress and sys.stderr.isatty())
    was = {log: log.is_progress_bar_enabled() for log in (dlog, tlog)}
    if quiet:
        for log in was:
            log.disable_progress_bar()
    try:
        yield
    finally:
        for log, enabled in was.items():
            if quiet and enabled:
                log.enable_progress_bar()


def load_pipeline(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Any:  # fmt: skip
    """Any diffusers pipeline (a Hub id or a local directory) through `DiffusionPipeline.from_pretrained`.

    The same call loads the embedded init and `stable-diffusion-v1-5/stable-diffusion-v1-5`: no remote code,
    the safety checker is not loaded (where the pipeline has one), and the progress bar is drawn only when
    `progress` is set and stderr is a terminal.

    Args:
        name_or_path: A Hub id or a directory holding `model_index.json`.
        device: Where the pipeline goes.
        dtype: The components' floating dtype.
        progress: Allow the denoising progress bar.

    Returns:
        The pipeline (e.g. a `StableDiffusionPipeline`), in eval mode.

    Raises:
        SoupsError: the pipeline cannot be read (named, with the reason on the same line).
    """
    from diffusers import DiffusionPipeline

    from soups.cli import bar_disabled

    name = str(name_or_path)
    with _quiet_loading(progress):
        try:
            index = DiffusionPipeline.load_config(name)
            extra: dict[str, Any] = {}
            if "safety_checker" in index:
                extra = {"safety_checker": None, "requires_safety_checker": False}
            pipe = DiffusionPipeline.from_pretrained(name, dtype=dtype, trust_remote_code=False, **extra)
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = " ".join(str(err).split())[:300]
            raise SoupsError(f"cannot load the diffusers pipeline {name}: {reason}") from err
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=bar_disabled(progress))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


# ----------------------------------------------------------------------------------------------------------
# What is trained: LoRA or DiffFit
# ----------------------------------------------------------------------------------------------------------

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet attention projections a `lora` expert adapts (self- and cross-attention)."""

DIFFFIT_GAMMA = "difffit_gamma"
"""The name of DiffFit's scale factors, registered on the layer they scale (`<layer>.difffit_gamma`)."""

TRAINABLES = Registry[str]("trainable")
TRAINABLES.add("lora", "peft LoRA on the UNet attention projections (to_q, to_k, to_v, to_out.0)")
TRAINABLES.add("difffit", "DiffFit: biases, norm affine parameters and per-channel scale factors γ")


def difffit_targets(unet: torch.nn.Module) -> list[str]:
    """The layers DiffFit's scale factors γ multiply: the last layer of every residual branch of the UNet.

    That is each `ResnetBlock2D`'s `conv2`, each `Transformer2DModel`'s `proj_out`, each `Attention`'s `to_out.0`
    (self- and cross-attention) and each `FeedForward`'s last `Linear`: the diffusers counterparts of the
    attention and MLP outputs that DiffFit (Xie et al. 2023) scales in a DiT block.

    Returns:
        Module names, in `named_modules` order.
    """
    names = []
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if kind == "ResnetBlock2D":
            names.append(f"{name}.conv2")
        elif kind == "Transformer2DModel":
            names.append(f"{name}.proj_out")
        elif kind == "Attention":
            names.append(f"{name}.to_out.0")
        elif kind == "FeedForward":
            last = [i for i, m in enumerate(module.net) if isinstance(m, torch.nn.Linear)][-1]
            names.append(f"{name}.net.{last}")
    return names


def _scale_by_gamma(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the layer's output times its per-channel γ (channels last for Linear, dim 1 for Conv2d)."""
    gamma = getattr(module, DIFFFIT_GAMMA)
    if isinstance(module, torch.nn.Conv2d):
        return output * gamma.view(1, -1, 1, 1).to(output.dtype)
    return output * gamma.to(output.dtype)


def add_trainable(
    unet: torch.nn.Module,
    trainable: str,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    target_modules: Sequence[str] = LORA_TARGETS,
) -> list[str]:
    """Freezes the UNet and makes the `trainable` part of it trainable, in place.

    - `lora`: `unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=...))` (peft; B = 0, so the
      output is unchanged until trained); the effective weight of a target is W0 + (alpha / rank)·B·A.
    - `difffit`: every bias, every GroupNorm/LayerNorm affine parameter, and a per-output-channel scale factor γ
      (ones, so the output is unchanged) on each layer of `difffit_targets`, registered as the parameter
      `<layer>.difffit_gamma` and applied by a forward hook. `fold_difffit` folds γ into the layer's weight and
      bias (exact: γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b). Under 10% of the parameters: 0.06% of SD 1.5's UNet
      (513,924 of 859,520,964), 1.2% of the tiny one (13,156 of 1,055,044).

    Args:
        unet: A diffusers `UNet2DConditionModel` (any module with the same layer types).
        trainable: `lora` or `difffit`.
        rank: LoRA rank (lora only).
        alpha: LoRA alpha (lora only).
        target_modules: LoRA target module names (lora only).

    Returns:
        The names of the trainable parameters (as `unet.named_parameters()` gives them).

    Raises:
        UnknownNameError: `trainable` is not a valid name (the message lists the valid ones).
        SoupsError: a bad rank/alpha, or the UNet already has trainables added.
    """
    TRAINABLES.get(trainable)
    if any(DIFFFIT_GAMMA in n or "lora_" in n for n, _ in unet.named_parameters()):
        raise SoupsError("add_trainable: this UNet already has LoRA or DiffFit parameters")
    unet.requires_grad_(False)
    if trainable == "lora":
        if int(rank) < 1 or not float(alpha) > 0:
            raise SoupsError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        from peft import LoraConfig

        config = LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                            target_modules=list(target_modules))  # fmt: skip
        unet.add_adapter(config)
        return [n for n, p in unet.named_parameters() if p.requires_grad]
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            names += [f"{name}.{k}" for k, p in module.named_parameters(recurse=False) if p is not None]
    names += [n for n, _ in unet.named_parameters() if n.endswith(".bias")]
    modules = dict(unet.named_modules())
    for name in difffit_targets(unet):
        layer = modules[name]
        channels = layer.out_channels if isinstance(layer, torch.nn.Conv2d) else layer.out_features
        weight = layer.weight
        layer.register_parameter(DIFFFIT_GAMMA, torch.nn.Parameter(torch.ones(channels, dtype=weight.dtype,
                                                                              device=weight.device)))  # fmt: skip
        layer.register_forward_hook(_scale_by_gamma)
        names.append(f"{name}.{DIFFFIT_GAMMA}")
    params = dict(unet.named_parameters())
    names = list(dict.fromkeys(names))
    for name in names:
        params[name].requires_grad_(True)
    return [n for n, p in unet.named_parameters() if p.requires_grad]


def fold_difffit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiffFit UNet's state dict with every `<layer>.difffit_gamma` folded into `<layer>.weight`/`.bias`.

    The result has exactly the plain diffusers UNet's names, so it loads with `UNet2DConditionModel` and two
    DiffFit experts average as plain weights. Exact: the layer computes γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b.

    Args:
        state: name -> tensor, e.g. `unet.state_dict()` after `add_trainable(unet, "difffit")`.

    Returns:
        A new dict (tensors not touched by a γ are the same objects).
    """
    out = {k: v for k, v in state.items() if not k.endswith("." + DIFFFIT_GAMMA)}
    for key, gamma in state.items():
        if not key.endswith("." + DIFFFIT_GAMMA):
            continue
        layer = key[: -len(DIFFFIT_GAMMA) - 1]
        weight = out[f"{layer}.weight"]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        out[f"{layer}.weight"] = weight * gamma.to(weight.dtype).view(shape)
        if f"{layer}.bias" in out:
            out[f"{layer}.bias"] = out[f"{layer}.bias"] * gamma.to(weight.dtype)
    return out


def _check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SoupsError(f"{what}: tensor {name} has non-finite values; refusing to save it")


def save_expert(
    unet: torch.nn.Module, directory: str | Path, trainable: str, base: str, *, overwrite: bool = False
) -> Path:
    """Saves a fine-tuned UNet's expert in the standard diffusers format, atomically.

    - `lora`: `directory/pytorch_lora_weights.safetensors`, written by `StableDiffusionPipeline.save_lora_weights`
      from `get_peft_model_state_dict(unet)` with the LoRA config as adapter metadata, so
      `pipe.load_lora_weights(directory)` reproduces the scale alpha / rank;
    - `difffit`: a full diffusers UNet, `directory/unet/config.json` + `diffusion_pytorch_model.safetensors`, with
      γ folded into the weights (`fold_difffit`), which `UNet2DConditionModel.from_pretrained(directory,
      subfolder="unet")` loads; a soup of DiffFit experts is the plain average of these weights;
    - both: `directory/soups_expert.json` = {"kind": "diffusers_lora" | "diffusers_unet", "base": `base`,
      "trainable": ..., and "rank", "alpha", "target_modules" for LoRA}.

    Args:
        unet: The UNet after `add_trainable(unet, trainable, ...)` and training.
        directory: The expert directory (published atomically: it appears complete or not at all).
        trainable: `lora` or `difffit`, as given to `add_trainable`.
        base: The base pipeline (Hub id or path) the expert was trained from.
        overwrite: Replace an existing expert directory written by Soups.

    Returns:
        `directory`.

    Raises:
        SoupsError: a non-finite weight (named), a UNet without the named trainables, or `directory` exists.
    """
    from soups.utils import atomic_dir, write_json

    TRAINABLES.get(trainable)
    info: dict[str, Any] = {"base": str(base), "trainable": trainable}
    directory = Path(directory)
    if trainable == "lora":
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        config = getattr(unet, "peft_config", {}).get("default")
        if config is None:
            raise SoupsError("save_expert: the UNet has no LoRA adapter (call add_trainable(unet, 'lora') first)")
        layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        _check_finite(layers, f"LoRA expert {directory}")
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
        info.update(kind="diffusers_lora", rank=int(config.r), alpha=float(config.lora_alpha),
                    target_modules=sorted(config.target_modules))  # fmt: skip
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers,
                                                      unet_lora_adapter_metadata=metadata)  # fmt: skip
            write_json(tmp / "soups_expert.json", info)
        return directory
    state = unet.state_dict()
    if not any(k.endswith("." + DIFFFIT_GAMMA) for k in state):
        raise SoupsError("save_expert: the UNet has no DiffFit scale factors (call add_trainable(unet, 'difffit'))")
    folded = {k: v.detach().cpu().contiguous() for k, v in fold_difffit(state).items()}
    _check_finite(folded, f"DiffFit expert {directory}")
    info.update(kind="diffusers_unet")
    from safetensors.torch import save_file

    with atomic_dir(directory, overwrite=overwrite) as tmp:
        unet.save_config(tmp / "unet")  # what save_pretrained writes: config.json + the unsharded safetensors
        save_file(folded, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "soups_expert.json", info)
    return directory


# ----------------------------------------------------------------------------------------------------------
# Denoising loss (shared by the init and by anyone fine-tuning a text-to-image UNet)
# ----------------------------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, text_encoder: torch.nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """The text conditioning `StableDiffusionPipeline` computes for `prompts` (without guidance).

    Pads/truncates to `tokenizer.model_max_length` and takes the encoder's last hidden state, without attention
    mask unless the encoder's config asks for one (as `StableDiffusionPipeline.encode_prompt` does).

    Returns:
        float [B, T, D], on the text encoder's device.
    """
    device = next(text_encoder.parameters()).device
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")  # fmt: skip
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def denoising_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    generator: torch.Generator | None = None,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """The ε-prediction denoising loss per sample: ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, c)‖² averaged over pixels.

    Args:
        unet: The UNet (ε-prediction).
        noise_scheduler: A DDPM-type scheduler with `add_noise` and `config.num_train_timesteps`.
        latents: Clean latents x0, float [B, C, h, w] (already times the VAE's scaling factor).
        text_states: The conditioning, float [B, T, D] (`encode_prompts`).
        generator: Draws t ~ U{0, …, T−1} and ε (on the CPU, then moved), for reproducibility.
        offset_noise: ε gets `offset_noise` × a per-(sample, channel) constant N(0, 1) (offset noise, Guttenberg
            2023): the model must then learn each image's mean colour from the prompt, which plain white noise
            barely trains (the mean is 1 of the C·h·w directions of ε). 0 is the plain DDPM loss.

    Returns:
        float [B], the per-sample loss (weight it, then average).
    """
    batch = latents.shape[0]
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(batch, latents.shape[1], 1, 1, generator=generator)
    noise = noise.to(latents)
    t = t.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=text_states).sample
    return (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------
# The shared init of the embedded task
# ----------------------------------------------------------------------------------------------------------

INIT_DEFAULTS: dict[str, Any] = {
    # seeds the components' initialisation, the training scenes, the noise and the check's sampling
    "seed": 0,
    # the tiny pipeline's shape (build_tiny_pipeline)
    "image_size": 16,
    "block_out_channels": [32, 64],
    "text_width": 32,
    "vae_width": 16,
    "vae_attention": False,
    "attention_heads": 2,
    "full_resolution_attention": False,
    # (a) the VAE, trained as an autoencoder on fresh scenes: steps, batch, learning rate, KL weight
    "vae_steps": 300,
    "vae_batch": 32,
    "vae_lr": 3e-3,
    "vae_kl": 1e-6,
    # (b) UNet + text encoder on the denoising loss: steps, batch, peak learning rate (warm-up then cosine to
    # 10%), and the fraction of captions replaced by "" so classifier-free guidance works
    "unet_steps": 800,
    "unet_batch": 32,
    "unet_lr": 2e-3,
    "caption_dropout": 0.1,
    "offset_noise": 0.1,  # see denoising_loss
    # (c) the check: held-out prompts (scene_prompts from check_seed), DDIM steps and guidance scale
    "check_prompts": 32,
    "check_seed": 7_919,
    "check_steps": 20,
    "guidance_scale": 3.0,
}
"""The full init's settings (the quickstart's): about 4 minutes on 2 CPU cores."""

INIT_SMOKE: dict[str, Any] = {
    **INIT_DEFAULTS,
    "vae_steps": 10,
    "vae_batch": 8,
    "unet_steps": 10,
    "unet_batch": 8,
    "check_prompts": 4,
    "check_steps": 2,
}
"""The smoke init's settings: seconds, for tests and `experiment=smoke` (its images are not recognisable)."""

INIT_FILES = ("init_settings.json", "init_check.json", "init_samples.png")
"""What `ensure_init` writes beside the pipeline: settings and losses, the check's numbers, the contact sheet."""


def init_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` completed with `INIT_DEFAULTS` and checked (a `rebuild` key is ignored here).

    Raises:
        SoupsError: an unknown key (the valid ones are listed) or a value of the wrong type.
    """
    given = {k: v for k, v in dict(settings).items() if k != "rebuild"}
    unknown = sorted(set(given) - set(INIT_DEFAULTS))
    if unknown:
        raise SoupsError(f"unknown init setting(s) {', '.join(unknown)}; valid: {', '.join(INIT_DEFAULTS)}")
    out = {**INIT_DEFAULTS, **given}
    for key, default in INIT_DEFAULTS.items():
        value = out[key]
        if isinstance(default, list):
            ok = isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            value = [int(v) for v in value] if ok else value
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        if not ok:
            raise SoupsError(f"init setting {key}={value!r} must be a {type(default).__name__}")
        out[key] = value
    if not 0 <= out["caption_dropout"] < 1:
        raise SoupsError(f"init setting caption_dropout={out['caption_dropout']} must be in [0, 1)")
    return out


def _scene_batch(n: int, seed: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Fresh scenes: images float [n, 3, size, size] in [-1, 1] and their captions."""
    from rl.diffusion.task import generate_scenes

    scenes = generate_scenes(n, seed=seed, size=size)
    images = torch.from_numpy(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s["prompt"] for s in scenes]


def _lr_lambda(total: int) -> Any:
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _train_vae(vae: torch.nn.Module, s: Mapping[str, Any], device: torch.device, progress: bool) -> list[float]:
    """(a): MSE reconstruction + `vae_kl` × KL on fresh scenes (scene seeds 10⁶ + step)."""
    from rl.runtime import progress as bar

    opt = torch.optim.AdamW(vae.parameters(), lr=s["vae_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s["vae_steps"]))
    gen = torch.Generator().manual_seed(s["seed"] + 1)
    losses = []
    vae.train()
    for step in bar(0, s["vae_steps"], desc="init: VAE", enabled=progress):
        images, _ = _scene_batch(s["vae_batch"], 1_000_000 + step, s["image_size"])
        images = images.to(device)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(latents).sample
        loss = (recon - images).pow(2).mean() + s["vae_kl"] * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    vae.eval()
    return losses


def _train_denoiser(pipe: Any, s: Mapping[str, Any], device: torch.device, progress: bool) -> list[float]:
    """(b): UNet + text encoder on the ε-prediction loss under the pipeline's DDPM noise schedule, captions
    dropped to "" with probability `caption_dropout` (scene seeds 2·10⁶ + step)."""
    from diffusers import DDPMScheduler

    from rl.runtime import progress as bar

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s["unet_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s["unet_steps"]))
    gen = torch.Generator().manual_seed(s["seed"] + 2)
    scaling = pipe.vae.config.scaling_factor
    losses = []
    pipe.unet.train()
    pipe.text_encoder.train()
    for step in bar(0, s["unet_steps"], desc="init: UNet", enabled=progress):
        images, prompts = _scene_batch(s["unet_batch"], 2_000_000 + step, s["image_size"])
        drop = torch.rand(len(prompts), generator=gen) < s["caption_dropout"]
        prompts = ["" if d else p for d, p in zip(drop.tolist(), prompts, strict=True)]
        with torch.no_grad():
            posterior = pipe.vae.encode(images.to(device)).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=gen).to(device)
            latents = (posterior.mean + posterior.std * noise) * scaling
        text = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
        loss = denoising_loss(pipe.unet, noise_scheduler, latents, text, generator=gen,
                              offset_noise=s["offset_noise"]).mean()  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return losses


def scene_colours(images: np.ndarray) -> tuple[list[str], list[str]]:
    """The shape colour and the background colour a scene image shows, as palette names.

    Background: the palette colour nearest to the median of the border pixels (the one-pixel frame). Shape: the
    palette colour, other than the background, that most of the central pixels (the middle half of each side)
    are nearest to; the background's own colour when none is.

    Args:
        images: uint8 [B, H, W, 3].

    Returns:
        (shape colours, background colours), B names each (keys of `rl.diffusion.task.COLOURS`).
    """
    from rl.diffusion.task import COLOURS

    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)  # [K, 3]
    images = np.asarray(images, dtype=np.float64)
    _, height, width, _ = images.shape
    nearest = ((images[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # [B, H, W]
    shapes, backgrounds = [], []
    for image, near in zip(images, nearest, strict=True):
        border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
        bg = int(((np.median(border, axis=0) - palette) ** 2).sum(-1).argmin())
        centre = near[height // 4 : height - height // 4, width // 4 : width - width // 4].ravel()
        counts = np.bincount(centre, minlength=len(names))
        counts[bg] = 0
        shapes.append(names[int(counts.argmax())] if counts.any() else names[bg])
        backgrounds.append(names[bg])
    return shapes, backgrounds


def prompt_colours(prompt: str) -> tuple[str, str]:
    """(shape colour, background colour) of a prompt "a <colour> <shape> on a <background> background"."""
    words = prompt.split()
    return words[1], words[-2]


def colour_accuracy(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Fractions of images whose shape colour / background colour (`scene_colours`) are the prompt's.

    Returns:
        {"shape_colour": float, "background": float, "both": float}.
    """
    shapes, backgrounds = scene_colours(images)
    want = [prompt_colours(p) for p in prompts]
    shape_ok = np.array([s == w[0] for s, w in zip(shapes, want, strict=True)])
    bg_ok = np.array([b == w[1] for b, w in zip(backgrounds, want, strict=True)])
    return {"shape_colour": float(shape_ok.mean()), "background": float(bg_ok.mean()),
            "both": float((shape_ok & bg_ok).mean())}  # fmt: skip


def _generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float) -> np.ndarray:
    """uint8 [B, H, W, 3]: one image per (prompt, seed), DDIM `steps`, guidance `guidance` (batched by 32)."""
    out = []
    for start in range(0, len(prompts), 32):
        chunk, chunk_seeds = list(prompts[start : start + 32]), list(seeds[start : start + 32])
        gens = [torch.Generator().manual_seed(int(s)) for s in chunk_seeds]
        with torch.no_grad():
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                          output_type="np").images  # fmt: skip
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def check_init(pipe: Any, s: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """Is the init recognisable? Generates the held-out prompts, scores their colours, writes the contact sheet.

    Writes `directory/init_check.json` (the numbers, beside the same classifier's accuracy on the true scenes,
    its ceiling, and chance) and `directory/init_samples.png` (rows: the first 8 prompts; columns: the true scene,
    then 4 samples from seeds `check_seed` + i).

    Returns:
        The check's numbers.
    """
    from rl.diffusion.sheet import save_contact_sheet
    from rl.diffusion.task import generate_scenes
    from soups.utils import write_json

    t0, c0 = time.perf_counter(), time.process_time()
    scenes = generate_scenes(s["check_prompts"], seed=s["check_seed"], size=s["image_size"])
    prompts = [sc["prompt"] for sc in scenes]
    seeds = [s["check_seed"] + i for i in range(len(prompts))]
    images = _generate(pipe, prompts, seeds, s["check_steps"], s["guidance_scale"])
    unguided = _generate(pipe, prompts, seeds, s["check_steps"], 1.0)
    check = {
        "prompts": len(prompts),
        "prompt_seed": s["check_seed"],
        "ddim_steps": s["check_steps"],
        "guidance_scale": s["guidance_scale"],
        "accuracy": colour_accuracy(images, prompts),
        "accuracy_without_guidance": colour_accuracy(unguided, prompts),
        "accuracy_of_true_scenes": colour_accuracy(np.stack([sc["image"] for sc in scenes]), prompts),
        "chance": {"shape_colour": 0.1, "background": 0.1, "both": 0.01},
        "per_prompt": [],
    }
    shapes, backgrounds = scene_colours(images)
    for prompt, shape, background in zip(prompts, shapes, backgrounds, strict=True):
        check["per_prompt"].append({"prompt": prompt, "shape_colour": shape, "background": background})
    rows = min(8, len(prompts))
    extra_prompts = [p for p in prompts[:rows] for _ in range(3)]
    extra_seeds = [s["check_seed"] + 10_000 + 3 * i + j for i in range(rows) for j in range(3)]
    extra = _generate(pipe, extra_prompts, extra_seeds, s["check_steps"], s["guidance_scale"])
    grid = np.stack([np.stack([scenes[i]["image"], images[i], *extra[3 * i : 3 * i + 3]]) for i in range(rows)])
    labels = ["{1} {2}\non {5}".format(*p.split()) for p in prompts[:rows]]  # "red circle\non blue"
    save_contact_sheet(directory / "init_samples.png", grid, labels,
                       ["true scene", "sample 1", "sample 2", "sample 3", "sample 4"],
                       title=f"init: DDIM {s['check_steps']} steps, guidance {s['guidance_scale']}")  # fmt: skip
    check["seconds"] = round(time.perf_counter() - t0, 1)
    check["cpu_seconds"] = round(time.process_time() - c0, 1)
    write_json(directory / "init_check.json", check)
    return check


def ensure_init(
    directory: str | Path,
    settings: Mapping[str, Any],
    *,
    rebuild: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Path:
    """The embedded task's shared init: the tiny pipeline pre-trained on the scenes, built once and cached.

    Steps: (a) the single-block VAE trained briefly as an autoencoder (MSE + `vae_kl`·KL), then
    `vae.config.scaling_factor` = 1 / std of its latents; (b) UNet + text encoder on the ε-prediction loss under
    the pipeline's DDPM noise schedule, with `caption_dropout` of the captions replaced by "" (for classifier-free
    guidance); (c) `save_pretrained` into `directory`, with `init_settings.json` (the settings, losses, seconds),
    and `check_init`'s `init_check.json` and `init_samples.png`. Published atomically.

    An existing `directory` built with the same settings is reused as it is; one built with other settings is
    refused, or rebuilt when `rebuild` (or `settings["rebuild"]`) is true.

    Args:
        directory: The init directory (a diffusers pipeline dir, loaded by `load_pipeline`).
        settings: Keys of `INIT_DEFAULTS` (missing ones take the defaults), e.g. `INIT_SMOKE`.
        rebuild: Replace an init built with other settings instead of refusing it.
        device: Where to train.
        progress: Progress bars (on a terminal only).

    Returns:
        `directory`, absolute.

    Raises:
        SoupsError: bad settings, or `directory` holds an init built with other settings (and no rebuild), or
            something else that is not an init.
    """
    from soups.utils import atomic_dir, seed_everything, write_json

    rebuild = bool(rebuild or dict(settings).get("rebuild", False))
    s = init_settings(settings)
    target = Path(directory).absolute()
    info = target / "init_settings.json"
    if info.is_file():
        try:
            built = json.loads(info.read_text()).get("settings")
        except (OSError, ValueError) as err:
            raise SoupsError(f"the diffusion init {target} has an unreadable init_settings.json: {err}") from err
        if built == s:
            return target
        if not rebuild:
            diff = {k: (built.get(k) if isinstance(built, dict) else None, v) for k, v in s.items()
                    if not isinstance(built, dict) or built.get(k) != v}  # fmt: skip
            raise SoupsError(f"the diffusion init {target} was built with other settings (built, asked: {diff}); "
                             "remove it, rebuild it (init.rebuild=true), or use another directory")  # fmt: skip
    elif target.exists() and any(target.iterdir()) and not rebuild:
        raise SoupsError(f"{target} exists and is not a diffusion init (no init_settings.json)")
    from rl.diffusion.task import vocabulary

    device = torch.device(device)
    seed_everything(s["seed"])
    pipe = build_tiny_pipeline(vocabulary(), seed=s["seed"], image_size=s["image_size"],
                               block_out_channels=s["block_out_channels"], text_width=s["text_width"],
                               vae_width=s["vae_width"], vae_attention=s["vae_attention"],
                               attention_heads=s["attention_heads"],
                               full_resolution_attention=s["full_resolution_attention"])  # fmt: skip
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    t0, c0 = time.perf_counter(), time.process_time()
    vae_losses = _train_vae(pipe.vae, s, device, progress)
    with torch.no_grad():
        images, _ = _scene_batch(256, 3_000_000, s["image_size"])
        latents = pipe.vae.encode(images.to(device)).latent_dist.mean
        recon_mse = float((pipe.vae.decode(latents).sample - images.to(device)).pow(2).mean())
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    t1, c1 = time.perf_counter(), time.process_time()
    unet_losses = _train_denoiser(pipe, s, device, progress)
    t2, c2 = time.perf_counter(), time.process_time()
    for name in ("unet", "vae", "text_encoder"):
        bad = [k for k, v in getattr(pipe, name).state_dict().items() if v.is_floating_point()
               and not bool(torch.isfinite(v).all())]  # fmt: skip
        if bad:
            raise SoupsError(f"the diffusion init's {name} has non-finite weights ({bad[0]}); not saved")
    try:
        with atomic_dir(target, overwrite=rebuild) as tmp:
            with _quiet_loading(progress):
                pipe.save_pretrained(tmp, safe_serialization=True)
            check = check_init(pipe, s, tmp)
            every = max(1, len(unet_losses) // 50)
            write_json(tmp / "init_settings.json", {
                "settings": s,
                "seconds": {"vae": round(t1 - t0, 1), "unet": round(t2 - t1, 1), "check": check["seconds"]},
                "cpu_seconds": {"vae": round(c1 - c0, 1), "unet": round(c2 - c1, 1),
                                "check": check["cpu_seconds"]},
                "vae": {"final_loss": vae_losses[-1] if vae_losses else None, "recon_mse": recon_mse,
                        "scaling_factor": pipe.vae.config.scaling_factor},
                "unet": {"final_loss": float(np.mean(unet_losses[-20:])) if unet_losses else None,
                         "loss_curve": unet_losses[::every]},
                "accuracy": check["accuracy"],
            })  # fmt: skip
    except SoupsError:
        if not info.is_file():  # another run published the same build first: that one is as good
            raise
        if json.loads(info.read_text()).get("settings") != s:
            raise
    return target

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
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soups.registry import Registry
from soups.utils import SoupsError

__all__ = [
    "DIFFFIT_GAMMA",
    "LORA_TARGETS",
    "TRAINABLES",
    "add_trainable",
    "build_tiny_pipeline",
    "difffit_targets",
    "fold_difffit",
    "load_pipeline",
    "save_expert",
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
) -> Any:
    """The tiny text-to-image pipeline, randomly initialised from `seed` (see the module docstring).

    Args:
        words: The tokenizer's words (e.g. `rl.diffusion.task.vocabulary()`).
        seed: Seeds every component's initialisation.
        image_size: Image side in pixels (= latent side: the VAE has scale factor 1).
        block_out_channels: The UNet's block widths.
        text_width: The text encoder's hidden size (= the UNet's cross-attention dim).
        max_length: The tokenizer's and text encoder's maximum length.

    Returns:
        A `StableDiffusionPipeline` on CPU in float32, without safety checker.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(words, max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * len(block_out_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(block_out_channels),
        cross_attention_dim=text_width,
        attention_head_dim=8,
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
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
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
    """diffusers' and transformers' weight-loading bars off unless `progress` and stderr is a terminal."""
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

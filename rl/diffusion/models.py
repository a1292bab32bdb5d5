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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_tiny_pipeline", "tiny_tokenizer", "tokenizer_vocab_merges"]

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

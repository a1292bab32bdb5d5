"""Captioning models: the embedded tiny VisionEncoderDecoder (built offline from configs) and any HF image-to-text
model with `generate`, plus the few tensor helpers SCST and cross-entropy training need.

The tiny model is a `VisionEncoderDecoderModel`: a ViT encoder (the scenes: 63×63 images in 3×3 patches of 21×21, one
per grid cell) and a GPT-2 decoder with cross-attention, over a word-level tokenizer of the scene vocabulary
(`rl.captioning.task.scene_words`), saved with its image processor so `VisionEncoderDecoderModel.from_pretrained(dir)`
plus `AutoImageProcessor`/`AutoTokenizer` load it like any Hub captioner (e.g. `nlpconnect/vit-gpt2-image-captioning`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.captioning.task import scene_words
from soups.utils import SoupsError

__all__ = [
    "CaptionModel",
    "build_scene_tokenizer",
    "build_tiny_captioner",
    "caption_logprobs",
    "decode_captions",
    "load_captioner",
    "model_kwargs",
    "sequence_mask",
    "tiny_image_processor",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


def build_scene_tokenizer() -> Any:
    """Word-level tokenizer over the scene vocabulary (pad, unk, bos, eos first), right padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *scene_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                        eos_token=EOS, padding_side="right")  # fmt: skip
    tokenizer.model_max_length = 64
    return tokenizer


def build_tiny_captioner(
    tokenizer: Any, *, image_size: int = 64, patch_size: int = 8, hidden_size: int = 64, encoder_layers: int = 2,
    decoder_layers: int = 2, heads: int = 4, max_length: int = 32,
) -> Any:  # fmt: skip
    """A randomly initialised ViT + GPT-2 `VisionEncoderDecoderModel` (seeded by the caller)."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    encoder = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                        num_hidden_layers=encoder_layers, num_attention_heads=heads, intermediate_size=2 * hidden_size)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=decoder_layers, n_head=heads,
                         n_positions=max_length + 2, add_cross_attention=True, is_decoder=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_image_processor(image_size: int = 64) -> Any:
    """A ViT image processor for the scenes: no resize needed, pixels scaled to [-1, 1]."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size}, do_normalize=True,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # fmt: skip


class CaptionModel:
    """A captioner with its tokenizer and image processor (what training, evaluation and the front share).

    Attributes:
        model: The HF image-to-text model (`VisionEncoderDecoderModel` or any model whose forward takes
            `pixel_values` and `labels`/`decoder_input_ids`, and that has `generate`).
        tokenizer: Its tokenizer.
        processor: Its image processor (`pixel_values` from uint8 images).
    """

    def __init__(self, model: Any, tokenizer: Any, processor: Any) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    def pixels(self, images: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
        """`pixel_values` [B, 3, H, W] of uint8 images on `device`."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)

    def save(self, path: str | Path) -> None:
        """`save_pretrained` of model, tokenizer and processor into `path`.

        The weights are saved under the names the loaded model uses: transformers >= 5 renames some
        architectures' tensors on load (ViT's `attention.attention.query` -> `attention.q_proj`) and renames them
        back on save by default, so a checkpoint's names would differ from the resident model's and a `Soup` could
        not match them; `from_pretrained` reads either form.
        """
        try:
            self.model.save_pretrained(path, save_original_format=False)
        except TypeError:  # transformers < 5: no renaming, no option
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.processor.save_pretrained(path)


def load_captioner(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CaptionModel:
    """Any HF image-to-text model (a Hub id or a local directory) with its tokenizer and image processor.

    The class is the one `config.json` names (`VisionEncoderDecoderModel`, `BlipForConditionalGeneration`,
    `GitForCausalLM`, ...), so every captioner loads the same way.

    Raises:
        SoupsError: the directory/id cannot be read (named).
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        processor = transformers.AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise SoupsError(f"cannot load the captioner {name_or_path}: {' '.join(str(err).split())[:300]}") from err
    arch = (getattr(config, "architectures", None) or ["VisionEncoderDecoderModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.VisionEncoderDecoderModel
    model = cls.from_pretrained(name_or_path, dtype=dtype).to(device)
    if tokenizer.pad_token_id is None:  # GPT-2 decoders ship without one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return CaptionModel(model, tokenizer, processor)


# ----------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------


def sequence_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after (e.g. EOS=3: [5, 3, 0] -> [1, 1, 0])."""
    is_eos = (tokens == eos_token_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def decode_captions(tokenizer: Any, tokens: torch.Tensor, eos_token_id: int) -> list[str]:
    """Captions of generated tokens (start token removed by the caller), cut at the first EOS."""
    mask = sequence_mask(tokens, eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    texts = tokenizer.batch_decode(tokens.masked_fill(mask == 0, pad), skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def caption_logprobs(
    model: Any, pixel_values: torch.Tensor, tokens: torch.Tensor, start_token_id: int, *, with_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities of `tokens` under a captioner (teacher forcing from the start token).

    Args:
        model: An encoder-decoder captioner (forward takes `pixel_values` and `decoder_input_ids`).
        pixel_values: FloatTensor[B, 3, H, W].
        tokens: LongTensor[B, T], the caption tokens after the start token.
        start_token_id: The decoder start token.
        with_logits: Also return the (log-softmaxed) logits [B, T, V], for entropy and KL.

    Returns:
        (logprobs [B, T], log-softmax [B, T, V] or None).
    """
    start = torch.full((tokens.shape[0], 1), start_token_id, dtype=tokens.dtype, device=tokens.device)
    decoder_input_ids = torch.cat([start, tokens[:, :-1]], dim=1)
    # right padding after EOS cannot reach earlier positions (causal decoder): an all-ones mask is exact
    ones = torch.ones_like(decoder_input_ids)
    logits = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, decoder_attention_mask=ones).logits
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked, (logp if with_logits else None)


def model_kwargs(cfg: Mapping[str, Any]) -> dict[str, int]:
    """The tiny captioner's shape from a `model.tiny` config node."""
    keys = ("image_size", "patch_size", "hidden_size", "encoder_layers", "decoder_layers", "heads", "max_length")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise SoupsError(f"model.tiny is missing {missing}")
    return {k: int(cfg[k]) for k in keys}

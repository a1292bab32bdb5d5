"""The text family's models: the PPO policy, and the tiny tokenizer and causal LM of the embedded task.

The PPO policy is a causal LM (Hub id or local path) with a LoRA adapter (peft) and a value head.

One copy of the base model serves three roles:
- the policy π_θ: base + trainable LoRA adapter;
- the reference policy π_ref: the same module inside `peft_model.disable_adapter()` (no second copy, unlike
  the reference code, which loaded LLaMA-7B twice);
- the critic: a linear value head on the policy's last hidden states.

The shared init is the SFT model plus, optionally, an existing adapter that keeps training
(`PeftModel.from_pretrained(..., is_trainable=True)`), as the paper did with `tloen/alpaca-lora-7b`.
8-/4-bit base loading goes through bitsandbytes (`BitsAndBytesConfig`) and is only offered with a CUDA GPU.
The value head is written here (a `nn.Linear`) rather than taken from trl because trl's value-head model
belongs to the PPO code that trl moved to `trl.experimental` and drops after 1.12.

The embedded task's tokenizer (`build_tokenizer`, word-level over `rl.text.task.task_words`) and its tiny
decoder-only model (`build_tiny_causal_lm`) are built from config, offline, and save/load like Hub ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl.text.task import EOS, PAD, UNK, task_words
from soups.utils import SoupsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# The actor-critic module
# ----------------------------------------------------------------------------------------------------------


class ActorCritic(nn.Module):
    """A peft causal LM (the actor) and a value head (the critic) in one module, so DDP/DeepSpeed wrap both.

    Args:
        policy: A `peft.PeftModel` around a causal LM.
        value_head_dropout: Dropout on the hidden states before the value head.
    """

    def __init__(self, policy: nn.Module, value_head_dropout: float = 0.0) -> None:
        super().__init__()
        self.policy = policy
        hidden = int(policy.get_base_model().config.get_text_config().hidden_size)
        self.v_dropout = nn.Dropout(value_head_dropout)
        self.v_head = nn.Linear(hidden, 1)
        # Zero init: V = 0 at the start, so the first value-loss gradients do not perturb the shared trunk.
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and values of every position.

        Args:
            input_ids: LongTensor[B, L], left-padded prompts followed by responses.
            attention_mask: LongTensor[B, L], 1 on real tokens.
            with_values: Also run the value head (False for reference log-probabilities).

        Returns:
            logits FloatTensor[B, L, V] and values FloatTensor[B, L] (or None), in float32.
        """
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=with_values,
            use_cache=False,
        )
        values = None
        if with_values:
            hidden = out.hidden_states[-1]
            values = self.v_head(self.v_dropout(hidden.to(self.v_head.weight.dtype))).squeeze(-1).float()
        return out.logits.float(), values


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` builds them: cumsum(mask) - 1, and 1 on padding.

    Args:
        attention_mask: LongTensor[B, L].

    Returns:
        LongTensor[B, L]; e.g. mask [0, 0, 1, 1, 1] -> [1, 1, 0, 1, 2].
    """
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Builders (configs reach the model only through these)
# ----------------------------------------------------------------------------------------------------------


def quantization_config(mode: str | None) -> Any:
    """A `BitsAndBytesConfig` for `mode` in {None, "8bit", "4bit"}.

    Raises:
        SoupsError: an unknown mode, or 8-/4-bit asked for without bitsandbytes or without a CUDA GPU.
    """
    if mode in (None, "none", "null"):
        return None
    if mode not in ("8bit", "4bit"):
        raise SoupsError(f"model.quantization={mode!r} is not one of: null, 8bit, 4bit")
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise SoupsError(
            f"model.quantization={mode} needs bitsandbytes and a CUDA GPU (found: bitsandbytes="
            f"{importlib.util.find_spec('bitsandbytes') is not None}, cuda={torch.cuda.is_available()}); "
            "set model.quantization=null"
        )
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the policy, left-padded for batched generation, with a pad token.

    Raises:
        SoupsError: the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - a bad path/id is a user error
        raise SoupsError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SoupsError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: str = "float32", quantization: str | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """Loads a causal LM from a Hub id or a local directory, optionally 8-/4-bit (GPU + bitsandbytes only).

    Raises:
        SoupsError: unknown dtype, unavailable quantization, or a model that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise SoupsError(f"model.dtype={dtype!r} is not one of: {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    bnb = quantization_config(quantization)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - a bad path/id is a user error
        raise SoupsError(f"cannot load a causal LM from {name_or_path!r}: {err}") from err
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_config(cfg: Mapping[str, Any]) -> Any:
    """A `peft.LoraConfig` for causal-LM training from the `lora` config node.

    Keys: r, alpha, dropout, target_modules (a list, "all-linear", or null for peft's per-architecture
    default), bias.
    """
    from peft import LoraConfig, TaskType

    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(cfg.get("r", 8)),
        lora_alpha=float(cfg.get("alpha", 16)),
        lora_dropout=float(cfg.get("dropout", 0.05)),
        target_modules=targets,
        bias=str(cfg.get("bias", "none")),
    )


def build_policy(model_cfg: Mapping[str, Any], lora_cfg: Mapping[str, Any], name_or_path: str) -> nn.Module:
    """Base causal LM + LoRA: a new adapter from `lora_cfg`, or the existing `model_cfg.adapter` kept trainable.

    Args:
        model_cfg: The `model` config node (dtype, quantization, adapter, trust_remote_code).
        lora_cfg: The `lora` config node (used when no existing adapter is given).
        name_or_path: The base model (Hub id or local directory).

    Returns:
        A `peft.PeftModel` whose only trainable parameters are the adapter's.

    Raises:
        SoupsError: the base or the adapter cannot be loaded.
    """
    from peft import PeftModel, get_peft_model

    base = load_causal_lm(
        name_or_path,
        dtype=str(model_cfg.get("dtype", "float32")),
        quantization=model_cfg.get("quantization"),
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
    )
    adapter = model_cfg.get("adapter")
    if adapter:
        try:
            policy = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        except Exception as err:  # noqa: BLE001 - a bad path/id is a user error
            raise SoupsError(f"cannot load the init adapter model.adapter={adapter!r}: {err}") from err
    else:
        policy = get_peft_model(base, lora_config(lora_cfg))
    if not any(p.requires_grad for p in policy.parameters()):
        raise SoupsError(f"the policy built from {name_or_path!r} has no trainable parameter; see lora.target_modules")
    return policy


# ----------------------------------------------------------------------------------------------------------
# Adapter state: save and exact restore
# ----------------------------------------------------------------------------------------------------------


def adapter_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft saves them (keys without the adapter name), detached, on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(policy).items()}


def load_adapter_weights(policy: nn.Module, adapter_dir: str | Path) -> None:
    """Loads `adapter_model.safetensors` from `adapter_dir` into `policy`'s active adapter, verifying every key.

    The reference code loaded LoRA weights with strict=False and silently loaded nothing; here a missing or
    unexpected adapter key is an error.

    Raises:
        SoupsError: the file is missing, or a key of the file or of the adapter does not match.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise SoupsError(f"no adapter weights at {path}")
    state = load_file(str(path))
    expected = set(adapter_state(policy))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise SoupsError(f"{path}: adapter keys do not match the policy (missing {missing[:3]}, extra {extra[:3]})")
    result = set_peft_model_state_dict(policy, state)
    if result.unexpected_keys:
        raise SoupsError(f"{path}: keys did not land in the policy: {sorted(result.unexpected_keys)[:3]}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and tiny model of the embedded task
# ----------------------------------------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """The word-level tokenizer of the embedded task (WordLevel + PreTrainedTokenizerFast, left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, UNK, EOS, *task_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, eos_token=EOS, bos_token=EOS, padding_side="left"
    )
    tokenizer.model_max_length = 128
    return tokenizer


def build_tiny_causal_lm(cfg: Any, vocab_size: int, pad_token_id: int, eos_token_id: int) -> Any:
    """A tiny decoder-only model from config (random init, seeded by the caller).

    Args:
        cfg: The model shape: `arch` ("llama" or "gpt2"), `hidden_size`, `num_layers`, `num_heads` (an
            `rl.text.sft.SFTInitConfig`).
        vocab_size: Rows of the embedding.
        pad_token_id: The tokenizer's pad id.
        eos_token_id: The tokenizer's eos id (also the bos id).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            max_position_embeddings=128, pad_token_id=pad_token_id, bos_token_id=eos_token_id,
            eos_token_id=eos_token_id, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_positions=128, pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    raise SoupsError(f"sft init: unknown arch {cfg.arch!r}; valid: gpt2, llama")

"""`python -m soups.mix`: mix expert checkpoints θ = Σ_i λ_i θ_i into one HF checkpoint, streamed.

    python -m soups.mix experts=[A,B,C] weights=[0.2,0.3,0.5] output=DIR
    python -m soups.mix experiment=smoke          # builds three tiny GPT-2 experts, then mixes them

Full checkpoints go through `soups.interpolate.interpolate` (one tensor per expert in memory at a time) and
`soups.writer.write_soup` (sharded safetensors, config/tokenizer files, soup.json provenance, model card,
atomic rename). When every expert is a PEFT adapter the mix is delegated to `soups.lora.mix_lora`
(`lora_mode`, `lora_output`, `base`). Diffusers experts go to `soups.diffusers_lora.mix_diffusers` when `base=` is a
diffusers pipeline dir or the experts carry `soups_expert.json`: LoRA in the diffusers, peft or kohya format, mixed
exactly, written as a full pipeline (`lora_output=merged`) or a rank-Σr LoRA (`lora_output=adapter`); full-UNet
experts averaged. Config: `configs/mix/config.yaml`, every field documented there.

    python -m soups.mix experts=[A,B] weights=[0.3,0.7] base=PIPELINE output=S    # diffusers LoRA experts

What it refuses (one `error: ...` line, exit 2, nothing written): LoRA options given with full checkpoints (they
would be silently ignored), checkpoints of LoRA factors offered as full weights without a base pipeline (diffusers
`lora.down`, kohya `lora_unet_…`: mixing factors linearly is wrong; with `base=<pipeline>` they are mixed exactly),
diffusers experts on different base pipelines, integer/quantized tensors that differ across experts, weights
summing to 0, and an output that another run writes at the same time (`soups.utils.atomic_dir`).

`mix(...)` is the same pipeline as a plain function, for scripts and tests.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/mix")  # a bad command line fails here, before the heavy imports

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from soups.merge import MixSummary, mix
from soups.utils import SoupsError, cli_errors, seed_everything

__all__ = ["MixSummary", "mix", "build_smoke_experts", "run", "main"]


def build_smoke_experts(paths: Sequence[str | Path], seed: int) -> list[Path]:
    """Builds tiny GPT-2 experts sharing one init (init + small seeded perturbation), for `experiment=smoke`.

    Existing expert directories are kept (re-running the smoke preset reuses them).

    Returns:
        The expert directories (absolute).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=256, bos_token_id=0,
                        eos_token_id=0)
    seed_everything(seed)
    init = GPT2LMHeadModel(config).state_dict()
    out: list[Path] = []
    for i, path in enumerate(paths):
        path = Path(path).absolute()
        out.append(path)
        if (path / "config.json").is_file():
            continue
        generator = torch.Generator().manual_seed(seed + 1 + i)
        model = GPT2LMHeadModel(config)
        perturbed = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in init.items()
        }
        model.load_state_dict(perturbed)
        model.save_pretrained(path, max_shard_size="200KB")
    return out


def _check_loads(output: Path) -> float:
    """Loads a causal-LM soup with `from_pretrained` and returns its loss on a fixed token sequence (a diffusers
    pipeline soup: loads it with `DiffusionPipeline.from_pretrained` and returns its UNet's parameter count)."""
    if (output / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(output)
        return float(sum(p.numel() for p in pipe.unet.parameters()))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output)
    tokens = torch.arange(16).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    # Next-token cross-entropy, as the model's own loss would give; passing `labels=` instead makes transformers
    # warn about an unset `loss_type` on every GPT-2 load.
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]))


def _cli_list(value: Any, name: str, example: str) -> list[Any]:
    """A list option from the command line; a scalar or a string is refused (a string would otherwise be read as
    a list of its characters: `experts=path` gave "checkpoint not found: p")."""
    if OmegaConf.is_list(value) or isinstance(value, list | tuple):
        return list(value)
    raise SoupsError(f"{name} must be a list, e.g. {example}; got {value!r} ({type(value).__name__})")


@cli_errors
def run(cfg: DictConfig) -> MixSummary:
    """The CLI body on a composed config (tests call it in-process); bad input exits 2 with one error line."""
    # ---- set-up -----------------------------------------------------------------------------------------
    seed_everything(int(cfg.seed))
    experts = _cli_list(cfg.experts, "experts", "experts=[PATH_A,PATH_B]") if cfg.experts is not None else []
    if cfg.build_smoke_experts:
        experts = [str(p) for p in build_smoke_experts(experts, int(cfg.seed))]
    weights = _cli_list(cfg.weights, "weights", "weights=[0.5,0.5]") if cfg.weights is not None else None

    # ---- mix ----------------------------------------------------------------------------------------------
    summary = mix(
        experts,
        weights,
        cfg.output,
        keys=cfg["keys"],
        allow_extrapolation=bool(cfg.allow_extrapolation),
        dtype=cfg.dtype,
        device=cfg.device,
        overwrite=bool(cfg.overwrite),
        max_shard_size=cfg.max_shard_size,
        lora_mode=cfg.lora_mode,
        lora_output=cfg.lora_output,
        base=cfg.base,
        resolved_config=OmegaConf.to_container(cfg, resolve=True),
        progress=bool(cfg.progress),
    )

    # ---- report -------------------------------------------------------------------------------------------
    if cfg.check_loads:
        value = _check_loads(summary.output)
        if (summary.output / "model_index.json").is_file():
            print(f"reloaded {summary.output} with DiffusionPipeline.from_pretrained; UNet of {value:.0f} parameters")
        else:
            print(f"reloaded {summary.output} with from_pretrained; loss on a fixed sequence {value:.4f}")
    print(summary.line())
    return summary


@entry("../configs/mix")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

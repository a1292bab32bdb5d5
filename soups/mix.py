"""`python -m soups.mix`: mix expert checkpoints θ = Σ_i λ_i θ_i into one HF checkpoint, streamed.

    python -m soups.mix experts=[A,B,C] weights=[0.2,0.3,0.5] output=DIR
    python -m soups.mix experiment=smoke          # builds three tiny GPT-2 experts, then mixes them

Full checkpoints go through `soups.interpolate.interpolate` (one tensor per expert in memory at a time) and
`soups.writer.write_soup` (sharded safetensors, config/tokenizer files, soup.json provenance, model card,
atomic rename). When every expert is a PEFT adapter the mix is delegated to `soups.lora.mix_lora`
(`lora_mode`, `lora_output`, `base`). Config: `configs/mix/config.yaml`, every field documented there.

What it refuses (one `error: ...` line, exit 2, nothing written): LoRA options given with full checkpoints (they
would be silently ignored), checkpoints of LoRA factors offered as full weights (diffusers `lora.down`, kohya
`lora_unet_…`: mixing factors linearly is wrong), integer/quantized tensors that differ across experts, weights
summing to 0, and an output that another run writes at the same time (`soups.utils.atomic_dir`).

`mix(...)` is the same pipeline as a plain function, for scripts and tests.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/mix")  # a bad command line fails here, before the heavy imports

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from soups.checkpoint import Checkpoint, open_checkpoint
from soups.interpolate import interpolate, parse_dtype
from soups.utils import SoupsError, cli_errors, seed_everything
from soups.writer import check_output_path, write_soup

__all__ = ["MixSummary", "mix", "build_smoke_experts", "run", "main"]


@dataclass
class MixSummary:
    """What a mix wrote."""

    output: Path
    tensors: int
    bytes: int
    seconds: float

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"mixed {self.tensors} tensors, {self.bytes} bytes ({self.bytes / 1e9:.3f} GB) "
            f"in {self.seconds:.2f} s -> {self.output}"
        )


def _mix_lora(experts: list[Checkpoint], weights: Sequence[float], output: str | Path, **kwargs: Any) -> Path:
    """Delegates an all-adapter mix to `soups.lora.mix_lora` (owned by the LoRA module)."""
    try:
        from soups.lora import mix_lora  # lazy: the LoRA module pulls in peft
    except ModuleNotFoundError as err:
        if err.name != "soups.lora":
            raise
        raise SoupsError("LoRA experts need soups.lora, which is not installed in this checkout") from None
    except ImportError as err:
        raise SoupsError(f"LoRA experts need soups.lora.mix_lora: {err}") from None
    result = mix_lora([c.path for c in experts], weights, output=output, **kwargs)
    return Path(result) if result is not None else Path(output).absolute()


def mix(
    experts: Sequence[str | Path],
    weights: Sequence[float] | None,
    output: str | Path,
    *,
    keys: str = "exact",
    allow_extrapolation: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    lora_mode: str | None = None,
    lora_output: str | None = None,
    base: str | Path | None = None,
    resolved_config: Any = None,
    progress: bool = True,
) -> MixSummary:
    """Mixes checkpoints and writes the soup to `output` (see the module docstring).

    Args:
        experts: Checkpoint paths (HF dirs, PEFT adapter dirs, .safetensors or state-dict files).
        weights: λ, one per expert; None gives the uniform soup 1/N.
        output: Directory to write (must not exist unless `overwrite`; never an ingredient).
        keys: "exact", "intersection" or "union" (`soups.interpolate`).
        allow_extrapolation: Accept λ off the simplex.
        dtype: Output dtype for floating tensors; None keeps the source dtype.
        device: Where to accumulate ("cpu", "cuda", "cuda:1"); full checkpoints only (LoRA mixes run on CPU).
        overwrite: Replace an existing output directory.
        max_shard_size: Largest safetensors shard ("2GB", "500MB", bytes).
        lora_mode: "delta" (exact Σ λ_i s_i B_i A_i; the default, None) or "ab" (A and B averaged separately);
            adapters only: any value with full checkpoints is refused, since it would be ignored.
        lora_output: "merged" (full checkpoint; the default, None) or "adapter" (PEFT adapter); adapters only.
        base: Base model for LoRA merges when adapter_config's base path is not local; adapters only.
        resolved_config: Config saved as config.yaml beside the soup.
        progress: Show a tqdm bar over tensors.

    Returns:
        A `MixSummary` (output path, tensor count, bytes written, seconds).

    Raises:
        SoupsError: any bad input (named); nothing is left at `output` then.
    """
    start = time.perf_counter()
    if isinstance(experts, str | Path) or not experts:
        raise SoupsError(f"experts must be a non-empty list of checkpoint paths, got {experts!r}")
    if output is None or str(output).strip() == "":
        raise SoupsError("no output given; pass output=DIR")
    ckpts = [open_checkpoint(p) for p in experts]
    if weights is None:
        weights = [1.0 / len(ckpts)] * len(ckpts)
    check_output_path(output, [c.path for c in ckpts])

    # ---- all-adapter mixes go to the LoRA module ------------------------------------------------------
    adapters = [c for c in ckpts if c.kind == "peft"]
    if adapters and len(adapters) != len(ckpts):
        full = next(c for c in ckpts if c.kind != "peft")
        raise SoupsError(
            f"cannot mix PEFT adapter {adapters[0].path} with full checkpoint {full.path}; "
            "merge the adapter into its base first, or mix only adapters"
        )
    if adapters:
        out = _mix_lora(
            ckpts, weights, output, mode=lora_mode or "delta", output_format=lora_output or "merged", base=base,
            dtype=dtype,
            overwrite=overwrite, allow_extrapolation=allow_extrapolation,
            max_shard_size=max_shard_size, resolved_config=resolved_config, progress=progress,
        )
        record = json.loads((out / "soup.json").read_text()) if (out / "soup.json").is_file() else {}
        return MixSummary(out, int(record.get("tensors", 0)), int(record.get("bytes", 0)),
                          time.perf_counter() - start)

    # ---- full checkpoints: validate, stream, write -----------------------------------------------------
    ignored = [f"{name}={value}" for name, value in (("lora_mode", lora_mode), ("lora_output", lora_output),
                                                       ("base", base)) if value is not None]
    if ignored:
        raise SoupsError(
            f"{', '.join(ignored)} applies only to PEFT adapter experts, but {ckpts[0].path} is a full checkpoint "
            f"({ckpts[0].kind}); remove the option"
        )
    stream = interpolate(ckpts, weights, keys=keys, allow_extrapolation=allow_extrapolation, dtype=dtype,
                         device=device)
    out_dtype = parse_dtype(dtype)
    out = write_soup(
        output,
        stream,
        ingredients=ckpts,
        weights=stream.weights,
        mode="linear",
        config_source=ckpts[0].config_dir,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        extra_metadata={
            "keys": keys,
            "dropped_keys": stream.plan.dropped,
            "allow_extrapolation": allow_extrapolation,
            "dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else "source",
        },
        resolved_config=resolved_config,
        progress=progress,
    )
    record = json.loads((out / "soup.json").read_text())
    return MixSummary(out, record["tensors"], record["bytes"], time.perf_counter() - start)


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
    """Loads a causal-LM soup with `from_pretrained` and returns its loss on a fixed token sequence."""
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
        loss = _check_loads(summary.output)
        print(f"reloaded {summary.output} with from_pretrained; loss on a fixed sequence {loss:.4f}")
    print(summary.line())
    return summary


@entry("../configs/mix")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

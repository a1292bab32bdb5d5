"""`mix(...)`: the pipeline of `python -m soups.mix` as a plain function: Σ_i λ_i θ_i streamed into a checkpoint.

A component (no entry point), so that the CLI, the live page's export and scripts share it: read the experts'
headers, validate, stream (`soups.interpolate`) or mix adapters exactly (`soups.lora`), and write the soup
atomically with its provenance (`soups.writer`). Diffusers experts (LoRA in diffusers, peft or kohya format, or
full UNets) on a base pipeline go to `soups.diffusers_lora.mix_diffusers`. `soups.mix` re-exports `mix` and
`MixSummary`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soups.checkpoint import Checkpoint, open_checkpoint
from soups.interpolate import interpolate, parse_dtype
from soups.utils import SoupsError
from soups.writer import check_output_path, write_soup

__all__ = ["MixSummary", "mix"]


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
        base: Base model for LoRA merges when adapter_config's base path is not local; adapters only. A diffusers
            pipeline dir here (or experts with soups_expert.json) selects the diffusers path.
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

    # ---- diffusers experts (LoRA in any format, or full UNets) on a base pipeline go to their module --------
    from soups.diffusers_lora import is_diffusers_mix  # light: diffusers itself is imported only to load models

    if is_diffusers_mix(experts, base):
        if keys != "exact":
            raise SoupsError(f"keys={keys}: diffusers experts are mixed with keys=exact (every expert on one base)")
        from soups.diffusers_lora import mix_diffusers

        out = mix_diffusers(experts, weights, output, base=base, lora_output=lora_output, lora_mode=lora_mode,
                            dtype=dtype, device=device, overwrite=overwrite, allow_extrapolation=allow_extrapolation,
                            max_shard_size=max_shard_size, resolved_config=resolved_config, progress=progress)
        record = json.loads((out / "soup.json").read_text())
        return MixSummary(out, int(record["tensors"]), int(record["bytes"]), time.perf_counter() - start)

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

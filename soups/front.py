"""Components of every front: the λ grid's size, the resident `Soup` of N experts, device and dtype checks.

Shared by `python -m soups.pareto` (the front), `python -m soups.serve` (the live page) and the family
evaluators, which may not import those entry points (`tests/test_layers.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from soups.pareto_registry import check_experts, checkpoint_kind, checkpoint_loader
from soups.utils import SoupsError

__all__ = ["grid_divisions", "load_base_model", "open_soup", "check_device_and_dtype"]


def grid_divisions(n_experts: int, n_points: int | None = None, step: float | None = None) -> int:
    """The number of divisions k of the regular simplex grid (step 1/k) asked for by `n_points` or `step`.

    `step` wins when both are given: k = round(1 / step). With `n_points`, k is the largest integer whose grid
    has at most `n_points` points, the grid of N experts and k divisions having C(k + N − 1, N − 1) points
    (for N = 2 that is k + 1, so `n_points=11` gives λ ∈ {0, 0.1, …, 1}).

    Args:
        n_experts: N ≥ 1.
        n_points: The budget of grid points (≥ N, so that every vertex is in).
        step: The grid step, 1/k for an integer k.

    Raises:
        SoupsError: neither given, a step that is not 1/k, or fewer points than experts.
    """
    from soups.simplex import num_grid_points

    if step is not None:
        k = round(1.0 / step) if step > 0 else 0
        if k < 1 or abs(k * step - 1.0) > 1e-6:
            raise SoupsError(f"grid.step={step} is not 1/k for a positive integer k")
        return k
    if n_points is None:
        raise SoupsError("give grid.n_points or grid.step")
    if n_points < n_experts:
        raise SoupsError(f"grid.n_points={n_points} is fewer than the {n_experts} experts (the vertices)")
    if n_experts == 1:
        return 1
    k = 1
    while num_grid_points(n_experts, k + 1) <= n_points:
        k += 1
    return k


def load_base_model(base: str, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base model of LoRA experts, as the class its `config.json` names (else `AutoModel`), on `device`."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise SoupsError(f"cannot read the base model {base}: {' '.join(str(err).split())[:300]}") from err
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    model = (model_cls or transformers.AutoModel).from_pretrained(base, dtype=dtype)
    return model.to(device).eval()


def open_soup(
    paths: Sequence[str],
    *,
    base_model: str | None,
    device: torch.device,
    dtype: torch.dtype,
    allow_extrapolation: bool = False,
) -> Any:
    """A resident `Soup` of `paths` (adapters on `base_model`, or full checkpoints); `allow_extrapolation` lets
    `set_weights` take λ off the simplex (the live page's toggle)."""
    from soups.soup import Soup

    info = check_experts(paths)
    kind = checkpoint_kind(paths[0])
    if kind is not None:  # a family's own model (e.g. a Brax policy): its loader builds the resident module
        loader = checkpoint_loader(kind)
        if hasattr(loader, "open_soup"):  # experts that are not one state dict each (diffusers LoRA, pipelines)
            return loader.open_soup(list(paths), base_model=base_model, device=device, dtype=dtype,
                                    allow_extrapolation=allow_extrapolation)  # fmt: skip
        model = loader.build_resident_model(paths[0])
        return Soup.from_checkpoints(list(paths), model=model, device=device, dtype=dtype, progress=False,
                                     allow_extrapolation=allow_extrapolation)  # fmt: skip
    if info["kind"] == "peft":
        base = base_model or info["base"]
        if base is None:
            raise SoupsError(f"adapter {paths[0]} names no base_model_name_or_path; set base_model=...")
        return Soup.from_lora(list(paths), load_base_model(base, device=device, dtype=dtype),
                              allow_extrapolation=allow_extrapolation)  # fmt: skip
    return Soup.from_checkpoints(list(paths), device=device, dtype=dtype, progress=False,
                                 allow_extrapolation=allow_extrapolation)  # fmt: skip


def check_device_and_dtype(device: str, dtype: Any) -> torch.dtype:
    """Checks `device=` and `dtype=` before anything is loaded; returns the resident model's torch dtype.

    Raises:
        SoupsError: an unknown or null dtype, a device torch cannot parse, or a CUDA device that is not there.
    """
    from soups.interpolate import parse_dtype

    valid = "float32 (fp32), bfloat16 (bf16), float16 (fp16), float64"
    try:
        resolved = parse_dtype(dtype)
    except SoupsError:
        raise SoupsError(f"unknown dtype={dtype!r}; valid: {valid}") from None
    if resolved is None:
        raise SoupsError(f"dtype={dtype!r}: the resident model needs a dtype; valid: {valid}")
    if device == "auto":
        return resolved
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SoupsError(f"device={device!r}: {err}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoupsError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SoupsError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved

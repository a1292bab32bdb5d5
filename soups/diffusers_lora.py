"""Diffusers experts in the soups engine: LoRA read in three formats and mixed exactly, full-UNet experts averaged.

A diffusers LoRA expert adds ΔW = s·B·A to some UNet (and text-encoder) weights W0, with s = alpha / r. The mix of
N experts with weights λ has one exact answer, W0 + Σ_i λ_i s_i B_i A_i, each expert with its own rank and alpha,
computed here exactly as `soups.lora` mixes text LoRA (the same `concat_factors`). Averaging the factors A and B
of equal-rank experts as if they were weights is never done.

**Reading** (`read_expert`, headers first, tensors on demand). Every format becomes the same per-module factors
(`soups.lora.LoraFactors`: A of shape (r, in[, kh, kw]), B of shape (out, r[, 1, 1]), alpha, s):

- diffusers `pytorch_lora_weights.safetensors` as `StableDiffusionPipeline.save_lora_weights` writes it: keys
  `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.…`), rank/alpha from the file's header
  metadata `lora_adapter_metadata` (diffusers 0.42 writes `{"unet.r": …, "unet.lora_alpha": …, "unet.rank_pattern":
  …}` there when given `unet_lora_adapter_metadata`); the older names `<module>.lora.down/up.weight`,
  `<module>.lora_linear_layer.down/up.weight` and `<attn>.processor.to_q_lora.down/up.weight` too. Without
  metadata and without `.alpha` tensors, alpha = r (scale 1), which is what diffusers assumes when it loads such a
  file; `soup.json` records where each expert's alpha came from;
- the same file with UNPREFIXED keys (`unet.save_lora_adapter` writes them, with unprefixed metadata): read as UNet
  modules, every key of which must map onto the base UNet;
- peft format: `adapter_config.json` + `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`),
  read by `soups.lora.read_adapter` with its rank/alpha patterns and rslora;
- kohya naming (`lora_unet_down_blocks_0_…_attn1_to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`; scale =
  alpha / rank; `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders): the flattened name is matched against
  the base component's own module names (`.` → `_`), the mapping diffusers' converter
  (`diffusers.loaders.lora_conversion_utils`) produces for SD-1.x kohya files (tested against `load_lora_weights`).
  SGM block names (`input_blocks`, the SDXL kohya layout) are refused, naming the tensor.

Every LoRA tensor must land on a weight of the base pipeline with matching shape, or the read fails naming the file
and the tensor: nothing is dropped silently. DoRA, LoRA biases, LyCORIS (LoHa/LoKr) are refused.

**Full-UNet experts** (DiffFit experts: `<expert>/unet/diffusion_pytorch_model.safetensors` + `soups_expert.json`
kind `diffusers_unet`) mix as Σ λ_i W_i through `soups.interpolate`; the rest of the pipeline comes from the base.

**Writing** (`mix_diffusers`, what `python -m soups.mix … base=<pipeline>` runs), atomically, with `soup.json`:

- `lora_output=merged`: a full diffusers pipeline dir (`DiffusionPipeline.from_pretrained` loads it): the merged
  components' weights streamed through `soups.writer`, every other file hard-linked from the base (copied when a
  link is impossible). The merged components get no fp16/`.bin` variant files, so no variant can load the unmixed
  weights;
- `lora_output=adapter`: `pytorch_lora_weights.safetensors` of rank Σ r_i per module (A_cat = vstack(A_i),
  B_cat = hstack(λ_i s_i B_i), alpha = rank: scale 1, the experts' scales folded into B), with `lora_adapter_metadata`
  so that `pipe.load_lora_weights(dir)` computes exactly Σ λ_i s_i B_i A_i, plus `soups_expert.json` (it is itself an
  expert of the same base).

**The resident soup** (`open_soup`, the `diffusers` checkpoint kind of `soups.pareto`): the base pipeline's
`UNet2DConditionModel` is the resident module. LoRA experts: the targeted weights are set in place to
W0 + Σ λ_i s_i B_i A_i by the same function (`merged_weight`) that writes the merged soup, so the Soup at λ and the
merged soup at λ hold bit-identical weights. UNet experts: `Soup.from_checkpoints` (Σ λ_i W_i). Text-encoder LoRA
cannot be resident (the front mixes the UNet only) and is refused there, naming the tensor.

`load_lora_strict` loads a LoRA file into a model and checks that every tensor landed: diffusers'
`load_lora_adapter` without `prefix=None` silently loads nothing from the unprefixed file `unet.save_lora_adapter`
writes; here that is an error naming the file.

diffusers is imported lazily (only to build or load models); reading and mixing need torch and safetensors only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soups.checkpoint import Checkpoint, _read_index, open_checkpoint
from soups.lora import (
    LoraFactors,
    _check_config,
    _pattern_value,
    base_key,
    concat_factors,
    lora_scale,
    read_adapter,
)
from soups.utils import SoupsError

__all__ = [
    "COMPONENTS",
    "EXPERT_FILE",
    "LORA_FILE",
    "PIPELINE_FILE",
    "DiffusersExpert",
    "build_resident_model",
    "check_compatible",
    "is_diffusers_mix",
    "load_lora_strict",
    "lora_product",
    "merged_weight",
    "mix_diffusers",
    "open_soup",
    "read_expert",
]

EXPERT_FILE = "soups_expert.json"  # {"kind": "diffusers_lora" | "diffusers_unet", "base": …} (marks an expert dir)
PIPELINE_FILE = "model_index.json"  # marks a diffusers pipeline dir
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (safetensors header metadata)
#: Pipeline components a LoRA may adapt, with their kohya prefixes.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers models, transformers models
_PEFT_PREFIX = "base_model.model."
_ATTN_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# (regex on a name without its component prefix, factor) in match order; group "m" is the module name.
_FACTOR_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.default)?\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.default)?\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
)


# ----------------------------------------------------------------------------------------------------------
# pure maths
# ----------------------------------------------------------------------------------------------------------


def lora_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·A for Linear or Conv2d LoRA, in float32.

    Args:
        a: A, shape (r, in) or (r, in, kh, kw) (a conv LoRA's down projection).
        b: B, shape (out, r) or (out, r, 1, 1).

    Returns:
        shape (out, in) or (out, in, kh, kw): the weight delta before scaling.
    """
    delta = b.float().reshape(b.shape[0], -1) @ a.float().reshape(a.shape[0], -1)
    return delta.reshape(b.shape[0], *a.shape[1:])


def merged_weight(
    w0: torch.Tensor, factors: Sequence[LoraFactors | None], weights: Sequence[float]
) -> torch.Tensor:
    """W0 + Σ_i λ_i s_i B_i A_i in float32: the one function both the merged soup and the resident Soup use.

    Computed as one product of the concatenated factors (A_cat = vstack(A_i), B_cat = hstack(λ_i s_i B_i),
    `soups.lora.concat_factors`), so the same λ gives bit-identical weights wherever it is computed.

    Args:
        w0: The base weight, shape (out, in[, kh, kw]).
        factors: Expert i's factors for this weight, or None when expert i does not adapt it (it adds 0).
        weights: λ, one per expert.

    Returns:
        float32, shape of `w0`.
    """
    present = [(f, w) for f, w in zip(factors, weights) if f is not None]
    if not present:
        return w0.float()
    a_cat, b_cat = concat_factors([f.a for f, _ in present], [f.b for f, _ in present],
                                  [f.scale for f, _ in present], [w for _, w in present])  # fmt: skip
    return w0.float() + lora_product(a_cat, b_cat)


# ----------------------------------------------------------------------------------------------------------
# the base pipeline
# ----------------------------------------------------------------------------------------------------------


def _component_checkpoint(directory: Path) -> tuple[Checkpoint, str]:
    """The weights of one pipeline component (`unet/`, `text_encoder/`, …) and their file stem.

    Only the canonical safetensors files are read (`diffusion_pytorch_model.safetensors`, `model.safetensors`, or
    their sharded index), never a `.fp16` variant or a `.bin` lying beside them.

    Raises:
        SoupsError: no such safetensors weights in `directory`.
    """
    for stem in _WEIGHT_STEMS:
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return open_checkpoint(single), stem
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = _read_index(index)
            shards = list(dict.fromkeys(directory / name for name in weight_map.values()))
            return Checkpoint(directory, "hf", safetensors_files=shards, config_dir=directory), stem
    raise SoupsError(f"{directory} has no {' or '.join(s + '.safetensors' for s in _WEIGHT_STEMS)} (or its sharded "
                     "index); soups reads diffusers components in safetensors only")  # fmt: skip


def resolve_pipeline(name: str | Path) -> Path:
    """A base pipeline directory: `name` itself, or a Hub id fetched (or found in the cache when offline).

    Raises:
        SoupsError: not a pipeline directory (no model_index.json) and not fetchable.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / PIPELINE_FILE).is_file():
            raise SoupsError(f"base {path} is not a diffusers pipeline directory (no {PIPELINE_FILE})")
        return path.absolute()
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*/*.model"] + [f"*/{s}{t}" for s in _WEIGHT_STEMS
                                                        for t in (".safetensors", "-*-of-*.safetensors")]
        return Path(snapshot_download(str(name), allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types (offline, missing, gated)
        reason = " ".join(str(err).split())[:200]
        raise SoupsError(f"base pipeline {name!r} is not a directory and cannot be fetched: {reason}") from err


@dataclass
class _Base:
    """The base pipeline's components, read from headers: component -> (checkpoint, stem)."""

    path: Path
    components: dict[str, tuple[Checkpoint, str]] = field(default_factory=dict)

    def component(self, name: str, where: str) -> Checkpoint:
        if name not in self.components:
            directory = self.path / name
            if not directory.is_dir():
                raise SoupsError(f"{where}: the base pipeline {self.path} has no {name!r} component")
            self.components[name] = _component_checkpoint(directory)
        return self.components[name][0]


def _flat_names(ckpt: Checkpoint) -> dict[str, str | None]:
    """kohya's flattened module name (`.` → `_`) -> the module name; None where two modules flatten alike."""
    out: dict[str, str | None] = {}
    for key in ckpt.keys():
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            flat = module.replace(".", "_")
            out[flat] = None if flat in out and out[flat] != module else module
    return out


def _match_flat(flat: str, table: Mapping[str, str | None], where: str, base: Path) -> str:
    """The module a kohya flat name stands for: exact, else the unique module whose flat name ends the LoRA's
    (or is ended by it), so a `text_model_` level present on one side only still maps.

    Raises:
        SoupsError: no module, or several (names `where`).
    """
    name = table.get(flat, "")
    if name is None:
        raise SoupsError(f"{where} matches several modules of {base}")
    if name:
        return name
    near = {m for f, m in table.items() if m and (flat.endswith("_" + f) or f.endswith("_" + flat))}
    if len(near) == 1:
        return near.pop()
    what = "several modules" if near else "no module"
    raise SoupsError(f"{where} matches {what} of the base ({base}); is the LoRA for this base?")


# ----------------------------------------------------------------------------------------------------------
# reading experts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """One adapted weight of one expert, from the header: where its factors are and how it is scaled."""

    a_key: str
    b_key: str
    alpha_key: str | None
    rank: int
    alpha: float | None  # None: read `alpha_key`, or alpha = rank when there is none
    rslora: bool = False


@dataclass
class DiffusersExpert:
    """A diffusers expert, read from headers (tensors are read by `factors`).

    Attributes:
        path: The expert as given (a directory, or a LoRA `.safetensors` file).
        kind: "lora", "unet" (a full UNet) or "pipeline" (a pipeline dir, whose UNet is the expert).
        fmt: "diffusers", "diffusers-unprefixed", "peft", "kohya", "unet" or "pipeline".
        base: The base pipeline the expert records (soups_expert.json `base`, peft `base_model_name_or_path`).
        checkpoint: The weights' lazy reader (the LoRA file, the peft adapter, the UNet dir).
        targets: LoRA only: (component, base weight key) -> its factors' location.
        alpha_source: LoRA only: where the alphas come from (metadata, adapter_config, alpha tensors, or the
            alpha = rank default).
    """

    path: Path
    kind: str
    fmt: str
    base: str | None
    checkpoint: Checkpoint
    targets: dict[tuple[str, str], _Target] = field(default_factory=dict)
    alpha_source: str = ""
    _peft: Any = None

    def factors(self) -> dict[tuple[str, str], LoraFactors]:
        """Every adapted weight's factors (small: read whole), with the scale s = alpha / r (or alpha / √r)."""
        if self.kind != "lora":
            raise SoupsError(f"expert {self.path} is a full {self.kind}, not a LoRA")
        out: dict[tuple[str, str], LoraFactors] = {}
        peft_modules = self._peft.modules if self._peft is not None else {}
        for (component, key), t in self.targets.items():
            if self._peft is not None:
                f = peft_modules[key[: -len(".weight")]]
                out[(component, key)] = LoraFactors(a=f.a, b=f.b, alpha=f.alpha, scale=f.scale)
                continue
            a, b = self.checkpoint.get_tensor(t.a_key), self.checkpoint.get_tensor(t.b_key)
            alpha = t.alpha
            if alpha is None:
                alpha = float(self.checkpoint.get_tensor(t.alpha_key).float().item()) if t.alpha_key else float(t.rank)
            if not math.isfinite(alpha) or alpha == 0:
                raise SoupsError(f"expert {self.path}: tensor {t.alpha_key!r} holds alpha={alpha}")
            out[(component, key)] = LoraFactors(a=a, b=b, alpha=alpha, scale=lora_scale(alpha, t.rank, t.rslora))
        return out

    @property
    def components(self) -> list[str]:
        return sorted({c for c, _ in self.targets})


def _read_meta(path: Path) -> dict[str, Any]:
    """An expert directory's `soups_expert.json` ({} when absent).

    Raises:
        SoupsError: unreadable or not a JSON object.
    """
    file = path / EXPERT_FILE
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise SoupsError(f"cannot read {file}: {err}") from err
    if not isinstance(meta, dict):
        raise SoupsError(f"{file} is not a JSON object")
    return meta


def _resolve_recorded_base(base: Any, expert_dir: Path) -> str | None:
    """A recorded base made absolute when it names an existing local path (relative to the cwd or the expert)."""
    if not base:
        return None
    for candidate in (Path(str(base)).expanduser(), expert_dir / str(base)):
        if candidate.exists():
            return str(candidate.resolve())
    return str(base)


def _header_metadata(file: Path) -> dict[str, Any] | None:
    """The diffusers `lora_adapter_metadata` of a safetensors file's header (None when absent)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise SoupsError(f"{file}: header metadata {METADATA_KEY!r} is not JSON: {err}") from err
    return meta if isinstance(meta, dict) else None


def _split_component(key: str) -> tuple[str | None, str]:
    """(component, rest) for `unet.x`, `text_encoder.x`, `text_encoder_2.x`; (None, key) when unprefixed."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, key)


def _lora_file(path: Path) -> Path | None:
    """The LoRA safetensors file of an expert dir (or `path` itself when it is a file); None for other dirs."""
    if path.is_file():
        return path
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    meta = _read_meta(path)
    if meta.get("weights"):  # a community LoRA described by hand: {"kind": "diffusers_lora", "weights": "x.st"}
        return path / str(meta["weights"])
    files = sorted(p for p in path.glob("*.safetensors"))
    return files[0] if len(files) == 1 and meta.get("kind") == "diffusers_lora" else None


def read_expert(path: str | Path, base: str | Path | None = None) -> DiffusersExpert:
    """Reads a diffusers expert's headers and maps every LoRA tensor onto the base pipeline's weights.

    Args:
        path: A LoRA expert (dir with `pytorch_lora_weights.safetensors`, a `.safetensors` file, a peft adapter
            dir), a full-UNet expert (dir with `unet/` + soups_expert.json kind diffusers_unet), or a pipeline dir.
        base: The base pipeline dir (needed to map LoRA names, kohya's in particular); default: the recorded one.

    Returns:
        The expert (no LoRA tensor read yet, except peft adapters, read whole by `soups.lora.read_adapter`).

    Raises:
        SoupsError: unknown layout, unsupported tensor (DoRA, LoRA bias, LyCORIS, SGM names), a tensor that maps
            onto no base weight or onto one of another shape (naming the file and the tensor).
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise SoupsError(f"expert not found: {path}")
    meta = _read_meta(path) if path.is_dir() else {}
    recorded = _resolve_recorded_base(meta.get("base"), path if path.is_dir() else path.parent)
    kind = meta.get("kind")
    if kind not in (None, "diffusers_lora", "diffusers_unet"):
        raise SoupsError(f"{path / EXPERT_FILE}: unknown kind {kind!r}; valid: diffusers_lora, diffusers_unet")
    if path.is_dir() and (kind == "diffusers_unet" or (kind is None and (path / PIPELINE_FILE).is_file())):
        if not (path / "unet").is_dir():
            raise SoupsError(f"expert {path} has no unet/ directory (a {kind or 'pipeline'} expert needs one)")
        ckpt, _ = _component_checkpoint(path / "unet")
        is_pipeline = kind is None
        return DiffusersExpert(path, "pipeline" if is_pipeline else "unet", "pipeline" if is_pipeline else "unet",
                               str(path) if is_pipeline else recorded, ckpt)  # fmt: skip
    base_dir = resolve_pipeline(base if base is not None else recorded) if (base or recorded) else None
    base_info = _Base(base_dir) if base_dir is not None else None
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _read_peft(path, base_info, recorded)
    file = _lora_file(path)
    if file is None or not file.is_file():
        raise SoupsError(f"{path} is not a diffusers expert: expected {LORA_FILE}, a peft adapter, unet/ with "
                         f"{EXPERT_FILE}, or a pipeline dir ({PIPELINE_FILE})")  # fmt: skip
    return _read_lora_file(path, file, base_info, recorded)


def _unsupported(file: Path, key: str) -> SoupsError:
    if "dora_scale" in key or "magnitude" in key:
        why = "a DoRA magnitude (DoRA's renormalisation is not linear in the deltas: no exact mix exists)"
    elif key.endswith(".bias"):
        why = "a LoRA bias, which soups does not mix"
    elif "hada_" in key or "lokr_" in key:
        why = "a LyCORIS (LoHa/LoKr) factor, not LoRA"
    else:
        why = "not a LoRA A/B factor or alpha"
    return SoupsError(f"LoRA {file}: tensor {key!r} is {why}")


def _read_peft(path: Path, base: _Base | None, recorded: str | None) -> DiffusersExpert:
    """A peft LoRA adapter dir on a diffusers component (the UNet unless its modules are the text encoder's)."""
    adapter = read_adapter(path)
    recorded = recorded or _resolve_recorded_base(adapter.base, path)
    if base is None:
        raise SoupsError(f"peft adapter {path}: no base pipeline; pass base=<diffusers pipeline dir>")
    if adapter.saved:
        raise SoupsError(f"peft adapter {path}: modules_to_save tensor {next(iter(adapter.saved))!r} on a diffusers "
                         "model; soups mixes LoRA factors only there")  # fmt: skip
    targets: dict[tuple[str, str], _Target] = {}
    for module, f in adapter.modules.items():
        key = f"{module}.weight"
        component = next((c for c in COMPONENTS if (base.path / c).is_dir()
                          and key in base.component(c, str(path))), None)  # fmt: skip
        if component is None:
            raise SoupsError(f"peft adapter {path}: module {module!r} is no weight of the base pipeline {base.path} "
                             "(unet, text_encoder); is it for this base?")  # fmt: skip
        _check_shape(base.component(component, str(path)), key, tuple(f.b.shape[:1]) + tuple(f.a.shape[1:]),
                     path, f"{_PEFT_PREFIX}{module}.lora_A.weight")  # fmt: skip
        targets[(component, key)] = _Target("", "", None, f.rank, f.alpha, adapter.use_rslora)
    expert = DiffusersExpert(path, "lora", "peft", recorded, adapter.checkpoint or open_checkpoint(path), targets,
                             "adapter_config.json")  # fmt: skip
    expert._peft = adapter
    return expert


def _check_shape(ckpt: Checkpoint, key: str, delta_shape: tuple[int, ...], file: Path, tensor: str) -> None:
    """The LoRA delta (out, in[, kh, kw]) must have the base weight's shape."""
    shape = tuple(ckpt.shape(key))
    if shape != delta_shape:
        raise SoupsError(f"LoRA {file}: tensor {tensor!r} gives a delta of shape {delta_shape} for base weight {key!r} "
                         f"of shape {shape} in {ckpt.path}; the LoRA is for another base")  # fmt: skip


def _read_lora_file(path: Path, file: Path, base: _Base | None, recorded: str | None) -> DiffusersExpert:
    """A diffusers (prefixed, unprefixed or older names) or kohya LoRA safetensors file."""
    if file.suffix != ".safetensors":
        raise SoupsError(f"LoRA {file}: only .safetensors LoRA files are read (no pickle)")
    ckpt = open_checkpoint(file)
    keys = ckpt.keys()
    if not keys:
        raise SoupsError(f"LoRA {file} holds no tensors")
    kohya = any(k.startswith(p) for k in keys for prefixes in COMPONENTS.values() for p in prefixes)
    prefixed = any(_split_component(k)[0] is not None for k in keys)
    fmt = "kohya" if kohya else "diffusers" if prefixed else "diffusers-unprefixed"
    if base is None:
        raise SoupsError(f"LoRA {file}: no base pipeline (the expert records none); pass base=<diffusers pipeline dir>")
    metadata = _header_metadata(file)

    # ---- group the tensors by (component, module name as written) ---------------------------------------------
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        if kohya:
            component = next((c for c, prefixes in COMPONENTS.items() for p in prefixes if key.startswith(p)), None)
            if component is None:
                raise SoupsError(f"LoRA {file}: tensor {key!r} has no kohya component prefix "
                                 "(lora_unet_, lora_te_, lora_te1_, lora_te2_)")  # fmt: skip
            prefix = next(p for p in COMPONENTS[component] if key.startswith(p))
            rest = key[len(prefix) :]
        else:
            component, rest = _split_component(key)
            if component is None:
                if prefixed:
                    raise SoupsError(f"LoRA {file}: tensor {key!r} names no component (unet., text_encoder., "
                                     "text_encoder_2.) while other tensors do")  # fmt: skip
                component = "unet"
        for pattern, factor in _FACTOR_PATTERNS:
            match = pattern.match(rest)
            if match is not None:
                module = match["m"]
                if "p" in pattern.groupindex:
                    module = f"{module}.{_ATTN_PROC[match['p']]}"
                slot = groups.setdefault((component, module), {})
                if factor in slot:
                    raise SoupsError(f"LoRA {file}: tensors {slot[factor]!r} and {key!r} are both the {factor} of "
                                     f"{module!r}")  # fmt: skip
                slot[factor] = key
                break
        else:
            raise _unsupported(file, key)

    # ---- map every module onto a base weight, check shapes, find rank and alpha --------------------------------
    alpha_sources: set[str] = set()
    targets: dict[tuple[str, str], _Target] = {}
    for (component, module), slot in groups.items():
        where = slot.get("A") or slot.get("B") or slot["alpha"]
        if "A" not in slot or "B" not in slot:
            missing = "A (down)" if "A" not in slot else "B (up)"
            raise SoupsError(f"LoRA {file}: the module of tensor {where!r} has no {missing} factor")
        base_ckpt = base.component(component, f"LoRA {file}, tensor {where!r}")
        if kohya:
            if re.match(r"(input_blocks|middle_block|output_blocks|label_emb|time_embed)_", module):
                raise SoupsError(f"LoRA {file}: tensor {where!r} uses SGM/LDM block names (input_blocks, middle_block, "
                                 "output_blocks: the SDXL kohya layout), which soups does not map; convert it to the "
                                 "diffusers naming first")  # fmt: skip
            module = _match_flat(module, _flat_names(base_ckpt), f"LoRA {file}: tensor {where!r}", base_ckpt.path)
        # the base's own key: exact, else a unique suffix, else with leading components dropped (transformers 5
        # saves CLIPTextModel without the `text_model.` level that LoRA files name)
        key = base_key(f"{module}.weight", set(base_ckpt.keys()), f"LoRA {file}: tensor {where!r} on {base_ckpt.path}")
        a_shape, b_shape = ckpt.shape(slot["A"]), ckpt.shape(slot["B"])
        if len(a_shape) not in (2, 4) or len(b_shape) != len(a_shape) or a_shape[0] != b_shape[1]:
            raise SoupsError(f"LoRA {file}: {slot['A']!r} {a_shape} and {slot['B']!r} {b_shape} are not LoRA factors "
                             "(A: (r, in[, kh, kw]), B: (out, r[, 1, 1]))")  # fmt: skip
        if len(b_shape) == 4 and tuple(b_shape[2:]) != (1, 1):
            raise SoupsError(f"LoRA {file}: {slot['B']!r} has kernel {tuple(b_shape[2:])}; only 1×1 up convs mix")
        _check_shape(base_ckpt, key, (b_shape[0], *a_shape[1:]), file, slot["A"])
        rank = int(a_shape[0])
        target = _Target(slot["A"], slot["B"], slot.get("alpha"), rank, None)
        meta = _component_metadata(metadata, component, fmt)
        if meta is not None:
            _check_config(file, {"peft_type": "LORA", **meta})
            r = int(_pattern_value(meta.get("rank_pattern"), module, meta.get("r", rank)))
            if r != rank:
                raise SoupsError(f"LoRA {file}: tensor {slot['A']!r} has rank {rank} but the metadata says r={r}")
            target.alpha = float(_pattern_value(meta.get("alpha_pattern"), module, meta.get("lora_alpha", r)))
            target.rslora = bool(meta.get("use_rslora", False))
            alpha_sources.add(f"{METADATA_KEY} header metadata")
        elif slot.get("alpha"):
            alpha_sources.add("alpha tensors")
        else:
            alpha_sources.add("none recorded: alpha = rank (scale 1), as diffusers assumes")
        targets[(component, key)] = target
    return DiffusersExpert(path, "lora", fmt, recorded, ckpt, targets, "; ".join(sorted(alpha_sources)))


def _component_metadata(metadata: Mapping[str, Any] | None, component: str, fmt: str) -> dict[str, Any] | None:
    """The LoRA config of one component from the header metadata (prefixed `unet.r`…, or unprefixed `r`…)."""
    if not metadata:
        return None
    if fmt == "diffusers-unprefixed" and "r" in metadata:
        return dict(metadata)
    prefix = f"{component}."
    own = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
    return own or None


# ----------------------------------------------------------------------------------------------------------
# compatibility (headers only)
# ----------------------------------------------------------------------------------------------------------


def _same(x: str | None, y: str | None) -> bool:
    if x is None or y is None:
        return True
    px, py = Path(x), Path(y)
    if px.exists() and py.exists():
        return px.resolve() == py.resolve()
    return x.rstrip("/") == y.rstrip("/")


def read_experts(paths: Sequence[str | Path], base: str | Path | None = None) -> tuple[list[DiffusersExpert], Path]:
    """Reads every expert's headers and checks that they can be mixed on one base, before any weight is read.

    The base is `base`, else the experts' recorded base; experts recording different bases are refused, naming
    both, and so are LoRA tensors or UNet weights whose shapes do not fit the base UNet.

    Returns:
        (the experts, the base pipeline dir).

    Raises:
        SoupsError: naming the two experts (different recorded bases, LoRA and full UNets mixed) or the
            offending file and tensor (shapes).
    """
    if isinstance(paths, str | Path) or not paths:
        raise SoupsError(f"experts must be a non-empty list of paths, got {paths!r}")
    metas = [(Path(p), _read_meta(Path(p)) if Path(p).is_dir() else {}) for p in paths]
    recorded = [str(p.resolve()) if not m and (p / PIPELINE_FILE).is_file()
                else _resolve_recorded_base(m.get("base"), p if p.is_dir() else p.parent) for p, m in metas]
    first = next(((p, b) for (p, _), b in zip(metas, recorded) if b), None)
    if first is not None:
        for (p, _), b in zip(metas, recorded):
            if b and not _same(b, first[1]):
                raise SoupsError(f"experts {first[0]} and {p} have different base pipelines ({first[1]} vs {b}); "
                                 "only experts fine-tuned from one base UNet can be mixed")  # fmt: skip
    chosen = base if base is not None else (first[1] if first is not None else None)
    if chosen is None:
        raise SoupsError(f"expert {paths[0]} records no base pipeline; pass base=<diffusers pipeline dir>")
    base_dir = resolve_pipeline(chosen)
    experts = [read_expert(p, base_dir) for p in paths]
    kinds = {e.kind for e in experts}
    if len(kinds) > 1:
        odd = next(e for e in experts if e.kind != experts[0].kind)
        raise SoupsError(f"experts {experts[0].path} ({experts[0].kind}) and {odd.path} ({odd.kind}) are of different "
                         "kinds; mix LoRA experts together, or full UNets together")  # fmt: skip
    if experts[0].kind != "lora":
        ref, _ = _component_checkpoint(base_dir / "unet")
        for e in experts:
            extra = sorted(set(e.checkpoint.keys()) ^ set(ref.keys()))
            if extra:
                raise SoupsError(f"expert {e.path} and base {base_dir} have different UNets: tensor {extra[0]!r} is in "
                                 "only one of them")  # fmt: skip
            for key in ref.keys():
                if tuple(e.checkpoint.shape(key)) != tuple(ref.shape(key)):
                    raise SoupsError(f"expert {e.path} and base {base_dir} have different UNets: tensor {key!r} is "
                                     f"{list(e.checkpoint.shape(key))} vs {list(ref.shape(key))}")  # fmt: skip
    return experts, base_dir


def check_compatible(paths: list[str]) -> dict[str, Any]:
    """The `diffusers` checkpoint kind's check (soups.pareto), before any weight is read.

    Returns:
        {"kind": "diffusers_lora" | "diffusers_unet" | "diffusers_pipeline", "base": the base pipeline dir}.

    Raises:
        SoupsError: experts on different bases (naming both), shapes that do not fit the base UNet, or
            text-encoder LoRA tensors (the front mixes the UNet only; named).
    """
    experts, base_dir = read_experts(paths, None)
    for e in experts:
        te = next(((c, k) for c, k in e.targets if c != "unet"), None)
        if te is not None:
            raise SoupsError(f"expert {e.path} adapts the {te[0]} (weight {te[1]!r}); the front's resident model is "
                             "the UNet only: mix it with python -m soups.mix instead")  # fmt: skip
    return {"kind": f"diffusers_{experts[0].kind}", "base": str(base_dir)}


def is_diffusers_mix(experts: Sequence[str | Path], base: str | Path | None) -> bool:
    """Whether `soups.mix` should take the diffusers path: an expert with `soups_expert.json` or `model_index.json`,
    or a `base` that is a diffusers pipeline directory. Reads no weights, imports no diffusers."""
    if base is not None and (Path(str(base)).expanduser() / PIPELINE_FILE).is_file():
        return True
    for p in experts:
        p = Path(str(p)).expanduser()
        if p.is_dir() and ((p / EXPERT_FILE).is_file() or (p / PIPELINE_FILE).is_file()):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# soups.mix: merged pipeline or concatenated adapter
# ----------------------------------------------------------------------------------------------------------


class _Stream:
    """(key, tensor) pairs with `specs` announced up front, so `soups.writer` streams them to disk."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], produce: Any) -> None:
        self.specs = specs
        self._produce = produce

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.specs:
            yield key, self._produce(key)


def _finite_or_raise(tensor: torch.Tensor, key: str) -> torch.Tensor:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise SoupsError(f"mixed tensor {key!r} has non-finite values; refusing to save NaN weights")
    return tensor


def _write_component(
    directory: Path, stream: Any, stem: str, max_shard_size: int | str, progress: bool
) -> tuple[int, int]:
    """Streams one component's tensors into `directory` as `<stem>.safetensors` (sharded with an index when large)."""
    from tqdm.auto import tqdm

    from soups.cli import bar_disabled
    from soups.writer import _finalise_shards, _Spec, _write_planned, parse_size

    directory.mkdir(parents=True, exist_ok=True)
    specs = [_Spec(k, tuple(shape), dtype) for k, (shape, dtype) in stream.specs.items()]
    with tqdm(total=len(specs), desc=f"{directory.name} tensors", unit="tensor", disable=bar_disabled(progress)) as bar:
        written = _write_planned(directory, iter(stream), specs, parse_size(max_shard_size), bar)
    return sum(len(k) for _, k in written), _finalise_shards(directory, written, stem, sharded=True)


def _link_tree(source: Path, destination: Path, skip_dirs: set[str]) -> tuple[list[str], list[str]]:
    """Hard-links (else copies) every file of `source` into `destination`; in `skip_dirs` only non-weight files.

    Returns:
        (linked files, copied files), relative paths.
    """
    linked, copied = [], []
    for file in sorted(source.rglob("*")):
        rel = file.relative_to(source)
        if file.is_dir() or any(part.startswith(".") for part in rel.parts) or rel.name in ("soup.json", "config.yaml"):
            continue
        if rel.parts[0] in skip_dirs and (len(rel.parts) != 2 or rel.suffix != ".json" or ".safetensors" in rel.name):
            continue  # a merged component: its config only, never its (unmixed) weights or their variants
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file.resolve(), target)
            linked.append(str(rel))
        except OSError:
            shutil.copy2(file.resolve(), target)
            copied.append(str(rel))
    return linked, copied


def _provenance(experts: Sequence[DiffusersExpert], weights: Sequence[float], base_dir: Path, mode: str,
                extra: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """soup.json for a diffusers soup: the same fields as `soups.writer` writes for text soups."""
    import importlib.metadata as md

    from soups.writer import _ingredient_record, _library_versions

    versions = _library_versions()
    try:
        versions["diffusers"] = md.version("diffusers")
    except md.PackageNotFoundError:
        pass
    ingredients = []
    for e, w in zip(experts, weights):
        record = _ingredient_record(e.checkpoint, float(w))
        record.update(path=str(e.path), kind=f"diffusers_{e.kind}", format=e.fmt)
        if e.kind == "lora":
            record.update(alpha_source=e.alpha_source, ranks=sorted({t.rank for t in e.targets.values()}))
        ingredients.append(record)
    return {"format": "soups/1", "mode": mode, "weights": [float(w) for w in weights], "ingredients": ingredients,
            "base": str(base_dir), "config_source": str(base_dir), **extra, "versions": versions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def _union_factors(experts: Sequence[DiffusersExpert]) -> dict[tuple[str, str], list[LoraFactors | None]]:
    """(component, base key) -> expert i's factors or None, over the union of the experts' targets."""
    per_expert = [e.factors() for e in experts]
    for e, facs in zip(experts, per_expert):
        for (_, key), f in facs.items():
            for tensor, name in ((f.a, "A"), (f.b, "B")):
                if not bool(torch.isfinite(tensor.float()).all()):
                    raise SoupsError(f"LoRA {e.path}: the {name} factor of {key!r} holds NaN/Inf")
    names = list(dict.fromkeys(t for facs in per_expert for t in facs))
    return {t: [facs.get(t) for facs in per_expert] for t in names}


def _adapter_metadata(modules: Mapping[str, int]) -> dict[str, Any]:
    """peft LoRA config fields (for diffusers' header metadata) of a scale-1 adapter with the given per-module ranks."""
    ranks = list(modules.values())
    common = max(set(ranks), key=ranks.count)
    pattern = {re.escape(m): r for m, r in modules.items() if r != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(modules), "use_rslora": False, "use_dora": False, "lora_bias": False,
            "bias": "none"}  # fmt: skip


def mix_diffusers(
    experts: Sequence[str | Path],
    weights: Sequence[float] | None,
    output: str | Path,
    *,
    base: str | Path | None = None,
    lora_output: str | None = None,
    lora_mode: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_extrapolation: bool = False,
    max_shard_size: int | str = "2GB",
    resolved_config: Any = None,
    progress: bool = True,
) -> Path:
    """Mixes diffusers experts and writes the soup atomically (see the module docstring).

    Args:
        experts: LoRA experts (any of the three formats) or full-UNet experts, all on one base.
        weights: λ, one per expert; None = uniform.
        output: The directory to write (never an ingredient or the base).
        base: The base pipeline (dir or Hub id); default: the experts' recorded base.
        lora_output: LoRA only: "merged" (a full pipeline dir; the default) or "adapter" (rank-Σr LoRA).
        lora_mode: LoRA only: "delta" (the exact mix; the default) — "ab" is refused for diffusers LoRA.
        dtype: Floating dtype of the written weights; default: the base's (merged) or float32 (adapter).
        device: Where full UNets are accumulated (`soups.interpolate`); LoRA mixes run on CPU.
        overwrite: Replace an existing soup.
        allow_extrapolation: Accept λ off the simplex.
        max_shard_size: Largest safetensors shard of a merged component.
        resolved_config: A config saved beside the soup as config.yaml.
        progress: tqdm bars over tensors.

    Returns:
        The output path.

    Raises:
        SoupsError: bad λ or options, incompatible experts, unsupported tensors, NaN results (nothing is written).
    """
    from soups.interpolate import interpolate, parse_dtype, validate_weights
    from soups.utils import atomic_dir, save_resolved_config, write_json
    from soups.writer import check_output_path

    if lora_mode not in (None, "delta"):
        raise SoupsError(f"lora_mode={lora_mode!r}: diffusers LoRA experts are mixed exactly (delta) only; averaging "
                         "their A and B factors separately is not the mix Σλ_i s_i B_i A_i")  # fmt: skip
    if lora_output not in (None, "merged", "adapter"):
        raise SoupsError(f"lora_output must be 'merged' or 'adapter', got {lora_output!r}")
    found, base_dir = read_experts(experts, base)
    n = len(found)
    lam = validate_weights(weights if weights is not None else [1.0 / n] * n, n, allow_extrapolation)
    out_dtype = parse_dtype(dtype)
    kind = found[0].kind
    if kind == "pipeline":
        raise SoupsError(f"expert {found[0].path} is a whole pipeline; soups.mix mixes LoRA experts or full-UNet "
                         f"experts ({EXPERT_FILE} kind diffusers_unet) on one base")  # fmt: skip
    if kind == "unet" and lora_output is not None:
        raise SoupsError(f"lora_output={lora_output} applies to LoRA experts; {found[0].path} is a full UNet")
    out = check_output_path(output, [e.path for e in found] + [base_dir])
    fmt = lora_output or "merged"
    extra: dict[str, Any] = {}

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if kind == "lora" and fmt == "adapter":
            # ---- rank-Σr LoRA: A_cat = vstack(A_i), B_cat = hstack(λ_i s_i B_i), scale 1 ------------------------
            mixed = _union_factors(found)
            tensors: dict[str, torch.Tensor] = {}
            ranks: dict[str, dict[str, int]] = {}
            for (component, key), facs in mixed.items():
                present = [(f, w) for f, w in zip(facs, lam) if f is not None]
                a, b = concat_factors([f.a for f, _ in present], [f.b for f, _ in present],
                                      [f.scale for f, _ in present], [w for _, w in present])  # fmt: skip
                module = key[: -len(".weight")]
                store = out_dtype or torch.float32
                tensors[f"{component}.{module}.lora_A.weight"] = _finite_or_raise(a, key).to(store).contiguous()
                tensors[f"{component}.{module}.lora_B.weight"] = _finite_or_raise(b, key).to(store).contiguous()
                ranks.setdefault(component, {})[module] = int(a.shape[0])
            metadata = {f"{c}.{k}": v for c, mods in ranks.items() for k, v in _adapter_metadata(mods).items()}
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / LORA_FILE), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})
            write_json(tmp / EXPERT_FILE, {"kind": "diffusers_lora", "base": str(base_dir), "soup": True})
            extra.update(files="diffusers-lora", tensors=len(tensors), bytes=(tmp / LORA_FILE).stat().st_size,
                         lora={"mode": "delta", "output_format": "adapter",
                               "ranks": {c: sorted(set(m.values())) for c, m in ranks.items()},
                               "modules": sum(len(m) for m in ranks.values())})  # fmt: skip
            mode = "diffusers-lora-delta"
        else:
            # ---- a full pipeline: mixed components streamed, the rest linked from the base -----------------------
            if kind == "lora":
                mixed = _union_factors(found)
                components = sorted({c for c, _ in mixed})
            else:
                components = ["unet"]
            linked, copied = _link_tree(base_dir, tmp, set(components))
            n_tensors = n_bytes = 0
            for component in components:
                base_ckpt, stem = _component_checkpoint(base_dir / component)
                if kind == "lora":
                    own = {key: facs for (c, key), facs in mixed.items() if c == component}
                    specs = {}
                    for key in base_ckpt.keys():
                        src = base_ckpt.dtype(key)
                        specs[key] = (base_ckpt.shape(key), out_dtype if (out_dtype and src.is_floating_point) else src)

                    def produce(key: str, own: Any = own, base_ckpt: Any = base_ckpt, specs: Any = specs) -> Any:
                        tensor = base_ckpt.get_tensor(key)
                        if key in own:
                            tensor = merged_weight(tensor, own[key], lam)
                        return _finite_or_raise(tensor, key).to(specs[key][1]).contiguous()

                    stream: Any = _Stream(specs, produce)
                else:
                    stream = interpolate([e.checkpoint for e in found], lam, allow_extrapolation=allow_extrapolation,
                                         dtype=out_dtype, device=device)  # fmt: skip
                count, size = _write_component(tmp / component, stream, stem, max_shard_size, progress)
                n_tensors, n_bytes = n_tensors + count, n_bytes + size
            extra.update(files="diffusers-pipeline", components=components, tensors=n_tensors, bytes=n_bytes,
                         linked_files=linked, copied_files=copied)  # fmt: skip
            if kind == "lora":
                extra["lora"] = {"mode": "delta", "output_format": "merged", "modules": len(mixed)}
            mode = "diffusers-lora-delta-merged" if kind == "lora" else "diffusers-unet-linear"
        extra["dtype"] = str(out_dtype).removeprefix("torch.") if out_dtype is not None else "source"
        write_json(tmp / "soup.json", _provenance(found, lam, base_dir, mode, extra))
        if resolved_config is not None:
            save_resolved_config(resolved_config, tmp)
    return out


# ----------------------------------------------------------------------------------------------------------
# soups.pareto: the resident UNet
# ----------------------------------------------------------------------------------------------------------


class _LoraDeltaGroup:
    """The targeted weights of a resident UNet, set in place to W0 + Σ λ_i s_i B_i A_i by `apply(λ)`.

    Duck-types the `Soup`'s flat groups (`apply(lam)`), so `Soup.set_weights` drives it. W0 is kept in float32
    for the targeted weights only; `merged_weight` is the function the merged soup is written with.
    """

    def __init__(self, slots: list[tuple[nn.Parameter, torch.Tensor, list[LoraFactors | None]]]) -> None:
        self.slots = slots  # (parameter, W0 float32, per-expert factors on the parameter's device)

    def apply(self, lam: torch.Tensor) -> None:
        weights = lam.tolist()
        for param, w0, facs in self.slots:
            param.data.copy_(merged_weight(w0, facs, weights).to(param.dtype))


def build_resident_model(path: str | Path, base: str | Path | None = None) -> nn.Module:
    """The resident module of a diffusers expert: its base pipeline's `UNet2DConditionModel` (for a full-UNet
    expert or a pipeline dir, the UNet class built from its own config; weights come from the Soup)."""
    from diffusers import UNet2DConditionModel

    expert = read_expert(path, base)
    if expert.kind == "lora":
        chosen = base if base is not None else expert.base
        if chosen is None:
            raise SoupsError(f"expert {path} records no base pipeline; set base_model=<diffusers pipeline dir>")
        return UNet2DConditionModel.from_pretrained(resolve_pipeline(chosen), subfolder="unet").eval()
    config = UNet2DConditionModel.load_config(expert.checkpoint.config_dir or expert.path / "unet")
    return UNet2DConditionModel.from_config(config).eval()


def open_soup(
    paths: Sequence[str],
    *,
    base_model: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_extrapolation: bool = False,
) -> Any:
    """The resident `Soup` of diffusers experts; `soup.model` is a plain `UNet2DConditionModel`.

    Args:
        paths: LoRA experts, full-UNet experts, or pipeline dirs (their UNets), on one base.
        base_model: The base pipeline; default: the experts' recorded base.
        device: Where the UNet (and the experts' factors or weights) live.
        dtype: The UNet's dtype; the LoRA mix is computed in float32 and cast.
        allow_extrapolation: Accept λ off the simplex in `set_weights`.

    Raises:
        SoupsError: as `check_compatible`, plus a text-encoder LoRA (named).
    """
    from soups.soup import Soup

    experts, base_dir = read_experts(paths, base_model)
    dev = torch.device(device)
    if experts[0].kind != "lora":
        unet = build_resident_model(experts[0].path)
        if dtype is not None:  # nn.Module.to: diffusers' own .to warns about fp32-kept modules on every cast
            nn.Module.to(unet, dtype=dtype)
        return Soup.from_checkpoints([e.checkpoint.path for e in experts], model=unet, device=dev, progress=False,
                                     allow_extrapolation=allow_extrapolation)  # fmt: skip
    unet = build_resident_model(experts[0].path, base_dir)
    nn.Module.to(unet, device=dev, dtype=dtype) if dtype is not None else nn.Module.to(unet, device=dev)
    mixed = _union_factors(experts)
    params = dict(unet.named_parameters())
    base_ckpt, _ = _component_checkpoint(base_dir / "unet")
    slots = []
    for (component, key), facs in mixed.items():
        if component != "unet":
            raise SoupsError(f"LoRA expert adapts the {component} ({key!r}); the resident model is the UNet only")
        if key not in params:
            raise SoupsError(f"LoRA weight {key!r} has no parameter in the resident UNet")
        w0 = base_ckpt.get_tensor(key).float().to(dev)
        facs = [None if f is None else LoraFactors(f.a.to(dev), f.b.to(dev), f.alpha, f.scale) for f in facs]
        slots.append((params[key], w0, facs))
    soup = Soup(unet, [e.path for e in experts], [_LoraDeltaGroup(slots)], [], allow_extrapolation)  # type: ignore[list-item]
    soup.set_weights([1.0 / len(experts)] * len(experts))
    return soup


def _all_pipelines(paths: Sequence[str | Path]) -> bool:
    return all(Path(p).is_dir() and (Path(p) / PIPELINE_FILE).is_file() and not (Path(p) / EXPERT_FILE).is_file()
               for p in paths)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# strict LoRA loading into a model
# ----------------------------------------------------------------------------------------------------------


def load_lora_strict(model: nn.Module, path: str | Path, *, prefix: str | None = "unet",
                     adapter_name: str = "default") -> list[str]:  # fmt: skip
    """`model.load_lora_adapter(file, prefix=…)` (diffusers), then a check that every tensor of the file landed.

    diffusers keeps only the keys under `prefix.` and, when there are none, loads nothing and says nothing (the
    default prefix is wrong for the unprefixed file `unet.save_lora_adapter` writes). Here that is an error naming
    the file, and so is any tensor that did not arrive in the model with its value.

    Args:
        model: A diffusers model with peft support (e.g. `UNet2DConditionModel`).
        path: A LoRA expert dir or its `.safetensors` file.
        prefix: The component prefix of the keys ("unet"), or None for unprefixed keys.
        adapter_name: The adapter's name in the model.

    Returns:
        The loaded keys (as in the file).

    Raises:
        SoupsError: no key under `prefix`, or a tensor that did not land (named).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    file = _lora_file(Path(path)) or Path(path)
    state = load_file(str(file))
    wanted = {k: v for k, v in state.items() if prefix is None or k.startswith(f"{prefix}.")}
    if not wanted:
        example = next(iter(state), None)
        raise SoupsError(f"LoRA {file}: none of its {len(state)} tensors is under prefix {prefix!r} (e.g. "
                         f"{example!r}); diffusers' load_lora_adapter would load nothing here, silently. "
                         "Unprefixed keys are what unet.save_lora_adapter writes: load them with prefix=None")
    model.load_lora_adapter(dict(state), prefix=prefix, adapter_name=adapter_name,  # type: ignore[operator]
                            metadata=_header_metadata(file))
    landed = get_peft_model_state_dict(model, adapter_name=adapter_name)
    for key, tensor in wanted.items():
        name = key[len(prefix) + 1 :] if prefix is not None else key
        got = landed.get(name)
        if got is None or tuple(got.shape) != tuple(tensor.shape) or not torch.equal(got.float().cpu(),
                                                                                      tensor.float()):
            what = "absent" if got is None else "a different value"
            raise SoupsError(f"LoRA {file}: tensor {key!r} did not land in {type(model).__name__} ({what}); "
                             "nothing may be dropped")
    return list(wanted)

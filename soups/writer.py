"""Atomic writer for soups: sharded safetensors + config/tokenizer files + `soup.json` provenance + model card.

`write_soup` produces a directory that `AutoModel*.from_pretrained` (`files="model"`) or
`PeftModel.from_pretrained` (`files="adapter"`) loads directly.

Why a hand-written safetensors writer instead of `safetensors.torch.save_file`: `save_file` needs the whole
shard as a dict of tensors in memory. When the tensor stream announces its specs up front (`interpolate` does,
through a `specs` attribute: ordered key -> (shape, dtype)), this writer plans the shards and their headers
before any tensor is computed and writes every tensor to its offset as soon as it arrives, so the output side
of a mix holds one tensor, never a shard. Streams without `specs` (any iterable of `(key, tensor)`) are
buffered one shard at a time. Files follow the safetensors format exactly (8-byte little-endian header
length, JSON header padded with spaces to 8 bytes, `__metadata__ = {"format": "pt"}`, contiguous data in
the canonical order: larger dtypes first, then by name, so every tensor is aligned); tests read them back with
`safe_open` and `from_pretrained`.

Safety: the output is built in a temporary directory beside `output` (`soups.utils.atomic_dir`) and renamed
at the end, so a failure (bad tensor, NaN, interrupted run) leaves nothing behind. The rename is exclusive: of
two runs writing one output at the same time, one publishes and the other fails naming it. An existing output
is replaced only with `overwrite=True`, and only if Soups wrote it (`.soups` marker or `soup.json`) or it is
empty; an output equal to, inside, or containing any ingredient (or the config source) is refused before
anything is written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from soups.checkpoint import TORCH_TO_SAFETENSORS, Checkpoint
from soups.cli import bar_disabled
from soups.utils import SoupsError, atomic_dir, save_resolved_config, write_json

__all__ = ["write_soup", "parse_size", "sha256_file", "check_output_path", "CONFIG_FILE_PATTERNS"]

#: Files copied from the config source into a soup (config, tokenizer, processor, generation files).
CONFIG_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor*.json",
    "feature_extractor*.json",
    "video_preprocessor_config.json",
    "chat_template.*",
    "brax_policy.json",  # a Brax policy's meta (rl.locomotion.models): the soup of Brax policies loads as one
)

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Parses a shard size like transformers does ("2GB" = 2e9 bytes, "500MiB" = 500 * 2**20, or an int).

    Raises:
        SoupsError: unparseable or non-positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _SIZE_UNITS:
            raise SoupsError(f"bad max_shard_size {size!r}: use e.g. 2GB, 500MB, 64MiB or a byte count")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise SoupsError(f"bad max_shard_size {size!r}: must be positive")
    return value


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_path(output: str | Path, protected: Iterable[str | Path]) -> Path:
    """Refuses an output equal to, inside, or containing any protected path (ingredients, config source).

    Returns:
        The resolved output path.

    Raises:
        SoupsError: naming the output and the ingredient it would clobber.
    """
    out = Path(output).expanduser().resolve()
    for item in protected:
        ing = Path(item).expanduser().resolve()
        if out == ing:
            raise SoupsError(f"output {out} is an ingredient; choose another output directory")
        if _is_within(out, ing):
            raise SoupsError(f"output {out} is inside ingredient {ing}; choose a directory outside it")
        if _is_within(ing, out):
            raise SoupsError(f"output {out} contains ingredient {ing}; writing there would destroy it")
    return out


# ----------------------------------------------------------------------------------------------------------
# safetensors shards
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Spec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _dtype_code(dtype: torch.dtype, key: str) -> str:
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise SoupsError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors") from None


class _ShardFile:
    """One safetensors file whose header is written first; tensors are then written at their offsets in any
    order. The layout is canonical (itemsize descending, then name), as `safetensors.torch.save_file` does."""

    def __init__(self, path: Path, specs: Sequence[_Spec]) -> None:
        self.path = path
        self.specs = {s.key: s for s in specs}
        ordered = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.key))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for spec in ordered:
            header[spec.key] = {"dtype": _dtype_code(spec.dtype, spec.key), "shape": list(spec.shape),
                                "data_offsets": [offset, offset + spec.nbytes]}
            self.offsets[spec.key] = offset
            offset += spec.nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.pending = set(self.specs)
        self.fh = path.open("wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.fh.truncate(self.data_start + self.data_bytes)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self.specs[key]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise SoupsError(
                f"tensor {key!r} arrived as {tuple(tensor.shape)} {tensor.dtype}, "
                f"announced as {spec.shape} {spec.dtype}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.fh.seek(self.data_start + self.offsets[key])
        if flat.numel():
            self.fh.write(memoryview(flat.view(torch.uint8).numpy()))
        self.pending.discard(key)

    def close(self) -> None:
        self.fh.close()
        if self.pending:
            raise SoupsError(f"{self.path.name}: tensor {sorted(self.pending)[0]!r} was announced but never produced")


def _plan_shards(specs: Sequence[_Spec], max_bytes: int) -> list[list[_Spec]]:
    """Greedy split in stream order: a shard closes when the next tensor would exceed `max_bytes`."""
    shards: list[list[_Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def _write_planned(directory: Path, stream: Iterator[tuple[str, torch.Tensor]], specs: Sequence[_Spec],
                   max_bytes: int, bar: tqdm) -> list[tuple[Path, list[str]]]:
    """Writes a stream whose specs are known: each tensor goes to disk as it arrives."""
    shards = _plan_shards(specs, max_bytes)
    owner = {spec.key: i for i, shard in enumerate(shards) for spec in shard}
    files = [_ShardFile(directory / f".shard-{i:05d}.safetensors", shard) for i, shard in enumerate(shards)]
    try:
        for key, tensor in stream:
            if key not in owner:
                raise SoupsError(f"tensor {key!r} was not announced in the stream's specs")
            files[owner[key]].write(key, tensor)
            del tensor  # on disk now; do not hold it while the stream computes the next one
            bar.update(1)
    finally:
        for f in files:
            f.fh.close()
    for f in files:
        f.close()
    return [(f.path, [s.key for s in shard]) for f, shard in zip(files, shards)]


def _write_buffered(directory: Path, stream: Iterable[tuple[str, torch.Tensor]], max_bytes: int,
                    bar: tqdm) -> list[tuple[Path, list[str]]]:
    """Writes a stream without specs, holding at most one shard in memory."""
    written: list[tuple[Path, list[str]]] = []
    buffer: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[str] = set()

    def flush() -> None:
        nonlocal buffer, size
        path = directory / f".shard-{len(written):05d}.safetensors"
        shard = _ShardFile(path, [_Spec(k, tuple(t.shape), t.dtype) for k, t in buffer.items()])
        try:
            for k, t in buffer.items():
                shard.write(k, t)
        finally:
            shard.close()
        written.append((path, list(buffer)))
        buffer, size = {}, 0

    for key, tensor in stream:
        if key in seen:
            raise SoupsError(f"tensor {key!r} appears twice in the stream")
        seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if buffer and size + nbytes > max_bytes:
            flush()
        buffer[key] = tensor.detach().to("cpu")
        size += nbytes
        bar.update(1)
    if buffer:
        flush()
    return written


def _finalise_shards(directory: Path, written: list[tuple[Path, list[str]]], stem: str, sharded: bool) -> int:
    """Renames temporary shards to HF names and writes the index when there are several; returns total bytes."""
    if not written:
        raise SoupsError("the soup has no tensors to write")
    total = 0
    weight_map: dict[str, str] = {}
    n = len(written)
    for i, (path, keys) in enumerate(written, start=1):
        name = f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        if n > 1 and not sharded:
            raise SoupsError(f"{stem} weights must fit in one file; raise max_shard_size")
        path.rename(directory / name)
        total += (directory / name).stat().st_size
        weight_map.update({k: name for k in keys})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / f"{stem}.safetensors.index.json", index)
    return total


# ----------------------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("soups", "torch", "safetensors", "transformers", "peft"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def _ingredient_record(ckpt: Checkpoint, weight: float) -> dict[str, Any]:
    return {
        "path": str(ckpt.path),
        "kind": ckpt.kind,
        "weight": weight,
        "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in ckpt.weight_files()],
    }


def _model_card(record: Mapping[str, Any], files: str) -> str:
    rows = "\n".join(
        f"| {i} | `{ing['path']}` | {ing['weight']:.6g} | {', '.join(f['sha256'][:12] for f in ing['files'])} |"
        for i, ing in enumerate(record["ingredients"])
    )
    loader = (
        "from peft import AutoPeftModelForCausalLM  # or PeftModel.from_pretrained(base, path)\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(path)"
        if files == "adapter"
        else "from transformers import AutoModel  # or the AutoModelFor... class of the ingredients\n"
        "model = AutoModel.from_pretrained(path)"
    )
    return (
        "---\ntags:\n- soups\n- merge\n- weight-interpolation\n---\n\n"
        f"# Soup ({record['mode']})\n\n"
        f"Weight interpolation θ = Σ λ_i θ_i of {len(record['ingredients'])} ingredients, made with "
        f"[Soups](https://github.com/) on {record['created']}.\n\n"
        "| # | ingredient | λ | sha256 (first 12) |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"{record['tensors']} tensors, {record['bytes']} bytes. Full provenance (sha256, library versions) in "
        "`soup.json`.\n\n"
        f"```python\npath = '.'\n{loader}\n```\n"
    )


def _copy_config_files(source: Path, destination: Path, skip: set[str]) -> list[str]:
    copied: list[str] = []
    for pattern in CONFIG_FILE_PATTERNS:
        for file in sorted(source.glob(pattern)):
            if file.is_file() and file.name not in skip and file.name not in copied:
                shutil.copy2(file, destination / file.name)
                copied.append(file.name)
    return copied


# ----------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------


def write_soup(
    output: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    ingredients: Sequence[Checkpoint],
    weights: Sequence[float],
    mode: str,
    config_source: Path | None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    extra_metadata: Mapping[str, Any] | None = None,
    files: str = "model",
    adapter_config: Mapping[str, Any] | None = None,
    resolved_config: Any = None,
    progress: bool = True,
) -> Path:
    """Writes a soup atomically as an HF checkpoint (or PEFT adapter) with provenance.

    Args:
        output: The target directory (created; must not exist unless `overwrite`).
        tensors: `(key, tensor)` pairs, consumed once. If the object has a `specs` mapping
            key -> (shape, dtype) in stream order (as returned by `soups.interpolate.interpolate`), every tensor
            is written to disk as soon as it arrives; otherwise at most one shard is buffered.
        ingredients: The experts mixed (recorded in soup.json with the sha256 of each weight file).
        weights: λ, one per ingredient.
        mode: A short description of the mix ("linear", "lora-delta", "lora-ab", ...).
        config_source: Directory whose config/tokenizer/processor/generation files are copied
            (usually the first ingredient's `config_dir`; for LoRA merges, the base model); None copies nothing.
        overwrite: Replace an existing `output`.
        max_shard_size: Largest shard, e.g. "2GB" (10^9 bytes) or "500MiB" or an int byte count.
        extra_metadata: Extra JSON-able fields recorded in soup.json (e.g. LoRA details).
        files: "model" writes `model*.safetensors` (+ index when sharded); "adapter" writes a single
            `adapter_model.safetensors` and `adapter_config.json` (from `adapter_config`).
        adapter_config: The adapter config to write; required when `files="adapter"`.
        resolved_config: A Hydra/OmegaConf config (or dict) saved as `config.yaml` beside the weights.
        progress: Show a tqdm bar over tensors.

    Returns:
        The absolute path of the written soup.

    Raises:
        SoupsError: output exists (without overwrite) or is not a Soups output (with it), clashes with an
            ingredient, another run published it first, bad arguments, or a tensor failed while streaming
            (nothing is left behind).
    """
    if files not in ("model", "adapter"):
        raise SoupsError(f"files must be 'model' or 'adapter', got {files!r}")
    if files == "adapter" and adapter_config is None:
        raise SoupsError("files='adapter' needs adapter_config")
    if len(weights) != len(ingredients):
        raise SoupsError(f"{len(weights)} weights recorded for {len(ingredients)} ingredients")
    protected = [c.path for c in ingredients] + ([config_source] if config_source is not None else [])
    out = check_output_path(output, protected)
    if out.exists() and not out.is_dir():
        raise SoupsError(f"output {out} exists and is a file, not a directory")
    max_bytes = parse_size(max_shard_size)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        # ---- weights: streamed shard by shard --------------------------------------------------------------
        raw_specs = getattr(tensors, "specs", None)
        total_tensors = len(raw_specs) if raw_specs is not None else None
        with tqdm(total=total_tensors, desc="soup tensors", unit="tensor", disable=bar_disabled(progress)) as bar:
            if raw_specs is not None:
                specs = [_Spec(k, tuple(shape), dtype) for k, (shape, dtype) in raw_specs.items()]
                written = _write_planned(tmp, iter(tensors), specs, max_bytes, bar)
            else:
                written = _write_buffered(tmp, tensors, max_bytes, bar)
        stem = "adapter_model" if files == "adapter" else "model"
        n_tensors = sum(len(keys) for _, keys in written)
        total_bytes = _finalise_shards(tmp, written, stem, sharded=files == "model")

        # ---- config, tokenizer, processor, generation files ------------------------------------------------
        skip = {"config.json", "adapter_config.json"} if files == "adapter" else {"adapter_config.json"}
        copied = _copy_config_files(Path(config_source), tmp, skip) if config_source is not None else []
        if files == "adapter":
            write_json(tmp / "adapter_config.json", dict(adapter_config or {}))
        if resolved_config is not None:
            save_resolved_config(resolved_config, tmp)

        # ---- provenance: soup.json and model card -----------------------------------------------------------
        record: dict[str, Any] = {
            "format": "soups/1",
            "mode": mode,
            "weights": [float(w) for w in weights],
            "ingredients": [_ingredient_record(c, float(w)) for c, w in zip(ingredients, weights)],
            "config_source": str(config_source) if config_source is not None else None,
            "copied_files": copied,
            "files": files,
            "tensors": n_tensors,
            "bytes": total_bytes,
            "versions": _library_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if extra_metadata:
            clashes = sorted(set(extra_metadata) & set(record))
            if clashes:
                raise SoupsError(f"extra_metadata field {clashes[0]!r} clashes with a soup.json field")
            record.update(extra_metadata)
        write_json(tmp / "soup.json", record)
        (tmp / "README.md").write_text(_model_card(record, files))
    return out

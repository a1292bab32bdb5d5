"""What every trainer needs, whatever it trains: checkpoints that cannot go bad, exact resume, metrics, guards.

Written for trainers that are not torch (the Brax trainer is jax): the checkpoint layer takes plain things, a
JSON-able state dict, named arrays (numpy or torch) stored as safetensors, and opaque files written by a
callback. Torch-only parts (the torch RNG, optimizer state) sit behind small functions and are optional.

Checkpoint layout under a trainer's `checkpoints/` root:

    step-XXXXXX/
        trainer_state.json      the JSON-able state (step, controllers, normalisers, ...)
        <name>.safetensors      one file per entry of `arrays` (e.g. value_head.safetensors)
        ...                     whatever `write_files` wrote (a PEFT adapter dir, per-process optimizer files)
        config.yaml             the resolved config
        manifest.json           written last: size and sha256 of every other file
    broken-step-XXXXXX/         a checkpoint that failed validation at resume, set aside (kept for inspection)

A checkpoint is written in a temporary directory beside its final name, flushed to disk, and renamed into place,
so a kill leaves either the complete checkpoint or none. A checkpoint with a non-finite array is never written;
on resume every checkpoint is validated as a whole (manifest, JSON, safetensors, finiteness, plus a trainer's own
check of its opaque files) and the newest valid one is used.

The reward scalarisation (MORL weights Σ μ_i R_i, running normalisation, finiteness checks) lives in
`rl.text.rewards` and is re-exported here so every trainer takes it from one place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rl.text.rewards import RewardSet, RunningNormalizer, build_reward_set, check_finite, morl_weights, scalarize
from soups.cli import bar_disabled
from soups.utils import SOUPS_MARKER, SoupsError, atomic_dir, save_resolved_config, write_json

__all__ = [
    "RewardSet", "RunningNormalizer", "build_reward_set", "check_finite", "morl_weights", "scalarize",
    "SoupsError", "save_resolved_config",
]  # fmt: skip

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")


# ----------------------------------------------------------------------------------------------------------
# Config validation (small checks a trainer's `validate_config` is made of)
# ----------------------------------------------------------------------------------------------------------


def check_number(
    key: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, integer: bool = False,
) -> None:  # fmt: skip
    """Raises `SoupsError` naming `key`, `value` and the valid range unless `value` is a finite number in it.

    Args:
        key: The config key, as the user types it (e.g. "ppo.lr").
        value: The configured value.
        low: Lower bound (None = unbounded).
        high: Upper bound (None = unbounded).
        low_open: Exclude `low` itself.
        high_open: Exclude `high` itself.
        integer: The value must be an integer.
    """
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    valid = f"{left}{'-inf' if low is None else _fmt(low)}, {'inf' if high is None else _fmt(high)}{right}"
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SoupsError(f"{key}={value!r} must be {kind} in {valid}")
    if integer and not float(value).is_integer():
        raise SoupsError(f"{key}={value!r} must be {kind} in {valid}")
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise SoupsError(f"{key}={value!r} must be {kind} in {valid}")


def check_choice(key: str, value: Any, options: Iterable[Any]) -> None:
    """Raises `SoupsError` naming `key`, `value` and the valid options unless `value` is one of them."""
    options = list(options)
    if value not in options:
        raise SoupsError(f"{key}={value!r} is not valid; valid options: {', '.join(str(o) for o in options)}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ----------------------------------------------------------------------------------------------------------
# Output directory
# ----------------------------------------------------------------------------------------------------------


def prepare_run_dir(out: Path, outputs: Sequence[Path], *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuses to start a new run over an existing one unless `overwrite`, which deletes its `outputs`.

    Args:
        out: The run's output directory (named in the error).
        outputs: What a run writes there (files or directories); any of them existing means a run is there.
        resume: The run continues the existing one: nothing is checked or deleted.
        overwrite: Delete the existing outputs instead of refusing.
        is_main: Only the main process deletes.
    """
    if resume or not any(p.exists() for p in outputs):
        return
    if not overwrite:
        raise SoupsError(f"output_dir {out} already holds a run; pass resume=true to continue it or "
                         "overwrite=true to start again")
    if is_main:
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Finiteness
# ----------------------------------------------------------------------------------------------------------


def named_arrays(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, array) for every numpy array or torch tensor in nested dicts/lists (e.g. an optimizer
    `state_dict()`); scalars and strings are skipped."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from named_arrays(value, f"{prefix}{key}.")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from named_arrays(value, f"{prefix}{i}.")
    elif isinstance(obj, np.ndarray) or hasattr(obj, "detach"):
        yield prefix.rstrip("."), obj


def check_torch_file(path: Path) -> None:
    """Validates a checkpoint's torch file (optimizer, scheduler, RNG states): it loads with `weights_only=True`
    and its tensors are finite. Other files pass; for `newest_valid_checkpoint(root, check_torch_file)`.

    Raises:
        SoupsError: the file does not load, or holds a NaN/inf.
    """
    if path.suffix != ".pt":
        return
    import pickle

    import torch  # torch trainers only: the jax trainers never write .pt files

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise SoupsError(f"{path} does not load: {' '.join(str(err).split())[:200]}") from err
    bad = nonfinite(obj)
    if bad:
        raise SoupsError(f"{path} has non-finite values in {', '.join(bad[:3])}")


def nonfinite(arrays: Mapping[str, Any] | Any) -> list[str]:
    """Names of the floating arrays (numpy or torch, nested anywhere in `arrays`) that hold a NaN or an inf."""
    bad = []
    for name, array in named_arrays(arrays):
        if hasattr(array, "detach"):  # torch: reduce on the array's own device, move one bool
            import torch

            if array.is_floating_point() or array.is_complex():
                if not bool(torch.isfinite(array.detach()).all()):
                    bad.append(name)
        elif np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            bad.append(name)
    return bad


def stop_error(root: Path, step: int, reason: str) -> SoupsError:
    """The error a trainer raises when training went non-finite: names the step and the last good checkpoint.

    Every checkpoint on disk is finite (`save_checkpoint` refuses otherwise), so the newest one is intact.
    """
    last = latest_checkpoint(root)
    return SoupsError(f"step {step}: {reason}; stopping. Last good checkpoint (intact): "
                      f"{last if last is not None else 'none yet'}")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: save, list, validate, load, prune
# ----------------------------------------------------------------------------------------------------------


def checkpoint_dir(root: Path, step: int) -> Path:
    """`root/step-XXXXXX` (zero-padded, so names sort like steps)."""
    return Path(root) / f"step-{int(step):06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint directory name (`step-000012` -> 12); None for anything else."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (named `step-N`, with a trainer_state.json), oldest first.

    Temporary directories of an interrupted write and set-aside `broken-step-N` ones do not count.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root` (not validated: see `newest_valid_checkpoint`)."""
    done = list_checkpoints(root)
    return done[-1] if done else None


def save_checkpoint(
    root: Path, step: int, *, state: Mapping[str, Any], arrays: Mapping[str, Mapping[str, Any]] | None = None,
    write_files: Callable[[Path], None] | None = None, config: Any = None,
) -> Path:  # fmt: skip
    """Writes `root/step-XXXXXX` atomically and returns it; replaces an existing checkpoint of that step.

    Args:
        root: The checkpoints directory.
        step: The step the checkpoint ends.
        state: JSON-able trainer state (saved as trainer_state.json; "step" is set to `step`). NaN is refused.
        arrays: {file stem: {tensor name: numpy array or torch tensor}}, each saved as `<stem>.safetensors`.
        write_files: Called with the temporary directory to write opaque files (a framework's own formats).
        config: A resolved config (OmegaConf or dict) saved as config.yaml; None saves none.

    Raises:
        SoupsError: an array is not finite, or the state is not JSON-able or holds NaN/inf. Nothing is written.
    """
    target = checkpoint_dir(root, step)
    for stem, tensors in (arrays or {}).items():
        bad = nonfinite(tensors)
        if bad:
            raise SoupsError(f"not saving checkpoint {target}: {stem} has non-finite values in {', '.join(bad[:3])}")
    state = {**state, "step": int(step)}
    try:
        json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise SoupsError(f"not saving checkpoint {target}: the trainer state is not finite JSON ({err})") from err
    with atomic_dir(target, overwrite=True) as tmp:
        if write_files is not None:
            write_files(tmp)
        for stem, tensors in (arrays or {}).items():
            save_arrays(tmp / f"{stem}.safetensors", tensors)
        if config is not None:
            save_resolved_config(config, tmp)
        write_json(tmp / STATE_FILE, state)
        write_json(tmp / MANIFEST_FILE, {"files": _describe_files(tmp)})
        _fsync_tree(tmp)  # on disk before the rename makes the checkpoint visible
    return target


def save_arrays(path: Path, tensors: Mapping[str, Any]) -> None:
    """Saves named numpy arrays or torch tensors (not mixed) as one safetensors file."""
    if any(hasattr(t, "detach") for t in tensors.values()):
        from safetensors.torch import save_file as save_torch

        save_torch({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    else:
        from safetensors.numpy import save_file as save_numpy

        save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def load_arrays(path: Path, framework: str = "numpy") -> dict[str, Any]:
    """Loads a safetensors file as numpy arrays (`framework="numpy"`) or torch tensors (`"pt"`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework=framework) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a Mapping)


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def validate_checkpoint(path: Path, check_file: Callable[[Path], None] | None = None) -> None:
    """Checks a checkpoint as a whole; raises `SoupsError` naming the first problem.

    In order: trainer_state.json is a JSON object with an integer step; every file the manifest lists exists
    with its recorded size and sha256 (checkpoints written before manifests skip this); every safetensors file
    is complete and finite; `check_file` accepts every other file it is given (a trainer's own formats, e.g.
    torch optimizer files). Checkpoints written before manifests are validated by the last two checks alone.

    Args:
        path: The checkpoint directory.
        check_file: Called on each file that is neither JSON, YAML nor safetensors; raises on a bad one.
    """
    path = Path(path)
    try:
        state = load_state(path)
    except (OSError, ValueError) as err:
        raise SoupsError(f"{path / STATE_FILE} is unreadable: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise SoupsError(f"{path / STATE_FILE} has no integer 'step'")
    manifest = path / MANIFEST_FILE
    if manifest.exists():
        try:
            listed = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SoupsError(f"{manifest} is unreadable: {err}") from err
        for rel, meta in listed.items():  # sizes first: truncation is the common damage, and cheap to see
            file = path / rel
            if not file.is_file():
                raise SoupsError(f"{file} is missing")
            if file.stat().st_size != meta["bytes"]:
                raise SoupsError(f"{file} has {file.stat().st_size} bytes, {meta['bytes']} were written")
        for rel, meta in listed.items():
            if _sha256(path / rel) != meta["sha256"]:
                raise SoupsError(f"{path / rel} changed after it was written (sha256 mismatch)")
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (MANIFEST_FILE, SOUPS_MARKER)):
        if file.suffix == ".safetensors":
            bad = safetensors_problem(file)
            if bad:
                raise SoupsError(f"{file}: {bad}")
        elif file.suffix not in (".json", ".yaml", ".txt", ".md") and check_file is not None:
            check_file(file)


def newest_valid_checkpoint(
    root: Path, check_file: Callable[[Path], None] | None = None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `root` that passes `validate_checkpoint`, and the newer ones that did not.

    Returns:
        (the checkpoint or None, [(broken checkpoint, why), ...] newest first).
    """
    broken = []
    for path in reversed(list_checkpoints(root)):
        try:
            validate_checkpoint(path, check_file)
        except SoupsError as err:
            broken.append((path, str(err)))
            continue
        return path, broken
    return None, broken


def set_aside(path: Path) -> Path:
    """Renames a broken checkpoint to `broken-<name>` beside it (a later save of that step must not meet it,
    and pruning must not count it); returns the new path."""
    path = Path(path)
    target = path.with_name(f"broken-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"broken{n}-{path.name}")
    os.replace(path, target)
    return target


def prune_checkpoints(root: Path, keep: int) -> None:
    """Deletes all but the `keep` most recent complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# Non-finite bit patterns of the float formats numpy cannot check with isfinite: (storage dtype, mask, value).
_BIT_NONFINITE = {
    "BF16": (np.uint16, 0x7F80, 0x7F80),  # exponent all ones
    "F8_E5M2": (np.uint8, 0x7C, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F, 0x7F),  # e4m3fn: no inf, NaN = S.1111.111
}
_NUMPY_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, malformed, or holding NaN/inf), or None if it is fine.

    Reads the format directly (8-byte little-endian header length, JSON header, raw data), so it needs no
    framework and checks bfloat16/float8 through their bit patterns.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated ({size} bytes; the header alone needs {n + 8})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable header ({err})"
    header.pop("__metadata__", None)
    end = 0
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return f"malformed header entry {name!r}"
        if stop > len(data):
            return f"truncated ({size} bytes; tensor {name!r} ends at byte {8 + n + stop})"
        if dtype in _ITEM_BYTES and stop - start != int(np.prod(shape, dtype=np.int64)) * _ITEM_BYTES[dtype]:
            return f"tensor {name!r} has {stop - start} bytes for shape {shape} of {dtype}"
        end = max(end, stop)
        raw = data[start:stop]
        if dtype in _NUMPY_FLOATS:
            values = raw.view(_NUMPY_FLOATS[dtype])
            if not np.isfinite(values).all():
                return f"tensor {name!r} has non-finite values"
        elif dtype in _BIT_NONFINITE:
            store, mask, value = _BIT_NONFINITE[dtype]
            if ((raw.view(store) & mask) == value).any():
                return f"tensor {name!r} has non-finite values"
    if end != len(data):
        return f"{len(data) - end} bytes beyond the last tensor"
    return None


def _describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_FILE, SOUPS_MARKER)  # the marker is atomic_dir's, not ours
    }  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    files = sorted(directory.rglob("*"))
    for path in [*(p for p in files if p.is_file()), *(p for p in files if p.is_dir()), directory]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # directories cannot be opened on some platforms; the data files are what matter
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# RNG state: python and numpy always, torch (CPU and CUDA) when asked
# ----------------------------------------------------------------------------------------------------------


def rng_state(with_torch: bool = True) -> dict[str, Any]:
    """The python and numpy global RNG states as plain lists (JSON-able), plus torch's (CPU and every CUDA
    device) as uint8 tensors when `with_torch`. Saves with `torch.save` and loads with weights_only=True."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached)],
    }
    if with_torch:
        import torch

        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores `rng_state()` exactly (also the older form that stored the lists as tensors)."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(x) for x in _as_list(py_state)), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_name, np.asarray(_as_list(np_keys), dtype=np.uint32), int(np_pos), int(np_has_gauss),
                         float(np_cached)))
    if "torch" in state:
        import torch

        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: Any) -> dict[str, Any]:
    """A torch model's trainable tensors by name (what a trainer's checkpoint stores)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable_checkpoint(root: Path, step: int, *, model: Any, optimizer: Any, state: dict[str, Any], config: Any,
                              lr_hint: str) -> Path:  # fmt: skip
    """`save_checkpoint` of a torch trainer: the trainable weights, the optimizer and the RNG states.

    Args:
        lr_hint: Named in the error when the weights or optimizer state are non-finite, e.g. "scst.lr=1e-4".

    Raises:
        SoupsError: non-finite weights or optimizer state (`stop_error`: nothing is written).
    """
    import torch

    weights = trainable_state(model)
    bad = nonfinite({"weights": weights, "optimizer": optimizer.state_dict()["state"]})
    if bad:
        raise stop_error(root, step, f"non-finite {', '.join(bad[:3])} (lower {lr_hint})")

    def write_files(tmp: Path) -> None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")

    return save_checkpoint(root, step, state=state, arrays={"trainable": weights}, write_files=write_files,
                           config=config)  # fmt: skip


def load_trainable_checkpoint(path: Path, *, model: Any, optimizer: Any, hint: str) -> dict[str, Any]:
    """Restores what `save_trainable_checkpoint` wrote into `model` and `optimizer`; returns the trainer state.

    Args:
        hint: Appended to the error when the checkpoint's trainable tensors are not exactly the model's.

    Raises:
        SoupsError: the saved trainable tensors differ from the model's trainable parameters.
    """
    import torch

    weights = load_arrays(path / "trainable.safetensors", framework="pt")
    named = dict(model.named_parameters())
    if sorted(weights) != sorted(n for n, p in named.items() if p.requires_grad):
        raise SoupsError(f"{path}: its trainable weights are not this model's; {hint}")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return load_state(path)


def _as_list(x: Any) -> list[Any]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


# ----------------------------------------------------------------------------------------------------------
# Metrics: JSONL rows, tracker hparams, progress bar
# ----------------------------------------------------------------------------------------------------------


def append_metrics(path: Path, row: Mapping[str, Any]) -> None:
    """Appends one JSON row to the run's metrics.jsonl."""
    with Path(path).open("a") as fh:
        fh.write(json.dumps(dict(row)) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drops metric rows after `step` (a resumed run rewrites them), keeping the file consistent."""
    path = Path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def flat_hparams(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a/b": scalar} (lists and None as strings), the form tensorboard's hparams accept."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}/"))
        else:
            out[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


def start_trackers(accelerator: Any, cfg: Any, log_with: Sequence[str], project: str = "tensorboard") -> None:
    """Starts accelerate's trackers (none when `log_with` is empty) with the flattened resolved config."""
    from omegaconf import OmegaConf

    if log_with:
        container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        accelerator.init_trackers(project, config=flat_hparams(container))  # type: ignore[arg-type]


def progress(start: int, total: int, *, desc: str, enabled: bool) -> Any:
    """A tqdm bar over steps `start..total-1` (iterates the steps also when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(range(start, total), initial=start, total=total, desc=desc, disable=bar_disabled(enabled))

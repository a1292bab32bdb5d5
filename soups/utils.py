"""Shared plumbing: one-line errors for CLIs, atomic output directories, seeding, resolved configs."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from evals.errors import SoupsError  # defined in the lowest layer; re-exported so `soups.utils.SoupsError` still works

F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(fn: F) -> F:
    """Wraps a CLI main: a `SoupsError` (or a registry `UnknownNameError`) becomes `error: ...` on stderr
    and exit code 2, instead of a traceback. Other exceptions propagate (they are bugs)."""
    from soups.registry import UnknownNameError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SoupsError, UnknownNameError) as err:
            message = " ".join(str(err).split())  # one line, whatever the message
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `target`; renames it to `target` only if the block succeeds.

    On any exception the temporary directory is removed and `target` is untouched, so a failed run
    never leaves a half-written output behind.

    Args:
        target: The final directory.
        overwrite: Replace an existing `target` (moved aside, then deleted after the rename).

    Raises:
        SoupsError: `target` exists and `overwrite` is false.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise SoupsError(f"output {target} already exists; pass overwrite=true to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_resolved_config(cfg: Any, directory: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Saves a resolved Hydra/OmegaConf config (or a plain dict) as YAML beside a checkpoint or result."""
    from omegaconf import OmegaConf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    path = directory / name
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(container)))
    return path


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def steady_malloc() -> bool:
    """Keeps freed memory inside the process (glibc `mallopt`), for stable timings in benchmarks.

    By default glibc serves large blocks (the activations of a forward) with mmap and returns freed ones to the
    OS, so every forward pays fresh page faults, and how many depends on the allocator's history: the same
    packed model timed at 5 ms in one process and 15 ms in another. A fixed mmap threshold at its 32 MiB maximum
    and no trimming remove that (packed 5.0 / 5.1 ms, MixMo 4.3 / 4.6 ms over two processes). Returns whether it
    applied (False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        fixed_mmap = bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024))
        return fixed_mmap and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False

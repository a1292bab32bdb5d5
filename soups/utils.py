"""Shared plumbing: one-line errors for CLIs, atomic output directories, seeding, resolved configs."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

try:  # POSIX only: without it, no temporary directory is ever judged stale
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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


#: Marker file `atomic_dir` writes into every directory it publishes. A directory holding it (or a `soup.json`,
#: written by soups before the marker existed) was written by Soups and may be replaced with `overwrite=True`.
SOUPS_MARKER = ".soups"
_MARKER_TEXT = "written by Soups (soups.utils.atomic_dir); overwrite=true may replace this directory\n"
_SOUPS_FILES = (SOUPS_MARKER, "soup.json")
#: A temporary directory without a marker is left alone while younger than this (its run may be starting).
_UNMARKED_GRACE_S = 60.0
_RENAME_NOREPLACE = 1  # <linux/fs.h>
_AT_FDCWD = -100  # <fcntl.h> on Linux


def _renameat2() -> Callable[..., int] | None:
    """glibc's `renameat2` (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Renames `src` to `dst` only if `dst` does not exist, as one step where the OS allows it.

    On Linux this is `renameat2(RENAME_NOREPLACE)`: of several processes renaming onto one `dst`, exactly one
    succeeds. Elsewhere (or on a file system without it) a plain rename, which for a directory `src` still fails
    on any non-empty `dst`; `atomic_dir` never publishes an empty directory, so two of its renames cannot both win.

    Raises:
        FileExistsError: `dst` exists.
    """
    if _RENAMEAT2 is not None:
        import ctypes

        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # those three mean: not supported here
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from err
        raise


def written_by_soups(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a directory that `overwrite=True` may replace: one Soups wrote (it holds the
    `.soups` marker or a `soup.json`), or an empty one."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / name).is_file() for name in _SOUPS_FILES) or not any(path.iterdir())


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _in_use(tmp: Path) -> bool:
    """Whether a temporary directory belongs to a live run: its marker is locked (see `atomic_dir`), or it has no
    marker yet and is younger than `_UNMARKED_GRACE_S`."""
    marker = tmp / SOUPS_MARKER
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return time.time() - tmp.stat().st_mtime < _UNMARKED_GRACE_S
        except FileNotFoundError:
            return True  # removed meanwhile by its own run or another cleaner
    except OSError:
        return True
    try:
        if fcntl is None:
            return True  # no way to tell a live run from a dead one: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)  # also releases the probe's lock


def clean_stale_tmp(target: str | os.PathLike[str]) -> list[Path]:
    """Removes the temporary directories that interrupted `atomic_dir` runs left beside `target`
    (`.NAME.tmp-*` whose run is gone), leaving those of runs still writing.

    Returns:
        The directories removed.

    Raises:
        SoupsError: some could not be removed; the message lists them.
    """
    target = Path(target).absolute()
    prefix = _tmp_prefix(target)
    removed: list[Path] = []
    failed: list[str] = []
    try:
        candidates = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return removed
    for path in candidates:
        if path.is_symlink() or not path.is_dir() or _in_use(path):
            continue
        try:
            shutil.rmtree(path)
        except OSError as err:
            if path.exists():
                failed.append(f"{path} ({err.strerror or err})")
                continue
        removed.append(path)
    if failed:
        raise SoupsError(
            f"cannot remove {len(failed)} temporary dir(s) left by interrupted runs to {target}: {', '.join(failed)}; "
            "remove them by hand"
        )
    return removed


def _make_tmp(target: Path) -> Path:
    """A fresh directory beside `target`, created with the umask's mode (mkdtemp would force 0700)."""
    while True:
        tmp = target.parent / f"{_tmp_prefix(target)}{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _lock_marker(tmp: Path) -> int:
    """Writes the marker into `tmp` and holds an exclusive lock on it for the life of the run, so that
    `clean_stale_tmp` of a concurrent run can tell this directory is in use. Returns the descriptor."""
    # Locked under another name, then renamed into place (the lock follows the file): a prober never sees the
    # marker unlocked while this run is alive.
    pending = tmp / f"{SOUPS_MARKER}.new"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, _MARKER_TEXT.encode())
        os.rename(pending, tmp / SOUPS_MARKER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _publish(tmp: Path, target: Path, seen: tuple[int, int] | None) -> None:
    """Moves `tmp` to `target` exclusively: onto a path that must not exist, or, when `seen` is the identity of the
    output found at the start, in place of that very directory. Anything else at `target` was written by a
    concurrent run, which wins; this one raises."""
    lost = (
        f"output {target} was written by another run while this one was working; "
        "this run's result is discarded (the other run's output is kept)"
    )
    if seen is None:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise SoupsError(lost) from None
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(target, old)  # `old` is a fresh name: this step cannot clobber anything
    except FileNotFoundError:
        raise SoupsError(lost) from None
    if _identity(old) != seen:  # replaced by another run after this one checked it: put it back and lose
        try:
            rename_noreplace(old, target)
        except OSError:
            raise SoupsError(f"{lost}; its output was moved to {old} by a third concurrent run") from None
        raise SoupsError(lost)
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        shutil.rmtree(old, ignore_errors=True)  # another run published in the gap; the old output was to go anyway
        raise SoupsError(lost) from None
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `target`; moves it to `target` only if the block succeeds.

    On any exception the temporary directory is removed and `target` is untouched, so a failed run never leaves a
    half-written output behind. The final move is exclusive: when several runs write one `target` at the same
    time, exactly one publishes and the others raise `SoupsError` naming it (see `_publish`). Every published
    directory holds a `.soups` marker, and `overwrite=True` replaces only a directory Soups wrote (the marker or a
    `soup.json`) or an empty one, never an arbitrary directory. Temporary directories left by interrupted runs to
    the same `target` are removed first (those of live runs are locked and kept). The directory gets the
    umask's permissions, like any other output.

    Args:
        target: The final directory.
        overwrite: Replace an existing `target` written by Soups (moved aside, then deleted after the move).

    Raises:
        SoupsError: `target` exists and `overwrite` is false; `target` is not a Soups output; another run wrote
            `target` first; or leftovers of interrupted runs could not be removed.
    """
    target = Path(target).absolute()
    seen = _identity(target)
    if seen is not None:
        if not overwrite:
            raise SoupsError(f"output {target} already exists; pass overwrite=true to replace it")
        if not written_by_soups(target):
            raise SoupsError(
                f"output {target} exists and was not written by Soups (no {SOUPS_MARKER} or soup.json, not empty); "
                "overwrite=true replaces only Soups outputs; choose another output or remove it yourself"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(target)
    tmp = _make_tmp(target)
    lock = _lock_marker(tmp)
    try:
        yield tmp
        if not (tmp / SOUPS_MARKER).is_file():  # the block removed it: published dirs always carry it
            (tmp / SOUPS_MARKER).write_text(_MARKER_TEXT)
        _publish(tmp, target, seen)
    except BaseException:
        os.close(lock)
        lock = -1
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock >= 0:
            os.close(lock)


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

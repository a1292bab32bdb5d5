"""Shared plumbing: registry errors list valid names; atomic_dir leaves nothing behind on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soups.registry import Registry, UnknownNameError
from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything, write_json


def test_registry_lists_valid_names_on_unknown() -> None:
    reg: Registry[int] = Registry("reward")
    reg.add("faithful", 1)
    reg.add("complete", 2)
    assert reg.get("faithful") == 1
    with pytest.raises(UnknownNameError) as err:
        reg.get("faithfull")
    assert str(err.value) == "unknown reward 'faithfull'; valid names: complete, faithful"
    with pytest.raises(ValueError, match="already registered"):
        reg.add("complete", 3)


def test_atomic_dir_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_cleans_up_on_failure_and_refuses_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(SoupsError, match="already exists"), atomic_dir(target):
        pass
    assert (target / "keep.txt").read_text() == "old"
    with pytest.raises(SoupsError, match="not written by Soups"), atomic_dir(target, overwrite=True):
        pass  # a directory Soups did not write is never replaced
    assert (target / "keep.txt").read_text() == "old"
    (target / "keep.txt").unlink()  # an empty directory may be replaced
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [".soups", "new.txt"]
    with atomic_dir(target, overwrite=True) as tmp:  # and so may one atomic_dir wrote (it carries .soups)
        (tmp / "newer.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == [".soups", "newer.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_errors_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    script = tmp_path / "cli.py"
    script.write_text(
        "from soups.utils import SoupsError, cli_errors\n"
        "@cli_errors\n"
        "def main():\n"
        "    raise SoupsError('bad tensor\\n  h.0.attn in /x/model.safetensors')\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bad tensor h.0.attn in /x/model.safetensors"]


def test_seed_config_and_json(tmp_path: Path) -> None:
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    path = save_resolved_config({"lr": 1e-5, "name": "x"}, tmp_path)
    assert "lr: 1.0e-05" in path.read_text()
    write_json(tmp_path / "s.json", {"p": tmp_path, "t": torch.tensor([1.0, 2.0])})
    assert json.loads((tmp_path / "s.json").read_text()) == {"p": str(tmp_path), "t": [1.0, 2.0]}


def test_steady_malloc_applies_on_glibc() -> None:
    import platform

    from soups.utils import steady_malloc

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert steady_malloc() is True

"""The trainer runtime (rl/runtime.py) on its own, with plain numpy arrays (what the jax trainer stores):
checkpoint save/load/latest/prune, validation of damaged checkpoints, atomicity, RNG and metrics helpers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rl import runtime
from soups.utils import SoupsError


def _save(root: Path, step: int, **kwargs) -> Path:
    arrays = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + step, "b": np.array([step], np.int64)}}
    return runtime.save_checkpoint(root, step, state={"lr": 0.1, "kl": [1.0, 2.0]}, arrays=arrays,
                                   write_files=lambda d: (d / "opaque.bin").write_bytes(bytes(range(64))), **kwargs)


def test_save_load_round_trip_with_numpy(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    path = _save(root, 7, config={"ppo": {"lr": 0.1}})
    assert path == root / "step-000007"
    names = sorted(p.name for p in path.iterdir() if p.name != ".soups")  # .soups: atomic_dir's marker
    assert names == ["config.yaml", "manifest.json", "opaque.bin", "params.safetensors", "trainer_state.json"]
    arrays = runtime.load_arrays(path / "params.safetensors")
    assert np.array_equal(arrays["w"], np.arange(6, dtype=np.float32).reshape(2, 3) + 7)
    assert arrays["w"].dtype == np.float32 and arrays["b"].tolist() == [7]
    assert runtime.load_state(path) == {"lr": 0.1, "kl": [1.0, 2.0], "step": 7}
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert manifest["opaque.bin"]["bytes"] == 64 and len(manifest["opaque.bin"]["sha256"]) == 64
    runtime.validate_checkpoint(path)  # a fresh checkpoint is valid
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_latest_list_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 10, 9):
        _save(root, step)
    (root / "step-000011").mkdir()  # no trainer_state.json: an incomplete legacy write
    (root / ".step-000012.tmp-abc").mkdir()  # an interrupted atomic write
    (root / "broken-step-000013").mkdir()
    (root / "broken-step-000013" / "trainer_state.json").write_text('{"step": 13}')
    assert [p.name for p in runtime.list_checkpoints(root)] == ["step-000002", "step-000009", "step-000010"]
    assert runtime.latest_checkpoint(root).name == "step-000010"  # numeric order
    runtime.prune_checkpoints(root, keep=2)
    assert [p.name for p in runtime.list_checkpoints(root)] == ["step-000009", "step-000010"]
    runtime.prune_checkpoints(root, keep=0)  # 0 keeps all
    assert len(runtime.list_checkpoints(root)) == 2
    assert runtime.latest_checkpoint(tmp_path / "missing") is None


def test_non_finite_arrays_and_state_are_never_written(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    good = _save(root, 1)
    bad = {"params": {"w": np.array([1.0, np.nan], np.float32), "ok": np.zeros(2, np.float32)}}
    with pytest.raises(SoupsError, match=r"step-000002: params has non-finite values in w$"):
        runtime.save_checkpoint(root, 2, state={}, arrays=bad)
    with pytest.raises(SoupsError, match="trainer state is not finite JSON"):
        runtime.save_checkpoint(root, 2, state={"kl": float("inf")})
    torch_bad = {"v_head": {"weight": torch.tensor([[0.0, float("-inf")]])}}
    with pytest.raises(SoupsError, match="v_head has non-finite values in weight"):
        runtime.save_checkpoint(root, 2, state={}, arrays=torch_bad)
    assert [p.name for p in root.iterdir()] == [good.name]


def test_a_write_killed_midway_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save(root, 1)

    def killed(directory: Path) -> None:
        (directory / "adapter.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint(root, 2, state={}, write_files=killed)
    assert [p.name for p in root.iterdir()] == ["step-000001"]


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(p / "params.safetensors", 40), r"params.safetensors has \d+ bytes, \d+ were written"),
    (lambda p: _truncate(p / "opaque.bin", 10), "opaque.bin has 10 bytes, 64 were written"),
    (lambda p: (p / "trainer_state.json").write_text('{"step": 3,'), "trainer_state.json is unreadable"),
    (lambda p: (p / "trainer_state.json").write_text('{"lr": 1}'), "has no integer 'step'"),
    (lambda p: (p / "opaque.bin").write_bytes(bytes(64)), r"opaque.bin changed after it was written \(sha256"),
    (lambda p: (p / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    (lambda p: (p / "opaque.bin").unlink(), "opaque.bin is missing"),
])  # fmt: skip
def test_validate_names_each_kind_of_damage(tmp_path: Path, damage, message: str) -> None:
    path = _save(tmp_path, 3)
    damage(path)
    with pytest.raises(SoupsError, match=message):
        runtime.validate_checkpoint(path)


def test_validate_without_manifest_checks_contents(tmp_path: Path) -> None:
    # Checkpoints written before manifests: safetensors are parsed and checked, other files go to check_file.
    path = _save(tmp_path, 3)
    (path / "manifest.json").unlink()
    runtime.validate_checkpoint(path)
    seen = []
    runtime.validate_checkpoint(path, check_file=seen.append)
    assert [p.name for p in seen] == ["opaque.bin"]  # JSON/YAML are not handed over
    _truncate(path / "params.safetensors", (path / "params.safetensors").stat().st_size - 4)
    with pytest.raises(SoupsError, match="params.safetensors: truncated"):
        runtime.validate_checkpoint(path)
    from safetensors.numpy import save_file

    save_file({"w": np.array([0.0, np.inf], np.float32)}, str(path / "params.safetensors"))
    with pytest.raises(SoupsError, match="tensor 'w' has non-finite values"):
        runtime.validate_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e5m2, torch.float8_e4m3fn])  # fmt: skip
def test_safetensors_finiteness_agrees_with_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    # The reader checks bfloat16/float8 through bit patterns; torch.isfinite is the reference.
    from safetensors.torch import save_file

    finite = torch.linspace(-3, 3, 7).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file({"a": finite, "i": torch.arange(3)}, str(path))
    assert runtime.safetensors_problem(path) is None
    special = [float("nan")] if dtype == torch.float8_e4m3fn else [float("nan"), float("inf"), float("-inf")]
    for value in special:
        bad = torch.cat([finite.float(), torch.tensor([value])]).to(dtype)
        assert not torch.isfinite(bad.float()).all()
        save_file({"i": torch.arange(3), "a": bad}, str(path))
        assert runtime.safetensors_problem(path) == "tensor 'a' has non-finite values"


def test_newest_valid_checkpoint_falls_back_and_sets_aside(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    _truncate(tmp_path / "step-000003" / "params.safetensors", 30)

    def reject_step2(file: Path) -> None:
        if file.parent.name == "step-000002":
            raise SoupsError(f"{file} rejected by the trainer")

    good, broken = runtime.newest_valid_checkpoint(tmp_path, reject_step2)
    assert good.name == "step-000001"
    assert [(p.name, "rejected" in why) for p, why in broken] == [("step-000003", False), ("step-000002", True)]
    moved = runtime.set_aside(tmp_path / "step-000003")
    assert moved.name == "broken-step-000003" and runtime.latest_checkpoint(tmp_path).name == "step-000002"
    assert runtime.newest_valid_checkpoint(tmp_path / "none") == (None, [])


def test_stop_error_names_the_last_checkpoint(tmp_path: Path) -> None:
    assert str(runtime.stop_error(tmp_path, 1, "loss is nan")).endswith("(intact): none yet")
    _save(tmp_path, 4)
    assert str(runtime.stop_error(tmp_path, 5, "loss is nan")) == (
        f"step 5: loss is nan; stopping. Last good checkpoint (intact): {tmp_path / 'step-000004'}")


def test_nonfinite_walks_nested_optimizer_states() -> None:
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([1.0, float("nan")])},
                     1: {"exp_avg_sq": np.array([np.inf])}}, "param_groups": [{"lr": 0.1}]}  # fmt: skip
    assert runtime.nonfinite(opt) == ["state.0.exp_avg", "state.1.exp_avg_sq"]
    assert runtime.nonfinite({"ids": torch.tensor([1, 2]), "x": np.zeros(2)}) == []


def test_rng_state_without_torch_is_json_and_exact() -> None:
    state = json.loads(json.dumps(runtime.rng_state(with_torch=False)))  # JSON-able: fits trainer_state.json
    first = (random.random(), np.random.rand(3).tolist())
    runtime.set_rng_state(state)
    assert (random.random(), np.random.rand(3).tolist()) == first


def test_config_checks_name_key_value_and_range() -> None:
    runtime.check_number("ppo.lr", 1e-3, low=0, low_open=True)
    with pytest.raises(SoupsError, match=r"^ppo.lr=-1 must be a finite number in \(0, inf\)$"):
        runtime.check_number("ppo.lr", -1, low=0, low_open=True)
    with pytest.raises(SoupsError, match=r"^ppo.lr=nan must be a finite number in \(0, inf\)$"):
        runtime.check_number("ppo.lr", float("nan"), low=0, low_open=True)
    with pytest.raises(SoupsError, match=r"^ppo.gamma=1.5 must be a finite number in \[0, 1\]$"):
        runtime.check_number("ppo.gamma", 1.5, low=0, high=1)
    with pytest.raises(SoupsError, match=r"^ppo.steps=2.5 must be an integer in \[0, inf\)$"):
        runtime.check_number("ppo.steps", 2.5, low=0, integer=True)
    with pytest.raises(SoupsError, match="^seed='x' must be"):
        runtime.check_number("seed", "x", low=0, integer=True)
    with pytest.raises(SoupsError, match="^mixed_precision='fp8' is not valid; valid options: auto, no, fp16, bf16$"):
        runtime.check_choice("mixed_precision", "fp8", ("auto", "no", "fp16", "bf16"))


def test_metrics_truncate_drops_rows_after_the_resume_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        runtime.append_metrics(path, {"step": step, "x": step / 2})
    runtime.truncate_metrics(path, 2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "x": 0.5}, {"step": 2, "x": 1.0}]
    assert runtime.flat_hparams({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a/b": 1, "a/c": "[1, 2]", "d": "None"}


def test_scalarisation_is_reexported_from_one_place() -> None:
    from rl.text import rewards as text_rewards

    assert runtime.scalarize is text_rewards.scalarize and runtime.RunningNormalizer is text_rewards.RunningNormalizer
    rewards = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    assert runtime.scalarize(rewards, runtime.morl_weights([0.25, 0.75], ["a", "b"])).tolist() == [2.5, 4.25]

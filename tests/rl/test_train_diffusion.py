"""rl/train_diffusion.py: RWR experts on a tiny pipeline (saved with save_pretrained, loaded like a Hub id).

In-process runs of a few seconds each: the smoke run saves an expert whose base UNet weights are the init's and
whose trainable ones moved; a run killed during generation and after a checkpoint resumes without regenerating a
scored batch and ends with the uninterrupted run's expert; a second expert re-uses round 0; a NaN reward stops the
run with exit 2 and the last checkpoint intact; MORL weights are validated and normalised by round 0's statistics.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

from rl import runtime, train_diffusion
from rl.diffusion import models
from rl.diffusion.rewards import REWARDS
from soups.utils import SoupsError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "train_diffusion"


# ----------------------------------------------------------------------------------------------------------
# Fixtures: a tiny init pipeline, test rewards, configs
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny pipeline saved with save_pretrained (loaded by `load_pipeline`, as a Hub id would be)."""
    from rl.diffusion.task import vocabulary

    path = tmp_path_factory.mktemp("diffusion") / "init"
    models.build_tiny_pipeline(vocabulary(), seed=0).save_pretrained(path)
    return path


class _Brightness:
    """Mean pixel value: conflicts with colourfulness on dull prompts (a test reward)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


class _NanAfter:
    """Colourfulness-like until its `after`-th call, NaN on the second image from then on (a test reward)."""

    def __init__(self, name: str, after: int) -> None:
        self.name, self.after, self.calls = name, after, 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        out = images.float().std(dim=(1, 2, 3))
        if self.calls > self.after:
            out[1] = float("nan")
        return out


@pytest.fixture(autouse=True)
def test_rewards(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registers `brightness` and `nan_after` for the duration of a test only."""

    def brightness(*, device: Any = "cpu", name: str = "brightness") -> _Brightness:
        return _Brightness(name)

    def nan_after(*, after: int = 0, device: Any = "cpu", name: str = "nan_after") -> _NanAfter:
        return _NanAfter(name, after)

    monkeypatch.setitem(REWARDS._items, "brightness", brightness)
    monkeypatch.setitem(REWARDS._items, "nan_after", nan_after)
    yield


def _cfg(out: Path, init: Path, *overrides: str) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", f"output_dir={out}", f"model.name_or_path={init}",
                                             "reward.objectives=[colourfulness,brightness]", *overrides])  # fmt: skip


class _Killed(Exception):
    """Simulates a kill at a chosen point."""


class _Spy:
    """Counts generated batches and checkpoints; optionally raises `_Killed` after the n-th of either."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.generated = 0
        self.published = 0
        self.checkpoints = 0
        self.kill_after_batches: int | None = None
        self.kill_after_checkpoints: int | None = None
        real_generate, real_write, real_save = (train_diffusion.generate_batch, train_diffusion.write_batch,
                                                train_diffusion.save_rwr_checkpoint)  # fmt: skip

        def generate(*args: Any, **kwargs: Any) -> Any:
            self.generated += 1
            return real_generate(*args, **kwargs)

        def write(*args: Any, **kwargs: Any) -> bool:
            done = real_write(*args, **kwargs)
            self.published += 1
            if self.kill_after_batches is not None and self.published >= self.kill_after_batches:
                raise _Killed(f"after {self.published} batches")
            return done

        def save(*args: Any, **kwargs: Any) -> Path:
            path = real_save(*args, **kwargs)
            self.checkpoints += 1
            if self.kill_after_checkpoints is not None and self.checkpoints >= self.kill_after_checkpoints:
                raise _Killed(f"after checkpoint {path.name}")
            return path

        monkeypatch.setattr(train_diffusion, "generate_batch", generate)
        monkeypatch.setattr(train_diffusion, "write_batch", write)
        monkeypatch.setattr(train_diffusion, "save_rwr_checkpoint", save)

    def reset(self, *, batches: int | None = None, checkpoints: int | None = None) -> None:
        self.generated = self.published = self.checkpoints = 0
        self.kill_after_batches, self.kill_after_checkpoints = batches, checkpoints


def _lora(expert: Path) -> dict[str, torch.Tensor]:
    return load_file(str(expert / "pytorch_lora_weights.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------


def test_image_seeds_and_training_batches_are_pure_functions() -> None:
    seeds = train_diffusion.image_seeds(0, 0, 6)
    assert seeds == train_diffusion.image_seeds(0, 0, 6) and len(set(seeds)) == 6
    assert seeds[:3] == train_diffusion.image_seeds(0, 0, 3)  # independent of n (and of the batch size)
    assert train_diffusion.image_seeds(0, 1, 3) != seeds[:3] and train_diffusion.image_seeds(1, 0, 3) != seeds[:3]
    assert all(0 <= s < 2**63 for s in seeds)
    a = train_diffusion.step_batch(0, 0, 5, n_kept=4, batch=3, n_timesteps=1000)
    assert a == train_diffusion.step_batch(0, 0, 5, n_kept=4, batch=3, n_timesteps=1000)
    assert len(set(a[0])) == 3 and all(0 <= t < 1000 for t in a[1])  # without replacement when it can
    assert train_diffusion.step_batch(0, 0, 6, 4, 3, 1000) != a


def test_cache_key_changes_with_each_input(init_dir: Path) -> None:
    pipe = models.load_pipeline(init_dir)
    fp = train_diffusion.weights_fingerprint(pipe)
    base = (fp, ["a red circle on a blue background"] * 2, [1, 2], {"inference_steps": 4}, ["colourfulness"])
    key = train_diffusion.round0_cache_key(*base)[0]
    assert key == train_diffusion.round0_cache_key(*base)[0] and len(key) == 24
    for i, other in enumerate([fp[::-1], ["a red circle on a green background"] * 2, [1, 3], {"inference_steps": 5},
                               ["colourfulness", "fidelity"]]):  # fmt: skip
        changed = list(base)
        changed[i] = other
        assert train_diffusion.round0_cache_key(*changed)[0] != key, i
    with torch.no_grad():
        next(iter(pipe.unet.parameters())).view(-1)[0] += 1e-3
    assert train_diffusion.weights_fingerprint(pipe) != fp


def test_prompts_embedded_or_from_a_file(tmp_path: Path) -> None:
    task = {"prompts": "scenes", "n_prompts": 5, "seed": 0}
    assert len(train_diffusion.resolve_prompts(task)) == 5
    (tmp_path / "p.txt").write_text("# mine\na cat\n\na dog\n")
    assert train_diffusion.resolve_prompts({**task, "prompts": str(tmp_path / "p.txt")}) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(SoupsError, match="empty"):
        train_diffusion.resolve_prompts({**task, "prompts": str(tmp_path / "empty.txt")})
    with pytest.raises(SoupsError, match="does not exist"):
        train_diffusion.resolve_prompts({**task, "prompts": str(tmp_path / "missing.txt")})


def test_bad_settings_are_named(tmp_path: Path, init_dir: Path) -> None:
    for override, named in [("rwr.keep=0", "rwr.keep"), ("rwr.keep=1.5", "rwr.keep"),
                            ("rwr.weighting=linear", "uniform, raw, softmax"), ("trainable=full", "lora, difffit"),
                            ("rwr.n_images=0", "rwr.n_images"), ("rwr.temperature=0", "rwr.temperature"),
                            ("rwr.prior_weight=-1", "rwr.prior_weight"),
                            ("rwr.prior_data=class", "scenes, init_samples")]:  # fmt: skip
        with pytest.raises(SoupsError, match=named):
            train_diffusion.validate_config(_cfg(tmp_path, init_dir, override))


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------


def test_smoke_run_saves_an_expert_base_unchanged_trainable_changed(
    tmp_path: Path, init_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import UNet2DConditionModel

    captured: dict[str, Any] = {}
    real_save = models.save_expert

    def save(unet: torch.nn.Module, *args: Any, **kwargs: Any) -> Path:
        captured["unet"] = unet
        return real_save(unet, *args, **kwargs)

    monkeypatch.setattr(models, "save_expert", save)
    out = tmp_path / "colourfulness"
    expert = train_diffusion.train(_cfg(out, init_dir))
    assert expert == out / "expert"
    info = json.loads((expert / "soups_expert.json").read_text())
    assert info["kind"] == "diffusers_lora" and info["base"] == str(init_dir)
    init_state = UNet2DConditionModel.from_pretrained(init_dir, subfolder="unet").state_dict()
    trained = captured["unet"].state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert sorted(base) == sorted(init_state)
    assert all(torch.equal(base[k], init_state[k]) for k in init_state)  # the base UNet is untouched
    lora_b = [v for k, v in _lora(expert).items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in lora_b)
    assert max(float(v.abs().max()) for v in lora_b) > 0  # B starts at 0: it was trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("rwr/loss", "generated/colourfulness", "kept/colourfulness", "generated/brightness",
                "kept/brightness", "kept/threshold", "kept/ess"):  # fmt: skip
        assert all(key in r for r in rows), key
    assert rows[0]["kept/colourfulness"] >= rows[0]["generated/colourfulness"]  # the top half by colourfulness
    assert rows[0]["kept/ess"] == pytest.approx(4.0)  # uniform over 4 kept images
    # every generated image is saved with every objective's score
    round0 = Path(json.loads((out / "generations" / "round-00.json").read_text())["cache"])
    batches = sorted(round0.glob("batch-*"))
    assert len(batches) == 2 and len(list(round0.glob("batch-*/*.png"))) == 8
    meta = json.loads((batches[0] / "batch.json").read_text())
    assert set(meta["scores"]) == {"colourfulness", "brightness"} and len(meta["scores"]["brightness"]) == 4
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step-000004").is_dir()


def test_killed_run_resumes_without_regenerating_and_ends_with_the_same_expert(
    tmp_path: Path, init_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    settings = ["rwr.iterations=2"]  # round 1 is generated by the trained model, per run
    # the uninterrupted run: 2 batches per round, 2 rounds; checkpoints at steps 2, 4 (end of round 0), 6, 8
    whole = train_diffusion.train(_cfg(tmp_path / "whole", init_dir, *settings, f"rwr.cache_dir={tmp_path / 'c1'}"))
    assert spy.generated == 4
    cfg = _cfg(tmp_path / "killed", init_dir, *settings, f"rwr.cache_dir={tmp_path / 'c2'}")
    resumed = _cfg(tmp_path / "killed", init_dir, *settings, f"rwr.cache_dir={tmp_path / 'c2'}", "resume=true")
    # 1) killed in round 0, after its first batch was published
    spy.reset(batches=1)
    with pytest.raises(_Killed):
        train_diffusion.train(cfg)
    assert spy.generated == 1
    # 2) resumed: only round 0's second batch is generated; killed after the first checkpoint (step 2)
    spy.reset(checkpoints=1)
    with pytest.raises(_Killed):
        train_diffusion.train(resumed)
    assert spy.generated == 1
    # 3) resumed from step 2: round 0 is not generated again; killed after round 1's first batch
    spy.reset(batches=1)
    with pytest.raises(_Killed):
        train_diffusion.train(resumed)
    assert spy.generated == 1 and spy.checkpoints == 1  # the step-4 checkpoint (end of round 0)
    # 4) resumed from step 4: only round 1's second batch
    spy.reset()
    expert = train_diffusion.train(resumed)
    assert spy.generated == 1
    a, b = _lora(whole), _lora(expert)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    rows_a = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    assert [r["rwr/loss"] for r in rows_a] == [r["rwr/loss"] for r in rows_b]


@pytest.mark.parametrize("prior_data", ["scenes", "init_samples"])
def test_prior_preservation_trains_on_the_prior_and_resumes_exactly(
    tmp_path: Path, init_dir: Path, monkeypatch: pytest.MonkeyPatch, prior_data: str
) -> None:
    spy = _Spy(monkeypatch)
    settings = ["rwr.prior_weight=1.0", f"rwr.prior_data={prior_data}", f"rwr.cache_dir={tmp_path / 'cache'}"]
    plain = train_diffusion.train(_cfg(tmp_path / "plain", init_dir, f"rwr.cache_dir={tmp_path / 'cache'}"))
    whole = train_diffusion.train(_cfg(tmp_path / "whole", init_dir, *settings))
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rwr/prior_loss"] > 0 for r in rows) and "rwr/prior_loss" not in plain_rows[0]
    # the same kept batch; the prior term is added with weight 1 (the RWR term is the total minus it)
    assert rows[0]["rwr/loss"] - rows[0]["rwr/prior_loss"] == pytest.approx(plain_rows[0]["rwr/loss"], rel=1e-4)
    a, p = _lora(whole), _lora(plain)
    assert any(not torch.equal(a[k], p[k]) for k in a)  # the prior batch changed the update
    # killed after the first checkpoint (step 2), resumed: the same expert as the uninterrupted run
    cfg = _cfg(tmp_path / "killed", init_dir, *settings)
    spy.reset(checkpoints=1)
    with pytest.raises(_Killed):
        train_diffusion.train(cfg)
    spy.reset()
    expert = train_diffusion.train(_cfg(tmp_path / "killed", init_dir, *settings, "resume=true"))
    assert spy.generated == 0
    b = _lora(expert)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_expert_and_morl_reuse_round_0(
    tmp_path: Path, init_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spy = _Spy(monkeypatch)
    train_diffusion.train(_cfg(tmp_path / "colourfulness", init_dir))
    assert spy.generated == 2
    spy.reset()
    capsys.readouterr()
    train_diffusion.train(_cfg(tmp_path / "brightness", init_dir, "reward.optimize=brightness"))
    assert spy.generated == 0
    assert "re-used 8 cached images" in capsys.readouterr().out
    rows_c = json.loads((tmp_path / "colourfulness" / "metrics.jsonl").read_text().splitlines()[0])
    rows_b = json.loads((tmp_path / "brightness" / "metrics.jsonl").read_text().splitlines()[0])
    assert rows_b["generated/brightness"] == rows_c["generated/brightness"]  # the same images and scores
    assert rows_b["kept/brightness"] >= rows_c["kept/brightness"]  # each keeps its own top half
    assert rows_c["kept/colourfulness"] >= rows_b["kept/colourfulness"]
    # MORL: the same round 0; the scalarisation is normalised by round 0's statistics (mean 0 over it)
    spy.reset()
    train_diffusion.train(_cfg(tmp_path / "morl", init_dir, "reward.optimize=morl", "reward.weights=[0.5,0.5]",
                               "reward.normalize=true"))  # fmt: skip
    assert spy.generated == 0
    row = json.loads((tmp_path / "morl" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["generated/scalar"] == pytest.approx(0.0, abs=1e-5)
    assert row["kept/scalar"] > 0
    with pytest.raises(SoupsError, match="sum to 1"):
        train_diffusion.train(_cfg(tmp_path / "bad", init_dir, "reward.optimize=morl", "reward.weights=[0.5,0.6]"))


def test_nan_reward_stops_with_exit_2_and_the_last_checkpoint_intact(
    tmp_path: Path, init_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # nan_after scores round 0's two batches, then returns NaN in round 1 (after the step-4 checkpoint)
    out = tmp_path / "nan"
    cfg = _cfg(out, init_dir, "rwr.iterations=2", "reward.objectives=[colourfulness,{name:nan_after,after:2}]")
    with pytest.raises(SystemExit) as stop:
        train_diffusion.main(cfg)
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "'nan_after'" in err[0] and "nan" in err[0]
    last = out / "checkpoints" / "step-000004"
    assert str(last) in err[0]
    runtime.validate_checkpoint(last, runtime.check_torch_file)  # intact and finite
    assert not (out / "expert").exists()
    assert not list((out / "generations" / "round-01").glob("batch-*"))  # the NaN batch was not published


@pytest.mark.slow
def test_difffit_expert_is_a_full_unet(tmp_path: Path, init_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    expert = train_diffusion.train(_cfg(tmp_path / "d", init_dir, "trainable=difffit"))
    assert json.loads((expert / "soups_expert.json").read_text())["kind"] == "diffusers_unet"
    unet = UNet2DConditionModel.from_pretrained(expert, subfolder="unet")
    init = UNet2DConditionModel.from_pretrained(init_dir, subfolder="unet").state_dict()
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, init[k])]
    assert changed and all(k.endswith(("bias", "weight")) for k in changed)
    summary = json.loads((tmp_path / "d" / "train_summary.json").read_text())
    assert 0 < summary["trainable_fraction"] <= 0.10


@pytest.mark.slow
def test_smoke_command_finishes_offline_under_a_minute(tmp_path: Path) -> None:
    """The must-show command, as a user types it, from an empty directory (it builds the smoke init on first use).

    The bound is on the command's CPU time (user + sys of every process it starts): its wall time on a shared
    2-core machine is that divided by the share of the cores it gets, whatever the command does.
    """
    cmd = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "rl" / "train_diffusion.py"), "reward=colourfulness",
           "experiment=smoke"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expert = tmp_path / "outputs" / "train_diffusion" / "smoke-colourfulness-0" / "expert"
    assert (expert / "pytorch_lora_weights.safetensors").is_file() and (expert / "soups_expert.json").is_file()
    print(f"smoke command: wall {wall:.1f} s, CPU {cpu:.1f} s")
    assert cpu < 60, (wall, cpu)

"""The PPO trainer (rl/train_ppo.py) on a tiny offline model: LoRA moves and the base does not, every
objective is logged, resume is exact, a NaN reward stops the run with the last checkpoint intact.

The tiny model is built from a config with the embedded task's word-level tokenizer, saved with
`save_pretrained` and loaded by path through the same code as a Hub id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

from rl import train_ppo
from rl.text.models import position_ids_from_mask
from rl.text.rewards import RewardSet
from soups.registry import UnknownNameError
from soups.utils import SoupsError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "train_ppo"


# ----------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------


def test_response_mask_stops_after_first_eos() -> None:
    # EOS = 2: tokens up to and including the first EOS count, padding after it does not
    response = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 2, 2], [5, 6, 2, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert torch.equal(train_ppo.response_mask(response, eos_token_id=2), expected)


def test_position_ids_skip_left_padding() -> None:
    # cumsum([0, 0, 1, 1, 1]) - 1 = [-1, -1, 0, 1, 2]; padding -> 1
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_step_plan_is_a_function_of_seed_and_step() -> None:
    a = train_ppo.step_plan(seed=3, step=5, n_prompts=10, count=6, length_range=[4, 7])
    assert a == train_ppo.step_plan(seed=3, step=5, n_prompts=10, count=6, length_range=[4, 7])
    indices, length = a
    assert len(indices) == 6 and len(set(indices)) == 6 and all(0 <= i < 10 for i in indices)  # no replacement
    lengths = {train_ppo.step_plan(0, s, 10, 6, [4, 7])[1] for s in range(200)}
    assert lengths == {4, 5, 6, 7}  # uniform over the inclusive range: 200 draws hit all 4 values
    assert train_ppo.step_plan(3, 6, 10, 6, [4, 7])[0] != indices
    assert len(train_ppo.step_plan(0, 0, 3, 8, [1, 1])[0]) == 8  # fewer prompts than needed: with replacement
    with pytest.raises(SoupsError, match="response_length"):
        train_ppo.step_plan(0, 0, 10, 2, [5, 4])


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = train_ppo.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    train_ppo.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_check_ppo_settings() -> None:
    ok = {"batch_size": 8, "mini_batch_size": 2, "grad_accum_steps": 2, "epochs": 1, "steps": 1}
    assert train_ppo.check_ppo_settings(ok) == 4  # 8 / 2 mini-batches
    with pytest.raises(SoupsError, match="not a multiple"):
        train_ppo.check_ppo_settings({**ok, "mini_batch_size": 3})
    with pytest.raises(SoupsError, match="grad_accum_steps=3"):
        train_ppo.check_ppo_settings({**ok, "grad_accum_steps": 3})


def test_kl_controller_builder() -> None:
    assert train_ppo.build_kl_controller({"controller": "fixed", "init_coef": 0.1}).value == 0.1
    with pytest.raises(SoupsError, match="valid names: adaptive, fixed"):
        train_ppo.build_kl_controller({"controller": "pid", "init_coef": 0.1})


# ----------------------------------------------------------------------------------------------------------
# End-to-end runs on a tiny model
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer, 16-wide Llama with the embedded task's tokenizer, saved like a Hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rl.text.models import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Task:
    """Prompts from the embedded task's vocabulary."""

    train = [{"prompt": f"the {a} is {c} . summary :"} for a in ("fox", "owl", "bear") for c in ("red", "grey")]


def _count(word: str):
    def fn(samples, responses):
        return torch.tensor([r.split().count(word) / 4.0 for r in responses])

    return fn


class Interrupt:
    """A reward that behaves like `fn` until its `at`-th call, then returns NaN or kills the run."""

    def __init__(self, fn, at: int, kind: str) -> None:
        self.fn, self.at, self.kind, self.calls = fn, at, kind, 0

    def __call__(self, samples, responses):
        self.calls += 1
        if self.calls == self.at:
            if self.kind == "kill":
                raise KeyboardInterrupt
            return torch.full((len(responses),), float("nan"))
        return self.fn(samples, responses)


def rewards(b_fn=None) -> RewardSet:
    """Two objectives, optimise `red`, with running normalisation (its state must survive a resume)."""
    return RewardSet([("red", _count("red")), ("the", b_fn or _count("the"))], torch.tensor([1.0, 0.0]), "red",
                     normalize=True)


def make_cfg(model: Path, out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[
            "experiment=smoke", f"model.name_or_path={model}", f"output_dir={out}",
            "lora.target_modules=[q_proj,v_proj]",
            "generation.response_length=[3,5]", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.epochs=2",
            "ppo.grad_accum_steps=2", "ppo.lr=0.05", "kl.controller=adaptive", "kl.horizon=16", *overrides,
        ])  # fmt: skip


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_lora_moves_base_frozen_and_everything_logged(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    built = []
    real_build = train_ppo.build_policy

    def spy(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_ppo, "build_policy", spy)
    out = tmp_path / "run"
    final = train_ppo.train(make_cfg(tiny_model, out, "ppo.steps=2"), reward_set=rewards(), task=Task())

    # LoRA B starts at 0 (peft's init) and must have moved; every saved key is an adapter key.
    adapter = _adapter(final)
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert not torch.equal(_adapter(out / "checkpoints/step-000001/adapter")["base_model.model.model.layers.0"
                                                                             ".self_attn.q_proj.lora_B.weight"],
                           adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    # The base weights of the trained policy equal the checkpoint on disk, bit for bit.
    on_disk = load_file(str(tiny_model / "model.safetensors"))
    base = {k: v for k, v in built[0].get_base_model().state_dict().items() if "lora_" not in k}
    for key, value in on_disk.items():
        trained = base[key.replace(".weight", ".base_layer.weight")] if key not in base else base[key]
        assert torch.equal(trained, value), key
    assert (final / "adapter_config.json").exists() and (final / "config.yaml").exists()

    # Both objectives + PPO stats every step, in metrics.jsonl and in tensorboard events.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("objective/red", "objective/the", "kl/seq", "kl/coef", "ppo/loss_policy", "ppo/loss_value",
                    "ppo/clipfrac", "ppo/entropy", "perf/gen_tokens_per_s"):
            assert key in row and row[key] == row[key], key  # present and not NaN
    assert rows[0]["kl/seq"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: the policy IS the reference at step 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"objective/red", "objective/the", "ppo/loss_policy"} <= tags


def test_building_the_sft_init_does_not_change_the_run(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    # The first default run builds the SFT init (drawing random numbers), later ones find it cached: both must
    # train the same expert (the LoRA init and the rollouts come from the run's seed only).
    import random

    import numpy as np

    import rl.text.sft

    def build(*args, **kwargs) -> Path:  # stands in for a fresh build: it draws from every global RNG
        torch.rand(1000), random.random(), np.random.rand(10)
        return tiny_model

    cached = train_ppo.train(make_cfg(tiny_model, tmp_path / "cached", "ppo.steps=1"), reward_set=rewards(),
                             task=Task())
    monkeypatch.setattr(rl.text.sft, "ensure_sft_init", build)
    cfg = make_cfg(tiny_model, tmp_path / "built", "ppo.steps=1")
    cfg.model.name_or_path = None
    built = train_ppo.train(cfg, reward_set=rewards(), task=Task())
    a, b = _adapter(cached), _adapter(built)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact(tiny_model: Path, tmp_path: Path) -> None:
    straight = train_ppo.train(make_cfg(tiny_model, tmp_path / "a", "ppo.steps=4"), reward_set=rewards(), task=Task())

    # Same run killed during step 3 (after the step-2 checkpoint), then resumed to the end.
    killed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train_ppo.train(make_cfg(tiny_model, killed, "ppo.steps=4"),
                        reward_set=rewards(Interrupt(_count("the"), at=3, kind="kill")), task=Task())
    assert train_ppo.latest_checkpoint(killed / "checkpoints").name == "step-000002"
    assert not (killed / "adapter").exists()
    resumed = train_ppo.train(make_cfg(tiny_model, killed, "ppo.steps=4", "resume=true"), reward_set=rewards(),
                              task=Task())

    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(load_file(str(straight / "value_head.safetensors"))["weight"],
                       load_file(str(resumed / "value_head.safetensors"))["weight"])
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows_b = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(rows_b) == 4  # the rows of the killed step were dropped and rewritten once
    for ra, rb in zip(rows_a, rows_b):
        ja, jb = json.loads(ra), json.loads(rb)
        for key in ("objective/red", "objective/the", "kl/coef", "ppo/loss_policy"):
            assert ja[key] == jb[key], (ja["step"], key)
    # The adaptive KL coefficient moved, so the controller state really went through the checkpoint.
    assert json.loads(rows_a[-1])["kl/coef"] != 0.05


def test_nan_reward_stops_and_keeps_the_last_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model, out, "ppo.steps=4")
    with pytest.raises(SoupsError, match=r"step 3: reward 'the' returned nan .*step-000002"):
        train_ppo.train(cfg, reward_set=rewards(Interrupt(_count("the"), at=3, kind="nan")), task=Task())
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000002"]  # no partial step-3 dir, no staging leftovers
    assert not (out / "adapter").exists()
    last = out / "checkpoints" / "step-000002"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 2
    assert all(torch.isfinite(v).all() for v in _adapter(last / "adapter").values())


def test_existing_run_and_unknown_reward_are_clear_errors(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_ppo.train(make_cfg(tiny_model, out, "ppo.steps=1"), reward_set=rewards(), task=Task())
    with pytest.raises(SoupsError, match="resume=true .* overwrite=true"):
        train_ppo.train(make_cfg(tiny_model, out, "ppo.steps=1"), reward_set=rewards(), task=Task())
    with pytest.raises(SoupsError, match="ppo.batch_size=3 is not a multiple of ppo.mini_batch_size=2"):
        train_ppo.train(make_cfg(tiny_model, tmp_path / "bad", "ppo.batch_size=3"), reward_set=rewards(), task=Task())
    with pytest.raises(UnknownNameError, match="valid names: .*complete.*faithful"):
        train_ppo.train(make_cfg(tiny_model, tmp_path / "other", "reward.objectives=[nope]", "reward.optimize=nope"),
                        task=Task())


def test_accelerate_launch_cli_on_the_embedded_task(tiny_model: Path, tmp_path: Path) -> None:
    """The real entry point, launcher, task and rule rewards, end to end (one step)."""
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu.yaml"), str(ROOT / "rl/train_ppo.py"), "experiment=smoke",
           "reward=complete", f"model.name_or_path={tiny_model}", "ppo.steps=1", "task.n_train=16", "task.n_eval=0"]
    done = subprocess.run([*cmd, f"output_dir={out}", "ppo.batch_size=4", "ppo.mini_batch_size=2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"objective/complete", "objective/faithful"} <= row.keys()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    bad = subprocess.run([*cmd, f"output_dir={tmp_path / 'bad'}", "ppo.batch_size=3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error: ppo.batch_size=3 is not a multiple" in bad.stderr


# ----------------------------------------------------------------------------------------------------------
# Checkpoints that cannot go bad: validation, fallback on resume, no non-finite save, config checks
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_steps(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-step run keeping every checkpoint, and the final adapter of resuming it from step 2 directly (its
    step-3 checkpoint, adapter and metrics removed first)."""
    import shutil

    base = tmp_path_factory.mktemp("three") / "run"
    train_ppo.train(make_cfg(tiny_model, base, "ppo.steps=3", "checkpoint.keep=0"), reward_set=rewards(), task=Task())
    direct = base.parent / "direct"
    shutil.copytree(base, direct)
    shutil.rmtree(direct / "checkpoints" / "step-000003")
    shutil.rmtree(direct / "adapter")
    resumed = train_ppo.train(make_cfg(tiny_model, direct, "ppo.steps=3", "checkpoint.keep=0", "resume=true"),
                              reward_set=rewards(), task=Task())
    return base, _adapter(resumed)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_adapter(ckpt: Path) -> None:
    """NaN in one LoRA tensor, with a manifest that matches (as if the bad weights had been saved as such)."""
    from safetensors.torch import save_file

    from rl import runtime

    path = ckpt / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    (ckpt / "manifest.json").write_text(json.dumps({"files": runtime._describe_files(ckpt)}))


def _nan_optimizer_no_manifest(ckpt: Path) -> None:
    """NaN in the Adam moments of a checkpoint without a manifest (as the trainer wrote them before manifests)."""
    opt = torch.load(ckpt / "optimizer_rank0.pt", weights_only=True)
    opt["state"][0]["exp_avg"].fill_(float("nan"))
    torch.save(opt, ckpt / "optimizer_rank0.pt")
    (ckpt / "manifest.json").unlink()


@pytest.mark.parametrize("damage, why", [
    (lambda c: _truncate(c / "adapter" / "adapter_model.safetensors"), "adapter_model.safetensors has"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 3, "kl_contr'), "trainer_state.json is unreadable"),
    (lambda c: _truncate(c / "optimizer_rank0.pt"), "optimizer_rank0.pt has"),
    (_nan_adapter, "adapter_model.safetensors: tensor .* has non-finite values"),
    (_nan_optimizer_no_manifest, "optimizer_rank0.pt has non-finite values in state.0.exp_avg"),
], ids=["truncated-adapter", "broken-state", "truncated-optimizer", "nan-adapter", "nan-optimizer-legacy"])  # fmt: skip
def test_resume_skips_a_broken_newest_checkpoint(three_steps, tiny_model: Path, tmp_path: Path, damage, why) -> None:
    import shutil

    from rl import runtime

    base, direct = three_steps
    out = tmp_path / "run"
    shutil.copytree(base, out)
    broken = out / "checkpoints" / "step-000003"
    damage(broken)
    with pytest.raises(SoupsError, match=why):
        runtime.validate_checkpoint(broken, runtime.check_torch_file)
    with pytest.warns(RuntimeWarning, match=rf"checkpoint {broken} is broken \(.*{why}.*\); set aside as broken-"
                                            rf"step-000003, resuming from {out / 'checkpoints' / 'step-000002'}"):
        final = train_ppo.train(make_cfg(tiny_model, out, "ppo.steps=3", "checkpoint.keep=0", "resume=true"),
                                reward_set=rewards(), task=Task())
    # The result equals resuming from step 2 directly (and the uninterrupted run: resume is exact).
    resumed = _adapter(final)
    assert resumed.keys() == direct.keys() and all(torch.equal(resumed[k], direct[k]) for k in direct)
    assert all(torch.equal(resumed[k], v) for k, v in _adapter(base / "adapter").items())
    # The broken one is kept aside for inspection; a valid step 3 replaced it.
    assert (out / "checkpoints" / "broken-step-000003").is_dir()
    runtime.validate_checkpoint(out / "checkpoints" / "step-000003", runtime.check_torch_file)


def test_diverging_run_stops_and_saves_nothing_non_finite(tiny_model: Path, tmp_path: Path) -> None:
    from rl import runtime

    # One mini-batch per step and lr = 1e10: step 1 is finite and checkpointed, step 2's update overflows.
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model, out, "ppo.steps=4", "ppo.lr=1e10", "ppo.mini_batch_size=4", "ppo.grad_accum_steps=1",
                   "ppo.epochs=1", "checkpoint.keep=0")
    last = out / "checkpoints" / "step-000001"
    with pytest.raises(SoupsError, match=r"^step 2: the update made .*lora.* non-finite; lower ppo.lr=10000000000.0; "
                                         rf"stopping. Last good checkpoint \(intact\): {last}$"):
        train_ppo.train(cfg, reward_set=rewards(), task=Task())
    saved = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step-000001"] and not (out / "adapter").exists()
    runtime.validate_checkpoint(saved[0], runtime.check_torch_file)  # complete and finite, optimizer included


@pytest.mark.parametrize("override, message", [
    ("ppo.lr=-1", r"ppo.lr=-1 must be a finite number in \(0, inf\)"),
    ("ppo.lr=nan", r"ppo.lr=nan must be a finite number in \(0, inf\)"),
    ("mixed_precision=fp8", "mixed_precision='fp8' is not valid; valid options: auto, no, fp16, bf16"),
    ("kl.estimator=k4", "kl.estimator='k4' is not valid; valid options: k1, k2, k3, abs"),
    ("ppo.gamma=1.5", r"ppo.gamma=1.5 must be a finite number in \[0, 1\]"),
])  # fmt: skip
def test_bad_config_values_are_named_before_anything_runs(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(SoupsError, match=f"^{message}$"):
        train_ppo.train(make_cfg(tmp_path / "no-model", tmp_path / "run", override), reward_set=rewards(), task=Task())
    assert not (tmp_path / "run").exists()


def test_bad_config_values_exit_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for override, message in (("ppo.lr=nan", "ppo.lr=nan must be"), ("mixed_precision=fp8", "mixed_precision='fp8'")):
        done = subprocess.run([sys.executable, str(ROOT / "rl/train_ppo.py"), override, f"output_dir={tmp_path}/x"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), done.stderr[-2000:]
        assert "Traceback" not in done.stderr

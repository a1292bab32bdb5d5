"""The mixing engine refuses what it cannot mix correctly, and never loses data.

LoRA factors in every naming style, int8/float8 tensors that differ across experts, NaN experts in a `Soup` (and
so in `soups.pareto`), zero-sum weights, LoRA options on full checkpoints, scalar/string list options, and the
output directory: exclusive publication (one unit test at the rename step, one race between two real
`python -m soups.mix` processes), overwrite only of Soups outputs, stale temporary directories, umask modes.
All inputs are real safetensors files written here.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file, save_file
from torch import nn

import soups.mix
import soups.utils
from soups.checkpoint import open_checkpoint
from soups.interpolate import find_lora_factor, interpolate, validate_weights
from soups.mix import mix
from soups.soup import Soup
from soups.utils import SoupsError, atomic_dir, clean_stale_tmp, rename_noreplace, written_by_soups

REPO = Path(__file__).resolve().parents[2]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run_in_process(overrides: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> str:
    """Runs the `soups.mix` CLI body on composed overrides; asserts exit 2 and one error line, returns it."""
    monkeypatch.chdir(cwd)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs" / "mix"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "progress=false"])
    with pytest.raises(SystemExit) as exit_info:
        soups.mix.run(cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---- LoRA factors are never mixed as weights -------------------------------------------------------------------

R, D = 2, 4
# Real key layouts of each naming style (one adapted module each), as the libraries write them.
LORA_STYLES = {
    "peft": ({"base_model.model.h.0.attn.c_attn.lora_A.weight": (R, D),
              "base_model.model.h.0.attn.c_attn.lora_B.weight": (D, R)}, "PEFT"),
    "diffusers": ({"unet.down_blocks.0.attentions.0.to_q.lora.down.weight": (R, D),
                   "unet.down_blocks.0.attentions.0.to_q.lora.up.weight": (D, R)}, "diffusers"),
    "diffusers_processor": ({"down_blocks.0.attn1.processor.to_q_lora.down.weight": (R, D),
                             "down_blocks.0.attn1.processor.to_q_lora.up.weight": (D, R)}, "diffusers"),
    "kohya": ({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (R, D),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (D, R)}, "kohya"),
    "lora_down_up": ({"text_encoder.layers.0.q_proj.lora_down.weight": (R, D),
                      "text_encoder.layers.0.q_proj.lora_up.weight": (D, R)}, "lora_down/lora_up"),
}


def _lora_file(path: Path, style: str, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    keys, _ = LORA_STYLES[style]
    save_file({k: torch.randn(shape, generator=generator) for k, shape in keys.items()}, path)
    return path


@pytest.mark.parametrize("style", list(LORA_STYLES))
def test_lora_factor_files_are_refused_in_every_naming_style(tmp_path: Path, style: str) -> None:
    a = _lora_file(tmp_path / "a.safetensors", style, 0)
    b = _lora_file(tmp_path / "b.safetensors", style, 1)  # equal ranks: shapes match, so only the names tell
    before = _listing(tmp_path)
    with pytest.raises(SoupsError, match=rf"expert .*a\.safetensors holds LoRA factors.*\({LORA_STYLES[style][1]}"):
        mix([a, b], [0.5, 0.5], tmp_path / "soup", progress=False)
    assert _listing(tmp_path) == before
    with pytest.raises(SoupsError, match="holds LoRA factors"):  # the resident Soup refuses them too
        Soup.from_checkpoints([a, b], nn.Linear(1, 1), progress=False)


def test_diffusers_lora_dirs_through_the_cli_are_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    dirs = []
    for i in range(2):  # diffusers' save_lora_weights layout: <dir>/pytorch_lora_weights.safetensors
        d = tmp_path / f"lora_{i}"
        d.mkdir()
        _lora_file(d / "pytorch_lora_weights.safetensors", "diffusers", i)
        dirs.append(d)
    before = _listing(tmp_path)
    line = _run_in_process([f"experts=[{dirs[0]},{dirs[1]}]", "weights=[0.5,0.5]", f"output={tmp_path / 'soup'}"],
                           tmp_path, monkeypatch, capsys)
    assert re.search(r"lora_0 holds LoRA factors, not full weights \(diffusers .*lora\.down\.weight", line), line
    assert "(Σλ_i B_i)(Σλ_i A_i)" in line and "PEFT adapter" in line and "merge each LoRA" in line
    assert _listing(tmp_path) == before


def test_ordinary_model_keys_are_not_taken_for_lora() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    keys = list(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).state_dict())
    # LLaMA's names (as LlamaForCausalLM.state_dict() lists them), with down_proj/up_proj
    keys += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                               "input_layernorm", "post_attention_layernorm")
    ]
    # UNet-like and look-alike names: up/down blocks and projections are not LoRA factors
    keys += ["down_blocks.0.resnets.0.conv1.weight", "up_blocks.1.upsamplers.0.conv.weight",
             "mid_block.attentions.0.proj_out.weight", "flora_A.weight", "explorer.up.weight", "color_down.bias"]
    assert any("down_proj" in k for k in keys) and any("up_proj" in k for k in keys)
    assert find_lora_factor(keys) is None


# ---- integer and quantized tensors ------------------------------------------------------------------------------


def _int8_experts(tmp_path: Path, same_weight: bool) -> list[Path]:
    """Two bitsandbytes-like int8 checkpoints (int8 `weight` + float `SCB` scales) with an int64 position_ids
    buffer equal in both and a BatchNorm counter that differs."""
    paths = []
    for i in range(2):
        generator = torch.Generator().manual_seed(0 if same_weight else i)
        state = {
            "layer.weight": torch.randint(-127, 128, (4, 4), generator=generator, dtype=torch.int8),
            "layer.SCB": torch.tensor([1.0, 2.0, 3.0, 4.0]) * (i + 1),
            "embeddings.position_ids": torch.arange(8).unsqueeze(0),
            "bn.num_batches_tracked": torch.tensor(10 * (i + 1)),
        }
        save_file(state, tmp_path / f"q{i}.safetensors")
        paths.append(tmp_path / f"q{i}.safetensors")
    return paths


def test_int8_weights_that_differ_are_refused_with_a_dequantize_hint(tmp_path: Path) -> None:
    a, b = _int8_experts(tmp_path, same_weight=False)
    assert not torch.equal(load_file(a)["layer.weight"], load_file(b)["layer.weight"])
    before = _listing(tmp_path)
    with pytest.raises(SoupsError, match=r"tensor 'layer\.weight' is int8 and differs between experts "
                                         r".*q0\.safetensors and .*q1\.safetensors.*dequantize"):
        mix([a, b], [0.5, 0.5], tmp_path / "soup", progress=False)
    assert _listing(tmp_path) == before  # the partial output was removed


def test_equal_integer_buffers_and_counters_are_copied_from_the_first_expert(tmp_path: Path) -> None:
    a, b = _int8_experts(tmp_path, same_weight=True)
    out = dict(interpolate([open_checkpoint(a), open_checkpoint(b)], [0.25, 0.75]))
    assert torch.equal(out["layer.weight"], load_file(a)["layer.weight"])  # equal in both: copied as is
    assert torch.equal(out["embeddings.position_ids"], torch.arange(8).unsqueeze(0))
    assert out["bn.num_batches_tracked"].item() == 10  # a counter: the first expert's, though they differ
    # float scales are mixed: 0.25 * s + 0.75 * 2s = 1.75 s
    assert torch.allclose(out["layer.SCB"], torch.tensor([1.0, 2.0, 3.0, 4.0]) * 1.75)


def test_float8_weights_that_differ_are_refused(tmp_path: Path) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    for i, value in enumerate((0.5, 1.0)):
        save_file({"w": torch.full((2, 2), value).to(torch.float8_e4m3fn), "w_scale": torch.ones(1)},
                  tmp_path / f"f{i}.safetensors")
    experts = [open_checkpoint(tmp_path / f"f{i}.safetensors") for i in range(2)]
    with pytest.raises(SoupsError, match=r"tensor 'w' is float8_e4m3fn and differs"):
        dict(interpolate(experts, [0.5, 0.5]))


class _Quantized(nn.Module):
    """A model with a float layer and an int8 buffer, like a quantized checkpoint's module."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("qweight", torch.zeros(2, 2, dtype=torch.int8))


def test_resident_soup_follows_the_same_integer_rule(tmp_path: Path) -> None:
    for i, q in enumerate((1, 2)):
        state = {"linear.weight": torch.full((2, 2), float(i)), "linear.bias": torch.zeros(2),
                 "qweight": torch.full((2, 2), q, dtype=torch.int8)}
        save_file(state, tmp_path / f"d{i}.safetensors")
    differing = [tmp_path / "d0.safetensors", tmp_path / "d1.safetensors"]
    with pytest.raises(SoupsError, match=r"tensor 'qweight' is int8 and differs .*d0\.safetensors .*dequantize"):
        Soup.from_checkpoints(differing, _Quantized(), progress=False)
    soup = Soup.from_checkpoints([differing[0], differing[0]], _Quantized(), weights=[0.5, 0.5], progress=False)
    assert soup.model.qweight.tolist() == [[1, 1], [1, 1]]


# ---- NaN experts in a Soup, and so in soups.pareto --------------------------------------------------------------


def _nan_pair(tmp_path: Path) -> list[Path]:
    save_file({"weight": torch.ones(1, 1), "bias": torch.zeros(1)}, tmp_path / "ok.safetensors")
    save_file({"weight": torch.full((1, 1), float("nan")), "bias": torch.zeros(1)}, tmp_path / "nan.safetensors")
    return [tmp_path / "ok.safetensors", tmp_path / "nan.safetensors"]


def test_soup_refuses_a_nan_expert_when_built(tmp_path: Path) -> None:
    with pytest.raises(SoupsError, match=r"tensor 'weight' of expert .*nan\.safetensors holds NaN/Inf"):
        Soup.from_checkpoints(_nan_pair(tmp_path), nn.Linear(1, 1), progress=False)


def test_soup_from_lora_refuses_a_nan_adapter(tmp_path: Path) -> None:
    from lora_fixtures import load_base, save_adapter, save_base

    base = save_base(tmp_path, "gpt2")
    good = save_adapter(base, tmp_path / "good", 0)
    bad = save_adapter(base, tmp_path / "bad", 1)
    state = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("inf")
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(SoupsError, match=r"lora_B' of expert .*bad holds NaN/Inf"):
        Soup.from_lora([good, bad], load_base(base))


class _NormEvaluator:
    """One objective: minus the squared norm of the model's floating weights."""

    objectives = ("norm",)

    def evaluate(self, model: nn.Module) -> dict:
        from soups.pareto_registry import ObjectiveStat

        value = -sum(float((p.double() ** 2).sum()) for p in model.state_dict().values() if p.is_floating_point())
        return {"norm": ObjectiveStat(value, 0.0, 1)}


def test_pareto_front_with_a_nan_expert_fails_and_writes_nothing(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from soups.pareto import run_front
    from soups.pareto_registry import EVALUATORS

    if "guards_norm" not in EVALUATORS:
        EVALUATORS.add("guards_norm", lambda cfg, *, experts, device: _NormEvaluator())
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16))
        if i == 1:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        model.save_pretrained(tmp_path / f"e{i}")
        paths.append(tmp_path / f"e{i}")
    out = tmp_path / "front"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs" / "pareto"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experts=[{paths[0]},{paths[1]}]", "evaluator.name=guards_norm",
                                           "grid.n_points=3", f"output={out}", "device=cpu"])
    with pytest.raises(SoupsError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' of expert .*e1 holds NaN/Inf"):
        run_front(cfg)
    assert not out.exists()


# ---- weights and options: one error line, exit 2 ----------------------------------------------------------------


def test_zero_sum_weights_are_refused_even_with_extrapolation() -> None:
    with pytest.raises(SoupsError, match=r"are all 0"):
        validate_weights([0, 0], 2, allow_extrapolation=True)
    with pytest.raises(SoupsError, match=r"sum to 0: .*not a model"):
        validate_weights([1.0, -1.0], 2, allow_extrapolation=True)
    assert validate_weights([1.0, -1.0], 2, allow_extrapolation=True, allow_zero_sum=True) == [1.0, -1.0]
    with pytest.raises(SoupsError, match=r"are all 0"):  # no mode makes the all-zero soup meaningful
        validate_weights([0.0, 0.0], 2, allow_extrapolation=True, allow_zero_sum=True)
    assert validate_weights([2.0, -1.0], 2, allow_extrapolation=True) == [2.0, -1.0]  # Σ = 1: extrapolation


CLI_CASES = {
    "scalar_weights": (["weights=0.5"], r"weights must be a list, e\.g\. weights=\[0\.5,0\.5\]; got 0\.5"),
    "string_experts": (["experts=EXPERT_A", "weights=null"],
                       r"experts must be a list, e\.g\. .*got '.*a\.safetensors'"),
    "lora_mode": (["lora_mode=ab"],
                  r"lora_mode=ab applies only to PEFT adapter experts, but .*a\.safetensors is a full"),
    "lora_output": (["lora_output=adapter"], r"lora_output=adapter applies only to PEFT adapter experts"),
    "explicit_default_lora_mode": (["lora_mode=delta"], r"lora_mode=delta applies only to PEFT adapter experts"),
    "base": (["base=some/base"], r"base=some/base applies only to PEFT adapter experts"),
    "all_zero": (["weights=[0,0]", "allow_extrapolation=true"], r"weights \[0\.0, 0\.0\] are all 0"),
    "zero_sum": (["weights=[1,-1]", "allow_extrapolation=true"], r"weights \[1\.0, -1\.0\] sum to 0"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_options_are_one_error_line(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, a)
    save_file({"w": torch.ones(2)}, b)
    extra, expected = CLI_CASES[case]
    extra = [e.replace("EXPERT_A", str(a)) for e in extra]
    overrides = [f"experts=[{a},{b}]", "weights=[0.5,0.5]", f"output={tmp_path / 'soup'}", *extra]
    before = _listing(tmp_path)
    line = _run_in_process(overrides, tmp_path, monkeypatch, capsys)
    assert re.search(expected, line), line
    assert _listing(tmp_path) == before


# ---- the output directory ---------------------------------------------------------------------------------------


def test_the_rename_step_is_exclusive_when_another_run_publishes_first(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(SoupsError, match=rf"output {re.escape(str(target))} was written by another run"):
        with atomic_dir(target) as mine:
            (mine / "who").write_text("first")
            with atomic_dir(target) as theirs:  # a concurrent run that started later but finished first
                (theirs / "who").write_text("second")
    assert (target / "who").read_text() == "second"  # the winner's output is intact, the loser left nothing
    assert _listing(tmp_path) == ["out", "out/.soups", "out/who"]


def test_overwrite_replaces_only_the_output_it_found(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "who").write_text("old")
    with pytest.raises(SoupsError, match="was written by another run"):
        with atomic_dir(target, overwrite=True) as mine:
            (mine / "who").write_text("slow")
            with atomic_dir(target, overwrite=True) as theirs:  # replaces "old" while the slow run works
                (theirs / "who").write_text("fast")
    assert (target / "who").read_text() == "fast"
    assert _listing(tmp_path) == ["out", "out/.soups", "out/who"]
    with atomic_dir(target, overwrite=True) as tmp:  # alone, overwrite replaces it
        (tmp / "who").write_text("new")
    assert (target / "who").read_text() == "new"


def test_rename_noreplace_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(src, tmp_path / "empty")  # a plain rename would replace an empty directory
    monkeypatch.setattr(soups.utils, "_RENAMEAT2", None)  # the portable fallback
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "g").write_text("y")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, tmp_path / "full")
    rename_noreplace(src, tmp_path / "new")
    assert (tmp_path / "new" / "f").read_text() == "x" and (tmp_path / "full" / "g").read_text() == "y"


def test_overwrite_refuses_a_directory_soups_did_not_write(tmp_path: Path) -> None:
    experts = tmp_path / "experts"
    experts.mkdir()
    a, b = experts / "a.safetensors", experts / "b.safetensors"
    save_file({"w": torch.zeros(2)}, a)
    save_file({"w": torch.ones(2)}, b)
    project = tmp_path / "project"  # like `output=..`: a parent directory with the user's files
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    with pytest.raises(SoupsError, match=rf"output {re.escape(str(project))} exists and was not written by Soups"):
        mix([a, b], [0.5, 0.5], project, overwrite=True, progress=False)
    assert (project / "notes.txt").read_text() == "precious"
    assert not written_by_soups(project) and not written_by_soups(a)
    soup = mix([a, b], [0.5, 0.5], tmp_path / "soup", progress=False).output
    assert written_by_soups(soup) and (soup / ".soups").is_file()
    (soup / ".soups").unlink()
    assert written_by_soups(soup)  # soup.json alone (a soup written before the marker existed) still counts
    mix([a, b], [0.25, 0.75], soup, overwrite=True, progress=False)
    assert load_file(soup / "model.safetensors")["w"].tolist() == [0.75, 0.75]


def test_stale_temporary_dirs_are_cleaned_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead = tmp_path / ".out.tmp-dead"  # a killed run: marker present, nobody holds its lock
    dead.mkdir()
    (dead / ".soups").write_text("")
    (dead / "model.safetensors").write_bytes(b"partial")
    legacy = tmp_path / ".out.tmp-legacy"  # from before the marker: judged by age
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    young = tmp_path / ".out.tmp-young"  # no marker yet, just created: maybe a run starting now
    young.mkdir()
    live = tmp_path / ".out.tmp-live"  # a run still writing: it holds the lock on its marker
    live.mkdir()
    fd = os.open(live / ".soups", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / ".other.tmp-dead"  # another target's leftovers are not ours to judge
    other.mkdir()
    try:
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-dead", ".out.tmp-live", ".out.tmp-young", "out"]


def test_stale_dirs_that_cannot_be_removed_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b"):
        (tmp_path / f".out.tmp-{name}").mkdir()
        (tmp_path / f".out.tmp-{name}" / ".soups").write_text("")

    def refuse(path: Path) -> None:  # as root, permissions cannot make rmtree fail
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(soups.utils.shutil, "rmtree", refuse)
    with pytest.raises(SoupsError, match=r"cannot remove 2 temporary dir\(s\) .*\.out\.tmp-a \(Permission denied\), "
                                         r".*\.out\.tmp-b .*remove them by hand"):
        clean_stale_tmp(tmp_path / "out")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_published_dirs_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
        mode = (tmp_path / "out").stat().st_mode & 0o777
        file_mode = (tmp_path / "out" / ".soups").stat().st_mode & 0o777
    finally:
        os.umask(previous)
    assert mode == 0o777 & ~umask and file_mode == 0o666 & ~umask


# Test-side hook, not in the library: makes each `python -m soups.mix` wait at the publish step until both runs
# are there, so the two runs certainly overlap (both passed the start-of-run existence check).
_BARRIER_HOOK = '''
import os, time
from pathlib import Path
import soups.utils as _u
_publish = _u._publish
def _waiting(tmp, target, seen):
    barrier = Path(os.environ["SOUPS_TEST_BARRIER"])
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 240
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return _publish(tmp, target, seen)
_u._publish = _waiting
'''


def test_two_concurrent_mix_processes_one_wins_the_other_exits_2(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(3), "v": torch.full((2,), 4.0)}, a)
    save_file({"w": torch.ones(3), "v": torch.zeros(2)}, b)
    hook, barrier, out = tmp_path / "hook", tmp_path / "barrier", tmp_path / "soup"
    hook.mkdir()
    barrier.mkdir()
    (hook / "sitecustomize.py").write_text(_BARRIER_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SOUPS_TEST_BARRIER": str(barrier),
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    weights = {"first": "[0.25,0.75]", "second": "[0.75,0.25]"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "soups.mix", f"experts=[{a},{b}]", f"weights={lam}",
                                f"output={out}", "progress=false"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, lam in weights.items()
    }
    results = {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    assert len(list(barrier.iterdir())) == 2, results  # both reached the rename: the runs overlapped
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(name for name, (code, _, _) in results.items() if code == 0)
    loser_err = next(err for code, _, err in results.values() if code == 2)
    lines = [line for line in loser_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == (
        f"error: output {out} was written by another run while this one was working; this run's result is "
        "discarded (the other run's output is kept)"
    ), lines
    # the output is the winner's whole soup, not a blend of the two runs
    lam = json.loads(weights[winner])
    assert json.loads((out / "soup.json").read_text())["weights"] == lam
    state = load_file(out / "model.safetensors")
    assert state["w"].tolist() == [lam[1]] * 3 and state["v"].tolist() == [4.0 * lam[0]] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "barrier", "hook", "soup"]

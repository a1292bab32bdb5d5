"""Every entry point, given a mistake on its command line, prints one `error: ...` line and exits 2.

Each row runs the real command in a subprocess (the README's promise is about what a user sees), from an empty
directory so that a row that wrongly starts a run writes nothing into the repository. The rows run in parallel,
once per module; most fail in `soups.cli.precheck` before torch is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

ENTRY_POINTS = {
    "mix": ["-m", "soups.mix"],
    "pareto": ["-m", "soups.pareto"],
    "quickstart": ["-m", "soups.quickstart"],
    "serve": ["-m", "soups.serve"],
    "train_ppo": [str(REPO / "rl" / "train_ppo.py")],
    "train_captioning": [str(REPO / "rl" / "train_captioning.py")],
    "train_brax": [str(REPO / "rl" / "train_brax.py")],
    "train_diffusion": [str(REPO / "rl" / "train_diffusion.py")],
    "vision_train": [str(REPO / "vision" / "train.py")],
    "vision_sweep": [str(REPO / "vision" / "sweep.py")],
    "vision_average": [str(REPO / "vision" / "average.py")],
    "train_ensemble": [str(REPO / "vision" / "train_ensemble.py")],
}
# An unknown option of a config group of the entry point's own (Hydra's launcher group where it has none).
GROUP_ROWS = {
    "pareto": "evaluator=nope",
    "serve": "evaluator=nope",
    "train_ppo": "task=nope",
    "train_captioning": "reward=nope",
    "train_brax": "reward=nope",
    "train_diffusion": "reward=nope",
    "train_ensemble": "method=nope",
    "quickstart": "task=nope",
}
# The seed key (vision/sweep.py has no top-level seed; its soups' pair sampling has one).
SEED_KEYS = {"vision_sweep": "average.seed"}

# Two tiny experts that `results` writes into each row's directory.
TWO_EXPERTS = ["experts=[a.safetensors,b.safetensors]", "output=out"]

ROWS: list[Any] = []
for _name in ENTRY_POINTS:
    _group = GROUP_ROWS.get(_name, "hydra/launcher=nope")
    _seed = SEED_KEYS.get(_name, "seed")
    ROWS += [
        pytest.param(_name, ["no_such_key=1"], "no_such_key", id=f"{_name}-unknown-key"),
        pytest.param(_name, [_group], "nope", id=f"{_name}-unknown-group-option"),
        pytest.param(_name, ["experiment=nope"], "experiment", id=f"{_name}-unknown-experiment"),
        pytest.param(_name, [f"{_seed}=abc"], "abc", id=f"{_name}-seed-abc"),
    ]
ROWS += [
    pytest.param("train_ppo", ["experiment=smok"], "did you mean 'smoke'", id="train_ppo-misspelled-experiment"),
    pytest.param("train_ppo", ["ppo.lrr=1e-3"], "did you mean 'ppo.lr'", id="train_ppo-nested-unknown-key"),
    pytest.param("train_ppo", ["ppo=5"], "section", id="train_ppo-scalar-for-section"),
    pytest.param("pareto", ["dtype=float7"], "float7", id="pareto-dtype-float7"),
    pytest.param("serve", ["experts=[a.safetensors]"], "at least 2 experts", id="serve-one-expert"),
    pytest.param("mix", ["weights=0.5", "output=out"], "weights", id="mix-scalar-weights"),
    pytest.param("mix", ["experts=path", "output=out"], "experts", id="mix-string-experts"),
    pytest.param("mix", [*TWO_EXPERTS, "weights=[0,0]", "allow_extrapolation=true"], "weights", id="mix-zero-sum"),
    pytest.param("train_ppo", ["ppo.lr=-1"], "ppo.lr", id="train_ppo-negative-lr"),
    pytest.param("train_ppo", ["ppo.lr=nan"], "ppo.lr", id="train_ppo-nan-lr"),
    pytest.param("train_ppo", ["mixed_precision=fp8"], "fp8", id="train_ppo-fp8"),
    pytest.param("train_captioning", ["scst.lr=-1"], "scst.lr", id="train_captioning-negative-lr"),
    pytest.param("train_captioning", ["scst.baseline=mean"], "greedy, leave_one_out", id="train_captioning-baseline"),
    pytest.param("train_captioning", ["scst.samples=1", "scst.baseline=leave_one_out"], "scst.samples >= 2",
                 id="train_captioning-loo-one-sample"),
    pytest.param("train_captioning", ["task=karpathy", "task.karpathy_json=missing.json", "task.images_dir=."],
                 "Karpathy split file", id="train_captioning-missing-karpathy-json"),
    pytest.param("train_captioning", ["reward=meteor", "java=/nonexistent/java", "experiment=smoke"], "METEOR",
                 id="train_captioning-missing-java"),
    pytest.param("train_captioning", ["reward.optimize=spice", "experiment=smoke"], "spice",
                 id="train_captioning-unknown-optimize"),
    pytest.param("train_brax", ["env.name=cheetah"], "valid: ant, halfcheetah, hopper, humanoid, swimmer",
                 id="train_brax-unknown-env"),
    pytest.param("train_brax", ["env.backend=fast"], "valid: generalized, positional, spring, mjx",
                 id="train_brax-unknown-backend"),
    pytest.param("train_brax", ["env.name=swimmer", "env.backend=positional"], "valid for it: generalized",
                 id="train_brax-env-backend"),
    pytest.param("train_brax", ["reward=morl", "reward.weights=[0.5,0.6]"], "sum to 1", id="train_brax-morl-weights"),
    pytest.param("train_brax", ["normalizer=mix"], "frozen, interpolate", id="train_brax-unknown-normalizer"),
    pytest.param("train_brax", ["init=no_such_dir"], "no brax_policy.json", id="train_brax-missing-init"),
    pytest.param("train_brax", ["ppo.num_envs=7"], "multiple of ppo.num_envs=7", id="train_brax-num-envs"),
    pytest.param("train_diffusion", ["reward.objectives=[nope]"], "colourfulness",
                 id="train_diffusion-unknown-reward"),
    pytest.param("train_diffusion", ["task.prompts=missing.txt"], "missing.txt does not exist",
                 id="train_diffusion-missing-prompt-file"),
    pytest.param("train_diffusion", ["task.prompts=empty.txt"], "empty.txt is empty",
                 id="train_diffusion-empty-prompts"),
    pytest.param("train_diffusion", ["rwr.keep=1.5"], "rwr.keep=1.5", id="train_diffusion-bad-keep"),
    pytest.param("pareto", ["evaluator=brax", "experts=[a,b]"], "checkpoint not found", id="pareto-brax-missing"),
    pytest.param("mix", ["experts=[ea,eb]", "output=out"], "experts ea and eb have different base pipelines",
                 id="mix-diffusers-different-bases"),
    pytest.param("pareto", ["experts=[ea,eb]"], "experts ea and eb have different base pipelines",
                 id="pareto-diffusers-different-bases"),
    pytest.param("vision_train", ["-m", "seed=1,x"], "'x'", id="vision_train-multirun-bad-seed"),
    pytest.param("vision_sweep", ["launcher=slurm"], "valid: local, submitit", id="vision_sweep-unknown-launcher"),
    pytest.param("quickstart", ["launcher=slurm"], "valid: inprocess, python, accelerate, submitit",
                 id="quickstart-unknown-launcher"),
    pytest.param("vision_sweep", ["launcher=submitit", "submitit.cluster=ray"], "valid: local, slurm",
                 id="vision_sweep-unknown-submitit-cluster"),
]
# Without a GPU, device=cuda is a mistake; with one it is a valid run (and not a quick one).
ROWS.append(pytest.param("pareto", ["device=cuda"], "cuda", id="pareto-device-cuda",
                         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")))  # fmt: skip


def _row_key(entry: str, args: list[str]) -> tuple[str, ...]:
    return (entry, *args)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Runs every row once, in parallel, each from its own empty directory (with two tiny experts in it, and two
    diffusers expert dirs `ea`, `eb` that record different base pipelines)."""
    from safetensors.torch import save_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    env.pop("HYDRA_FULL_ERROR", None)
    rows = [(p.values[0], p.values[1]) for p in ROWS if not any(m.name == "skipif" and m.args[0] for m in p.marks)]

    def run(row: tuple[str, list[str]]) -> tuple[tuple[str, ...], subprocess.CompletedProcess]:
        entry, args = row
        cwd = tmp_path_factory.mktemp(entry)
        for name in ("a", "b"):
            save_file({"w": torch.ones(2)}, str(cwd / f"{name}.safetensors"))
        for name, base in (("ea", "base_one"), ("eb", "base_two")):  # diffusers experts of two different bases
            (cwd / name).mkdir()
            (cwd / name / "soups_expert.json").write_text(f'{{"kind": "diffusers_lora", "base": "{base}"}}')
        (cwd / "empty.txt").write_text("# a prompt file without prompts\n")
        proc = subprocess.run([sys.executable, *ENTRY_POINTS[entry], *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip
        return _row_key(entry, args), proc

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, rows))


@pytest.mark.parametrize(("entry", "args", "named"), ROWS)
def test_mistake_is_one_error_line_and_exit_2(
    results: dict[tuple[str, ...], subprocess.CompletedProcess], entry: str, args: list[str], named: str
) -> None:
    proc = results[_row_key(entry, args)]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = f"$ {entry} {' '.join(args)}\nexit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert named in lines[0], shown

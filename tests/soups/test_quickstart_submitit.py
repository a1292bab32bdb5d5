"""`python -m soups.quickstart launcher=submitit`: the smoke stages as real submitit local jobs; idempotent re-runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _quickstart(out: Path) -> str:
    cmd = [sys.executable, "-m", "soups.quickstart", "experiment=smoke", "launcher=submitit", f"output_dir={out}",
           "mix.enabled=false", "submitit.array_parallelism=3", "submitit.timeout_min=20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _submitted(out: Path) -> set[Path]:
    """One log per submitted job, beside each stage's output (experts/<r>.submitit/, morl/<mu>.submitit/, front...)."""
    return set(out.glob("**/*.submitit/*_0_log.out"))


@pytest.mark.slow
def test_quickstart_stages_through_submitit_local(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    _quickstart(out)
    runs = [out / "experts" / "complete", out / "experts" / "faithful", out / "morl" / "mu0.50"]
    for run in runs:  # every training run finished in its own job, its logs beside it
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert len(list(Path(f"{run}.submitit").glob("*_0_log.out"))) == 1
    rows = [json.loads(x) for x in (out / "front" / "front.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"init", "morl", "expert", "soup"}
    submitted = _submitted(out)
    assert len(submitted) == 4  # 3 training runs + the front

    printed = _quickstart(out)  # a re-run submits nothing
    assert _submitted(out) == submitted and printed.count("done, reusing") == 4

    shutil.rmtree(runs[1])  # a killed training job leaves no finished adapter: only it is submitted again
    shutil.rmtree(out / "front")
    _quickstart(out)
    new = _submitted(out) - submitted
    assert sorted(p.parent.name for p in new) == ["faithful.submitit", "front.submitit"]

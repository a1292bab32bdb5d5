"""`vision/sweep.py launcher=submitit`: real submitit local jobs on the smoke preset; idempotent re-runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sweep(out: Path) -> dict[str, dict[str, int]]:
    """Runs the smoke sweep through submitit's local executor; returns sweep.json's counts."""
    cmd = [sys.executable, "vision/sweep.py", "experiment=smoke", "launcher=submitit", f"output_dir={out}",
           "average.enabled=false", "submitit.array_parallelism=2", "submitit.timeout_min=10"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "sweep.json").read_text())["counts"]


def _job_folders(out: Path) -> set[Path]:
    """Every submitit job submitted so far (one folder of logs per submission, beside each run)."""
    return {p for p in (out / "runs").glob("*.submitit/*") if p.name.endswith("_0_log.out")}


@pytest.mark.slow
def test_sweep_through_submitit_local_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    counts = _sweep(out)
    assert counts == {"pretrain": {"done": 0, "ran": 1}, "lp": {"done": 0, "ran": 1}, "ft": {"done": 0, "ran": 2}}
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    for run in runs:  # every run finished, its submitit logs beside it
        assert (Path(run) / "summary.json").is_file()
        logs = list(Path(f"{run}.submitit").glob("*_0_log.out"))
        assert len(logs) == 1, logs
    submitted = _job_folders(out)
    assert len(submitted) == 4

    # a re-run submits nothing
    counts = _sweep(out)
    assert all(c["ran"] == 0 for c in counts.values()) and counts["ft"]["done"] == 2
    assert _job_folders(out) == submitted

    # a run whose completed output is gone (a killed job publishes nothing) is the only one submitted again
    shutil.rmtree(runs[1])
    counts = _sweep(out)
    assert counts == {"pretrain": {"done": 1, "ran": 0}, "lp": {"done": 1, "ran": 0}, "ft": {"done": 1, "ran": 1}}
    assert len(_job_folders(out) - submitted) == 1 and (Path(runs[1]) / "summary.json").is_file()

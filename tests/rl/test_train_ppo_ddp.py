"""DDP on CPU: `torchrun --nproc_per_node 2 rl/train_ppo.py` forms one gloo process group (no GPU needed).

The distributed code paths (rollouts per process, gathered metrics, rank-0-only writes, per-process optimizer and
RNG state in checkpoints) are the ones multi-GPU DDP runs; only the backend differs (gloo instead of NCCL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_cpu_processes_train_one_expert(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
           str(ROOT / "rl" / "train_ppo.py"), "experiment=smoke", f"model.sft.dir={tmp_path / 'sft'}",
           f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = OmegaConf.load(out / "config.yaml")
    batch, steps = int(cfg.ppo.batch_size), int(cfg.ppo.steps)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one row per step, written by rank 0 only; each step gathers ppo.batch_size rollouts from each of 2 processes
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["samples"] for r in rows] == [2 * batch * s for s in range(1, steps + 1)]
    assert done.stdout.count("final adapter:") == 1
    last = out / "checkpoints" / f"step-{steps:06d}"
    assert {"optimizer_rank0.pt", "optimizer_rank1.pt", "rng_rank0.pt", "rng_rank1.pt"} <= {
        p.name for p in last.iterdir()
    }
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

"""rl/train_brax.py end to end at smoke size: an init, an expert from it (frozen normaliser), resume. Needs the
`brax` extra and minutes of JIT on CPU, so it is `slow`: `pip install -e ".[brax]" && pytest -m slow
tests/rl/test_train_brax.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("brax")

from hydra import compose, initialize_config_dir  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from rl.locomotion import models  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "train_brax"
pytestmark = pytest.mark.slow


def _cfg(tmp: Path, name: str, *extra: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", f"output_dir={tmp / name}",
                                            f"jax.compilation_cache={tmp / 'jax'}", *extra])  # fmt: skip


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_init_expert_and_resume(tmp_path):
    from rl.locomotion.trainer import train

    init = train(_cfg(tmp_path, "init", "reward=morl"))
    assert (init / models.WEIGHTS_FILE).is_file() and models.read_meta(init)["reward"]["env_kwargs"] == {
        "forward_reward_weight": 1.0, "ctrl_cost_weight": 0.5}  # fmt: skip
    rows = _rows(tmp_path / "init")
    assert [r["step"] for r in rows] == [0, 4000]
    assert all({"velocity", "control", "reward"} <= set(r) and r["control"] <= 0 for r in rows)
    # α = 0.5: the logged reward is velocity + 0.5 · control (brax's own reward, the objectives unweighted)
    assert rows[-1]["reward"] == pytest.approx(rows[-1]["velocity"] + 0.5 * rows[-1]["control"], rel=1e-4, abs=1e-3)

    expert = train(_cfg(tmp_path, "cautious", "reward=cautious", f"init={init}"))
    a, b = load_file(str(init / models.WEIGHTS_FILE)), load_file(str(expert / models.WEIGHTS_FILE))
    for key in a:  # frozen: the normaliser (count included) is the init's, bit for bit; the policy moved
        if key.startswith("normalizer/"):
            assert (a[key] == b[key]).all(), key
    assert any(not (a[k] == b[k]).all() for k in a if k.startswith("policy/"))

    # resume: a longer budget continues from the newest checkpoint (step 4000) and appends rows after it
    train(_cfg(tmp_path, "cautious", "reward=cautious", f"init={init}", "resume=true", "ppo.num_timesteps=8000"))
    steps = [r["step"] for r in _rows(tmp_path / "cautious")]
    assert steps[:2] == [0, 4000] and steps[-1] >= 8000 and steps == sorted(steps)

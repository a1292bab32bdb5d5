"""Rollouts of a Brax policy: one episode written as brax's HTML page and as a MuJoCo-rendered GIF.
Needs the `brax` extra (skipped without it); random swimmer policies, a few steps, no training. The GIF needs a
headless GL context (`MUJOCO_GL=egl`): the quickstart's path renders in a child process, which sets it before
MuJoCo is imported whatever this process imported first."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("brax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image, ImageSequence  # noqa: E402

from rl.locomotion import models, rollouts  # noqa: E402

META = {"env": "swimmer", "backend": "generalized", "policy_hidden_layer_sizes": [16, 16],
        "value_hidden_layer_sizes": [8], "activation": "swish", "episode_length": 12}  # fmt: skip
STEPS = 8


def _policy(path, seed: int):
    """A random swimmer policy (as in test_brax_front): its actions are far from zero, so the body moves."""
    from brax.training.acme import running_statistics, specs

    obs_size, act_size = 8, 2  # swimmer (generalized)
    nets = models.make_networks(META, obs_size, act_size)
    key_p, key_v = jax.random.split(jax.random.PRNGKey(seed))
    norm = running_statistics.init_state(specs.Array((obs_size,), jnp.dtype("float32")))
    norm = running_statistics.update(norm, jax.random.normal(jax.random.PRNGKey(99), (32, obs_size)))
    models.save_policy(path, (norm, nets.policy_network.init(key_p), nets.value_network.init(key_v)), META)
    return path


def _frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


def test_quickstart_writes_pages_and_gifs(tmp_path):
    """The quickstart's `after_front` (a child `python -m rl.locomotion.rollouts`): risky and cautious are one
    policy (so their GIFs must be byte-identical: deterministic policy, fixed seed), the soup another."""
    risky = _policy(tmp_path / "experts" / "risky" / "policy", 1)
    shutil.copytree(risky, tmp_path / "experts" / "cautious" / "policy")
    _policy(tmp_path / "soup", 2)
    cfg = SimpleNamespace(experts=["risky", "cautious"], rollout_steps=STEPS, seed=0)
    written = rollouts.quickstart_rollouts(cfg, tmp_path)
    out = tmp_path / "rollouts"
    assert written == [out / f"{name}.{ext}" for name in ("risky", "cautious", "soup") for ext in ("html", "gif")]
    assert "<html" in (out / "soup.html").read_text().lower()
    frames = _frames(out / "risky.gif")
    # states 0..STEPS, every GIF_EVERY-th: 0, 2, 4, 6, 8
    assert len(frames) == len(range(0, STEPS + 1, rollouts.GIF_EVERY)) == 5
    width, height = rollouts.GIF_SIZE
    assert all(frame.shape == (height, width, 3) for frame in frames)
    assert all(frame.std() > 10 for frame in frames)  # not blank: floor, sky and body all drawn
    assert not np.array_equal(frames[0], frames[-1])  # the body moves
    with Image.open(out / "risky.gif") as gif:  # swimmer's dt = 0.04 s, every 2nd state: 80 ms a frame
        assert gif.info["duration"] == 80
    assert (out / "risky.gif").read_bytes() == (out / "cautious.gif").read_bytes()
    assert (out / "risky.gif").read_bytes() != (out / "soup.gif").read_bytes()


def test_no_gl_context_skips_the_gif_with_one_line(tmp_path, monkeypatch, capsys):
    import mujoco

    def no_gl(*args, **kwargs):  # what mujoco.Renderer raises when EGL finds no device
        raise ImportError("Cannot initialize a EGL device display.")

    monkeypatch.setattr(mujoco, "Renderer", no_gl)
    monkeypatch.setattr(rollouts, "_GL_ERROR", None)  # restored after the test
    env, _, _ = rollouts._env_fns("swimmer", "generalized")  # no rollout: the renderer is made before any frame
    assert rollouts.write_gif(env, [None], tmp_path / "soup.gif") is None
    assert rollouts.write_gif(env, [None], tmp_path / "risky.gif") is None  # no second try (it may abort)
    assert not (tmp_path / "soup.gif").exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("MUJOCO_GL" in line and "skipped" in line for line in lines)
    assert "soup.gif" in lines[0] and "risky.gif" in lines[1]


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    _policy(tmp_path / "p", 1)
    assert rollouts.main([str(tmp_path), str(tmp_path / "x.html")]) == 2  # not a policy directory
    assert rollouts.main(["only_one_arg"]) == 2
    assert rollouts.main([str(tmp_path / "p"), str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)

"""Rollouts a user can watch: one deterministic episode of a Brax policy as an HTML page and a GIF.

    python -m rl.locomotion.rollouts runs/quickstart_locomotion/experts/risky/policy out/risky.html
    python -m rl.locomotion.rollouts --steps 100 --seed 0 POLICY_A a.html POLICY_B b.html

Each `POLICY_DIR OUTPUT.html` pair writes `OUTPUT.html` and `OUTPUT.gif` beside it, from one episode (the
deterministic policy from `reset(PRNGKey(seed))`). The page is brax's viewer (`brax.io.html`): it loads its three.js
scripts from a CDN (unpkg), so it needs a network connection to display, although writing it needs none. The GIF is
rendered offline by MuJoCo (`env.render`, the env's `track` camera when it has one) and needs a headless GL context:
`MUJOCO_GL=egl` is set when the user has not set it (MuJoCo reads it once, on import). Without a GL context the GIF
is skipped with one printed line and the HTML is still written. The GIF is written with Pillow (a brax dependency;
it is what imageio's GIF writer calls): `GIF_SIZE` pixels, every `GIF_EVERY`-th state at the env's real speed, one
`GIF_COLORS`-colour palette.

The locomotion quickstart writes `rollouts/<name>.{html,gif}` for the two experts and the λ = 0.5 soup, through this
command in a child process: its trainer stages have already imported MuJoCo in the quickstart's process, so only a
fresh process can still pick the headless GL backend.
"""

from __future__ import annotations

import os

# MuJoCo picks its GL backend from MUJOCO_GL when it is first imported (`mujoco.rendering.classic.gl_context`); the
# default (glfw) needs a display. Set before anything below can import brax, hence mujoco.
os.environ.setdefault("MUJOCO_GL", "egl")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from rl.locomotion import models  # noqa: E402
from soups.utils import SoupsError  # noqa: E402

GIF_SIZE = (160, 120)  # width, height: the swimmer is ~50 px long in its track camera, the halfcheetah ~60 px
GIF_EVERY = 2  # every 2nd state: 12.5 frames/s at swimmer's dt = 0.04 s, 10 frames/s at halfcheetah's dt = 0.05 s
# One 64-colour palette for all frames (no dithering): the tracking camera moves the checkered floor under every
# pixel, so per-frame 256-colour palettes made a 300-step swimmer GIF 604 KB at 160x120; this makes it ~215 KB
# (a 300-step halfcheetah GIF: ~440 KB).
GIF_COLORS = 64
CAMERA = "track"  # the trackcom camera of brax's swimmer, ant, humanoid, ... (the free camera otherwise)
# The first GL failure of this process: MuJoCo may abort the process (not raise) on a second try, so none is made.
_GL_ERROR: str | None = None


@functools.cache
def _env_fns(env_name: str, backend: str) -> tuple[Any, Any, Any]:
    """The env (velocity reward only: the rollout shows behaviour, its reward is not reported) with its jitted
    reset and step, built once per (env, backend) so several policies share one compilation."""
    import jax

    from rl.locomotion.task import make_env

    env = make_env(env_name, backend, {"forward_reward_weight": 1.0, "ctrl_cost_weight": 0.0})
    return env, jax.jit(env.reset), jax.jit(env.step)


@functools.cache
def _policy_fn(meta_json: str, observation_size: int, action_size: int) -> Any:
    """`policy(params, obs, key)`, jitted once per network (`meta`): the experts and the soup share it."""
    import jax

    nets = models.make_networks(json.loads(meta_json), observation_size, action_size)
    return jax.jit(lambda params, obs, key: models.make_policy(nets, params)(obs, key))


def rollout(policy_dir: str | Path, *, steps: int = 300, seed: int = 0) -> tuple[Any, list[Any]]:
    """Rolls the policy at `policy_dir` out deterministically for `steps` steps from `reset(PRNGKey(seed))`.

    Returns:
        The env and the `steps + 1` pipeline states (the reset state first).
    """
    import jax

    params, meta = models.load_policy(policy_dir)
    env, reset, step = _env_fns(str(meta["env"]), str(meta["backend"]))
    policy = _policy_fn(json.dumps(meta, sort_keys=True), env.observation_size, env.action_size)
    key = jax.random.PRNGKey(seed)
    state = reset(key)
    states: list[Any] = [state.pipeline_state]
    for _ in range(steps):
        action, _ = policy(params, state.obs, key)
        state = step(state, action)
        states.append(state.pipeline_state)
    return env, states


def write_html(env: Any, states: list[Any], output: str | Path) -> Path:
    """Writes brax's viewer page of `states` to `output`."""
    from brax.io import html

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(html.render(env.sys, states))
    return output


def write_gif(env: Any, states: list[Any], output: str | Path, *, size: tuple[int, int] = GIF_SIZE,
              every: int = GIF_EVERY, camera: str | None = CAMERA) -> Path | None:  # fmt: skip
    """Renders every `every`-th state with MuJoCo (`env.render`) and writes them to `output` as a looping GIF at the
    env's real speed.

    Args:
        env: The env the states come from.
        states: Pipeline states (`rollout`'s).
        output: The GIF's path.
        size: (width, height) in pixels.
        every: Keep every `every`-th state.
        camera: A camera of the env's model; the free camera when the model has none of that name.

    Returns:
        `output`, or None when no GL context could be made (one line printed, naming MUJOCO_GL).
    """
    global _GL_ERROR
    import mujoco
    from PIL import Image

    if _GL_ERROR is not None:
        return _skipped(output, _GL_ERROR)
    if camera is not None and mujoco.mj_name2id(env.sys.mj_model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
        camera = None
    width, height = size
    try:
        with warnings.catch_warnings():  # glfw without a display warns before it fails; the line below says it
            warnings.simplefilter("ignore")
            frames = env.render(states[::every], height=height, width=width, camera=camera)
    except Exception as err:  # noqa: BLE001 - any GL failure (ImportError, mujoco.FatalError, ...) skips the GIF
        _GL_ERROR = str(err).splitlines()[0] if str(err) else type(err).__name__
        return _skipped(output, _GL_ERROR)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in frames]
    palette = images[len(images) // 2].quantize(colors=GIF_COLORS)
    images = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    # GIF delays are in centiseconds: round to 10 ms so the stored delay is the one asked for.
    duration = max(10, round(1000 * float(env.dt) * every / 10) * 10)
    images[0].save(output, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=True)
    return output


def _skipped(output: str | Path, reason: str) -> None:
    print(f"rollout GIF skipped ({output}): no MuJoCo GL context with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
          f"(headless rendering needs MUJOCO_GL=egl with an EGL driver or osmesa with OSMesa, set before MuJoCo is "
          f"imported): {reason}")  # fmt: skip


def write_rollout(policy_dir: str | Path, html_path: str | Path, gif_path: str | Path | None = None, *,
                  steps: int = 300, seed: int = 0) -> list[Path]:  # fmt: skip
    """One episode of the policy at `policy_dir`, written as the HTML page `html_path` and the GIF `gif_path`
    (default: `html_path` with suffix `.gif`). Returns the files written (the GIF is absent without GL)."""
    env, states = rollout(policy_dir, steps=steps, seed=seed)
    written = [write_html(env, states, html_path)]
    gif = write_gif(env, states, gif_path if gif_path is not None else Path(html_path).with_suffix(".gif"))
    return written + ([gif] if gif is not None else [])


def quickstart_rollouts(cfg: Any, out: Path) -> list[Path]:
    """The quickstart's `after_front`: `rollouts/<expert>.{html,gif}` for every expert and `rollouts/soup.{html,gif}`,
    written by `python -m rl.locomotion.rollouts` in a child process (see the module docstring: MuJoCo's GL backend).

    Raises:
        SoupsError: the child process failed.
    """
    out = Path(out)
    pairs = [(out / "experts" / str(name) / "policy", out / "rollouts" / f"{name}.html") for name in cfg.experts]
    if (out / "soup" / models.META_FILE).is_file():
        pairs.append((out / "soup", out / "rollouts" / "soup.html"))
    command = [sys.executable, "-m", "rl.locomotion.rollouts", "--steps", str(int(cfg.rollout_steps)),
               "--seed", str(int(cfg.seed))] + [str(p) for pair in pairs for p in pair]  # fmt: skip
    # the child imports `rl` and `soups` from this checkout whatever its working directory
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, env=env, check=False)
    if proc.returncode != 0:
        raise SoupsError(f"rollouts failed (exit {proc.returncode}): {' '.join(command)}")
    return [p for _, html_path in pairs for p in (html_path, html_path.with_suffix(".gif")) if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    """`python -m rl.locomotion.rollouts [--steps N] [--seed S] POLICY_DIR OUTPUT.html [POLICY_DIR OUTPUT.html ...]`"""
    parser = argparse.ArgumentParser(prog="python -m rl.locomotion.rollouts", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="env steps per episode (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="the reset key's seed (default 0)")
    parser.add_argument("pairs", nargs="+", metavar="POLICY_DIR OUTPUT.html", help="a policy and its page")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2 or args.steps < 1:
        print("error: expected POLICY_DIR OUTPUT.html pairs and --steps >= 1", file=sys.stderr)
        return 2
    pairs = list(zip(args.pairs[::2], args.pairs[1::2], strict=True))
    for policy_dir, html_path in pairs:
        if not (Path(policy_dir) / models.META_FILE).is_file():
            print(f"error: {policy_dir} is not a brax policy directory (no {models.META_FILE})", file=sys.stderr)
            return 2
        if Path(html_path).suffix != ".html":
            print(f"error: {html_path}: the page must end in .html (the GIF is written beside it)", file=sys.stderr)
            return 2
    for policy_dir, html_path in pairs:
        for path in write_rollout(policy_dir, html_path, steps=args.steps, seed=args.seed):
            kind = "brax's viewer; its scripts load from a CDN" if path.suffix == ".html" else "MuJoCo render"
            print(f"rollout: {path} ({kind})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

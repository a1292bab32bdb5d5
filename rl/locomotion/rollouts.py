"""Rollouts a user can watch: one deterministic episode of a Brax policy as an HTML page (`brax.io.html`).

    python -m rl.locomotion.rollouts runs/quickstart_locomotion/experts/risky/policy out/risky.html

The page is brax's viewer: it loads its three.js scripts from a CDN (unpkg), so it needs a network connection to
display, although writing it needs none. The locomotion quickstart writes `rollouts/<name>.html` for the two experts
and the λ = 0.5 soup. (GIFs through MuJoCo's renderer are not written: they need an EGL/OSMesa GL context.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rl.locomotion import models


def write_html(policy_dir: str | Path, output: str | Path, *, steps: int = 300, seed: int = 0) -> Path:
    """Rolls the policy at `policy_dir` out for `steps` steps from `reset(PRNGKey(seed))` and writes the HTML page."""
    import jax
    from brax.io import html

    from rl.locomotion.task import make_env

    params, meta = models.load_policy(policy_dir)
    env = make_env(meta["env"], meta["backend"], {"forward_reward_weight": 1.0, "ctrl_cost_weight": 0.0})
    nets = models.make_networks(meta, env.observation_size, env.action_size)
    policy = jax.jit(models.make_policy(nets, params))
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    key = jax.random.PRNGKey(seed)
    state = reset(key)
    states: list[Any] = [state.pipeline_state]
    for _ in range(steps):
        action, _ = policy(state.obs, key)
        state = step(state, action)
        states.append(state.pipeline_state)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(html.render(env.sys, states))
    return output


def quickstart_rollouts(cfg: Any, out: Path) -> list[Path]:
    """The quickstart's `after_front`: `rollouts/<expert>.html` for every expert and `rollouts/soup.html`."""
    out = Path(out)
    pages = []
    for name in cfg.experts:
        pages.append(write_html(out / "experts" / str(name) / "policy", out / "rollouts" / f"{name}.html",
                                steps=int(cfg.rollout_steps), seed=int(cfg.seed)))  # fmt: skip
    if (out / "soup" / models.META_FILE).is_file():
        pages.append(write_html(out / "soup", out / "rollouts" / "soup.html", steps=int(cfg.rollout_steps),
                                seed=int(cfg.seed)))  # fmt: skip
    for page in pages:
        print(f"rollout: {page} (brax's viewer; its scripts load from a CDN)")
    return pages


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m rl.locomotion.rollouts POLICY_DIR OUTPUT.html")
    print(write_html(sys.argv[1], sys.argv[2]))

"""The locomotion task: which Brax envs and backends, the reward mapping, and the two objectives every run logs.

Rewarded soups (thesis §6.3.4) trains on R_α = velocity − α Σ_t ‖a_t‖². Every env listed in `ENVS` computes,
per step, `forward_reward_weight · x_velocity − ctrl_cost_weight · ‖a‖²` (+ a healthy bonus for the envs that
fall over, at its default), so R_α is the env's own reward with

    forward_reward_weight = 1,   ctrl_cost_weight = α                                   (see `rewards.py`)

and a MORL run on Σ_i μ_i R_{α_i} is the env with forward_reward_weight = Σ μ_i, ctrl_cost_weight = Σ μ_i α_i.

`ObjectiveMetrics` adds both objectives, unweighted, to the env's metrics: `velocity` (x velocity) and
`ctrl_cost` (‖a‖²), so brax's evaluator logs `eval/episode_velocity` and `eval/episode_ctrl_cost` (episode sums)
at every evaluation whatever α is. The front's objectives (higher is better) are `velocity` = Σ_t v_t and
`control` = −Σ_t ‖a_t‖² per episode; R_α's return is velocity + α · control.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from soups.utils import SoupsError

# Envs whose reward is forward_reward_weight · v − ctrl_cost_weight · ‖a‖² (+ healthy terms), with the backends
# each supports in brax 0.14.
ENVS: dict[str, tuple[str, ...]] = {
    "ant": ("generalized", "positional", "spring", "mjx"),
    "halfcheetah": ("generalized", "positional", "spring", "mjx"),
    "hopper": ("generalized", "positional", "spring", "mjx"),
    "humanoid": ("generalized", "positional", "spring", "mjx"),
    "swimmer": ("generalized",),
    "walker2d": ("generalized", "positional", "spring", "mjx"),
}
BACKENDS = ("generalized", "positional", "spring", "mjx")
OBJECTIVES = ("velocity", "control")


def check_env(name: str, backend: str) -> None:
    """Raises `SoupsError` listing the valid names for an unknown env, or an unknown/unsupported backend."""
    if name not in ENVS:
        raise SoupsError(f"unknown brax env {name!r}; valid: {', '.join(ENVS)} (envs whose reward trades velocity "
                         "against control cost)")  # fmt: skip
    if backend not in BACKENDS:
        raise SoupsError(f"unknown brax backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend not in ENVS[name]:
        raise SoupsError(f"brax env {name!r} has no {backend!r} backend; valid for it: {', '.join(ENVS[name])}")


def make_env(name: str, backend: str, reward_kwargs: Mapping[str, float], **kwargs: Any) -> Any:
    """The Brax env `name` on `backend` with the reward kwargs of `rewards.env_reward_kwargs`, wrapped in
    `ObjectiveMetrics`.

    Raises:
        SoupsError: an unknown env or backend (listing the valid ones).
    """
    check_env(name, backend)
    from brax import envs

    env = envs.get_environment(name, backend=backend, **dict(reward_kwargs), **kwargs)
    return objective_metrics(env)


def objective_metrics(env: Any) -> Any:
    """`env` wrapped so that its state's metrics carry `velocity` (x velocity) and `ctrl_cost` (‖a‖²) per step."""
    import jax.numpy as jnp
    from brax.envs.base import Wrapper

    class ObjectiveMetrics(Wrapper):
        """Logs both objectives unweighted, whatever the reward's weights (α = 0 zeroes the env's `reward_ctrl`)."""

        def reset(self, rng: Any) -> Any:
            state = self.env.reset(rng)
            zero = jnp.zeros(())
            return state.replace(metrics={**state.metrics, "velocity": zero, "ctrl_cost": zero})

        def step(self, state: Any, action: Any) -> Any:
            nstate = self.env.step(state, action)
            metrics = {**nstate.metrics, "velocity": nstate.metrics["x_velocity"],
                       "ctrl_cost": jnp.sum(jnp.square(action), axis=-1)}  # fmt: skip
            return nstate.replace(metrics=metrics)

    return ObjectiveMetrics(env)

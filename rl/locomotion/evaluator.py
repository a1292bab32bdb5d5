"""The `brax` evaluator of `python -m soups.pareto`: deterministic rollouts of a (mixed) Brax policy.

    python -m soups.pareto evaluator=brax experts=[runs/risky/policy,runs/cautious/policy] init=runs/init/policy

The resident model is `rl.locomotion.models.BraxParams` (the loader of checkpoint kind `brax`); for every λ the
evaluator reads its mixed tensors back into the jax pytree and runs ONE jitted rollout function, whose params are
an argument, over K fixed seeds (so jax compiles once per front, not once per λ). Each seed is one episode of
deterministic actions (the tanh of the policy's mean) from `env.reset(PRNGKey(seed + k))`. Objectives (higher is
better), mean ± stderr over the K episodes:

- `velocity`: Σ_t x velocity (the velocity return);
- `control`: −Σ_t ‖a_t‖² (minus the control cost), so R_α's return is velocity + α · control.

Steps after an episode ends (envs that fall) count for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rl.locomotion import models
from rl.locomotion.task import OBJECTIVES
from soups.pareto_registry import EVALUATORS, ObjectiveStat, mean_stderr
from soups.utils import SoupsError


class BraxEvaluator:
    """Rollouts of one policy architecture on one env, jitted once.

    Attributes:
        objectives: ("velocity", "control").
        meta: The policy JSON of the first expert (env, backend, networks).
    """

    objectives: Sequence[str] = OBJECTIVES

    def __init__(self, meta: Mapping[str, Any], *, episodes: int, seed: int, episode_length: int | None) -> None:
        import jax
        import jax.numpy as jnp

        from rl.locomotion.task import make_env

        if episodes < 1:
            raise SoupsError(f"evaluator.episodes={episodes} must be ≥ 1")
        self.meta = dict(meta)
        self.episode_length = int(episode_length or meta.get("episode_length", 1000))
        # the reward's weights do not matter: both objectives are read unweighted from the metrics
        self.env = make_env(meta["env"], meta["backend"], {"forward_reward_weight": 1.0, "ctrl_cost_weight": 0.0})
        self.networks = models.make_networks(meta, self.env.observation_size, self.env.action_size)
        self.keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seed, seed + episodes))
        env, networks, length = self.env, self.networks, self.episode_length

        def episode(params: Any, key: Any) -> tuple[Any, Any]:
            policy = models.make_policy(networks, params)
            state = env.reset(key)

            def step(carry: Any, _: Any) -> tuple[Any, None]:
                state, alive, vel, ctrl = carry
                action, _ = policy(state.obs, key)
                nstate = env.step(state, action)
                vel = vel + alive * nstate.metrics["velocity"]
                ctrl = ctrl + alive * nstate.metrics["ctrl_cost"]
                return (nstate, alive * (1.0 - nstate.done), vel, ctrl), None

            zero = jnp.zeros(())
            (_, _, vel, ctrl), _ = jax.lax.scan(step, (state, jnp.ones(()), zero, zero), None, length=length)
            return vel, ctrl

        self._rollout = jax.jit(jax.vmap(episode, in_axes=(None, 0)))  # params: an argument, traced once

    def rollout(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per-episode (velocity return, control cost Σ‖a‖²) of `params` over the K seeds."""
        vel, ctrl = self._rollout(params, self.keys)
        return np.asarray(vel, dtype=np.float64), np.asarray(ctrl, dtype=np.float64)

    def evaluate_params(self, params: Any) -> dict[str, ObjectiveStat]:
        """Both objectives of a jax params pytree (normaliser, policy, value)."""
        vel, ctrl = self.rollout(params)
        return {"velocity": mean_stderr(torch.from_numpy(vel)), "control": mean_stderr(torch.from_numpy(-ctrl))}

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """Both objectives of the resident `BraxParams` (the soup at the current λ); its weights are not touched."""
        if not hasattr(model, "flat_numpy"):
            raise SoupsError(f"the brax evaluator scores Brax policies, got a {type(model).__name__}; are the "
                             "experts policy directories written by rl/train_brax.py?")  # fmt: skip
        flat = model.flat_numpy()
        models.check_finite_arrays(flat, "the mixed brax policy")
        return self.evaluate_params(models.unflatten_params(flat))


@EVALUATORS.register("brax")
def build_brax(cfg: Mapping[str, Any], *, experts: Sequence[str], device: torch.device) -> BraxEvaluator:
    """`evaluator=brax`: rollouts over `cfg.episodes` seeds from `cfg.seed`, `cfg.episode_length` steps (null: the
    experts' training length). The experts are checked compatible (env, backend, networks) first."""
    del device  # jax picks its own device
    metas = models.check_compatible(list(experts))
    return BraxEvaluator(metas[0], episodes=int(cfg.get("episodes", 8)), seed=int(cfg.get("seed", 0)),
                         episode_length=cfg.get("episode_length"))  # fmt: skip

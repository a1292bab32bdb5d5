"""The Brax trainer behind `rl/train_brax.py` (a library module, so the quickstart can build an init in-process
without importing an entry point). See `rl/train_brax.py` for the command line and the outputs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rl import runtime
from rl.locomotion import models
from rl.locomotion.rewards import env_reward_kwargs
from rl.locomotion.task import check_env
from soups.utils import SoupsError

NORMALIZERS = ("frozen", "interpolate")
POLICY_DIR = "policy"
PARAMS_STEM = "params"


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, float]:
    """Checks every setting before jax is imported; returns the env's reward kwargs.

    Raises:
        SoupsError: naming the key, its value and what is valid.
    """
    num, choice = runtime.check_number, runtime.check_choice
    num("seed", cfg["seed"], low=0, integer=True)
    choice("normalizer", cfg["normalizer"], NORMALIZERS)
    check_env(str(cfg["env"]["name"]), str(cfg["env"]["backend"]))
    num("env.episode_length", cfg["env"]["episode_length"], low=1, integer=True)
    num("env.action_repeat", cfg["env"]["action_repeat"], low=1, integer=True)
    p = cfg["ppo"]
    for key in ("num_timesteps", "num_evals", "num_envs", "unroll_length", "batch_size", "num_minibatches",
                "num_updates_per_batch", "num_eval_envs"):  # fmt: skip
        num(f"ppo.{key}", p[key], low=1, integer=True)
    num("ppo.learning_rate", p["learning_rate"], low=0, low_open=True)
    for key in ("entropy_cost", "reward_scaling", "clipping_epsilon"):
        num(f"ppo.{key}", p[key], low=0)
    for key in ("discounting", "gae_lambda"):
        num(f"ppo.{key}", p[key], low=0, high=1)
    if (p["batch_size"] * p["num_minibatches"]) % p["num_envs"]:
        raise SoupsError(
            f"ppo.batch_size × ppo.num_minibatches = {p['batch_size'] * p['num_minibatches']} must be "
            f"a multiple of ppo.num_envs={p['num_envs']} (brax's PPO splits rollouts that way)"
        )
    n = cfg["network"]
    for key in ("policy_hidden_layer_sizes", "value_hidden_layer_sizes"):
        if not n[key] or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in n[key]):
            raise SoupsError(f"network.{key}={list(n[key]) if n[key] else n[key]} must be a list of positive ints")
    models.activation_fn(str(n["activation"]))
    r = cfg["reward"]
    weights = list(r["weights"]) if r.get("weights") is not None else None
    kwargs = env_reward_kwargs(list(r["alphas"]), weights)
    if cfg.get("init") is not None:
        meta = models.read_meta(cfg["init"])
        ours = {"env": cfg["env"]["name"], "backend": cfg["env"]["backend"],
                "policy_hidden_layer_sizes": list(n["policy_hidden_layer_sizes"]),
                "value_hidden_layer_sizes": list(n["value_hidden_layer_sizes"]),
                "activation": n["activation"]}  # fmt: skip
        for key, mine in ours.items():
            if meta[key] != mine:
                raise SoupsError(f"init {cfg['init']} has {key}={meta[key]!r} but this run has {mine!r}; an expert "
                                 "continues its init's env and network")  # fmt: skip
    return kwargs


def _meta(cfg: DictConfig, reward_kwargs: Mapping[str, float], normalizer: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "env": str(cfg.env.name), "backend": str(cfg.env.backend),
        "policy_hidden_layer_sizes": [int(s) for s in cfg.network.policy_hidden_layer_sizes],
        "value_hidden_layer_sizes": [int(s) for s in cfg.network.value_hidden_layer_sizes],
        "activation": str(cfg.network.activation), "episode_length": int(cfg.env.episode_length),
        "action_repeat": int(cfg.env.action_repeat),
        "reward": {"name": str(cfg.reward.name), "alphas": [float(a) for a in cfg.reward.alphas],
                   "weights": None if cfg.reward.weights is None else [float(w) for w in cfg.reward.weights],
                   "env_kwargs": dict(reward_kwargs)},
        "normalizer": dict(normalizer), "init": None if cfg.init is None else str(cfg.init),
    }  # fmt: skip


def enable_compilation_cache(directory: str | None) -> None:
    """Turns on jax's persistent compilation cache in `directory` (every compile, however short, is kept)."""
    import jax

    if not directory:
        return
    Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def frozen_normalizer_env(env: Any, normalizer: Any) -> Any:
    """`env` whose observations come normalised by the fixed `normalizer` (brax's own normalise op)."""
    from brax.envs.base import Wrapper
    from brax.training.acme import running_statistics

    class FrozenNormalizer(Wrapper):
        def reset(self, rng: Any) -> Any:
            state = self.env.reset(rng)
            return state.replace(obs=running_statistics.normalize(state.obs, normalizer))

        def step(self, state: Any, action: Any) -> Any:
            nstate = self.env.step(state, action)
            return nstate.replace(obs=running_statistics.normalize(nstate.obs, normalizer))

    return FrozenNormalizer(env)


def metrics_row(step: int, metrics: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """One metrics.jsonl row from brax's eval metrics: both objectives (episode sums), the reward, their stds."""
    get = lambda key: float(metrics[key]) if key in metrics else float("nan")  # noqa: E731
    row = {"step": int(step), "seconds": round(seconds, 3),
           "velocity": get("eval/episode_velocity"), "control": -get("eval/episode_ctrl_cost"),
           "reward": get("eval/episode_reward"), "velocity_std": get("eval/episode_velocity_std"),
           "control_std": get("eval/episode_ctrl_cost_std"), "reward_std": get("eval/episode_reward_std")}  # fmt: skip
    if "eval/sps" in metrics:
        row["eval_sps"] = float(metrics["eval/sps"])
    if "training/sps" in metrics:
        row["train_sps"] = float(metrics["training/sps"])
    return row


def train(cfg: DictConfig) -> Path:
    """Trains one expert (or the init, or a MORL run) as `cfg` says; returns the policy directory."""
    reward_kwargs = validate_config(cfg)
    out = Path(cfg.output_dir).absolute()
    ckpt_root, metrics_path, policy_dir = out / "checkpoints", out / "metrics.jsonl", out / POLICY_DIR
    runtime.prepare_run_dir(out, [ckpt_root, metrics_path, policy_dir, out / "tensorboard"], resume=bool(cfg.resume),
                            overwrite=bool(cfg.overwrite), is_main=True)  # fmt: skip
    enable_compilation_cache(cfg.jax.compilation_cache)
    import jax
    from brax.training.agents.ppo import train as ppo

    from rl.locomotion.task import make_env

    env = make_env(str(cfg.env.name), str(cfg.env.backend), reward_kwargs)
    restore, start_step = None, 0
    if cfg.resume:
        found, broken = runtime.newest_valid_checkpoint(ckpt_root)
        for path, why in broken:
            print(f"warning: checkpoint {path} is unusable ({why}); set aside", file=sys.stderr)
            runtime.set_aside(path)
        if found is not None:
            state = runtime.load_state(found)
            flat = runtime.load_arrays(found / f"{PARAMS_STEM}.safetensors")
            restore = models.unflatten_params(flat)
            start_step = int(state["step"])
            runtime.truncate_metrics(metrics_path, start_step)
            print(f"resuming from {found} (step {start_step})")
    init_params = models.load_policy(cfg.init)[0] if cfg.init is not None else None
    if restore is None:
        restore = init_params
    frozen = cfg.init is not None and cfg.normalizer == "frozen"
    if frozen:
        env = frozen_normalizer_env(env, restore[0])
    normalizer_info = {"mode": "welford", "std_eps": 0.0,
                       "frozen": frozen, "policy": "init" if frozen else "learned"}  # fmt: skip
    meta = _meta(cfg, reward_kwargs, normalizer_info)
    remaining = int(cfg.ppo.num_timesteps) - start_step
    if remaining <= 0:
        raise SoupsError(f"nothing to resume: the checkpoint is at step {start_step} ≥ ppo.num_timesteps")

    writer = None
    if "tensorboard" in list(cfg.log_with):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def progress_fn(step: int, metrics: Mapping[str, Any]) -> None:
        if step == 0 and start_step > 0:
            return  # the resumed run's first evaluation repeats the checkpoint's
        row = metrics_row(start_step + step, metrics, time.perf_counter() - t0)
        runtime.append_metrics(metrics_path, row)
        if writer is not None:
            for key, value in row.items():
                if key != "step":
                    writer.add_scalar(key, value, row["step"])
            writer.flush()
        print(f"step {row['step']}: velocity {row['velocity']:.3f} control {row['control']:.3f} "
              f"reward {row['reward']:.3f} ({row['seconds']:.0f}s)", flush=True)  # fmt: skip

    def keep(params: Any) -> Any:
        # frozen: brax's normaliser is off (identity) and the init's statistics are the policy's
        return (restore[0], params[1], params[2]) if frozen else params

    def policy_params_fn(step: int, _make_policy: Any, params: Any) -> None:
        if step == 0:
            return
        flat = models.flatten_params(keep(params))
        runtime.save_checkpoint(ckpt_root, start_step + step, state={"env_steps": start_step + step, "meta": meta},
                                arrays={PARAMS_STEM: flat}, config=cfg)  # fmt: skip
        if cfg.keep_checkpoints:
            runtime.prune_checkpoints(ckpt_root, int(cfg.keep_checkpoints))

    p = cfg.ppo
    _, params, _ = ppo.train(
        environment=env, num_timesteps=remaining, num_evals=int(p.num_evals),
        episode_length=int(cfg.env.episode_length),
        action_repeat=int(cfg.env.action_repeat), num_envs=int(p.num_envs), unroll_length=int(p.unroll_length),
        batch_size=int(p.batch_size), num_minibatches=int(p.num_minibatches),
        num_updates_per_batch=int(p.num_updates_per_batch), learning_rate=float(p.learning_rate),
        entropy_cost=float(p.entropy_cost), discounting=float(p.discounting), reward_scaling=float(p.reward_scaling),
        clipping_epsilon=float(p.clipping_epsilon), gae_lambda=float(p.gae_lambda),
        normalize_observations=not frozen, network_factory=models.network_factory(meta),
        seed=int(cfg.seed) + start_step, num_eval_envs=int(p.num_eval_envs),
        deterministic_eval=bool(p.deterministic_eval), progress_fn=progress_fn, policy_params_fn=policy_params_fn,
        restore_params=restore, restore_value_fn=True,
    )  # fmt: skip
    jax.block_until_ready(params)
    if writer is not None:
        writer.close()
    final = keep(params)
    if init_params is not None and not frozen:
        # normalizer=interpolate: the statistics are the expert's own, but the count (which only sets how fast
        # later updates move them, never an action) is pinned to the init's, so that experts' integer counts agree
        # and a Soup can mix them; the true count stays in the checkpoints, which resume reads
        meta["normalizer"]["count_pinned_to_init"] = True
        final = (final[0].replace(count=init_params[0].count), final[1], final[2])
    models.save_policy(policy_dir, final, meta)
    runtime.save_resolved_config(cfg, policy_dir)
    print(f"policy -> {policy_dir} ({time.perf_counter() - t0:.0f}s)")
    return policy_dir

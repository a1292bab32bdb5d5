"""Brax PPO locomotion experts on R_α = velocity − α Σ‖a‖² (rewarded soups, thesis §6.3.4).

    python rl/train_brax.py reward=risky                         # α = 0 (halfcheetah/positional, 2 CPU cores)
    python rl/train_brax.py reward=cautious init=outputs/train_brax/init/policy
    python rl/train_brax.py reward=morl reward.weights=[0.5,0.5] init=...
    python rl/train_brax.py reward=risky experiment=smoke         # seconds of PPO + the JIT
    python rl/train_brax.py experiment=humanoid reward=risky      # the paper preset (accelerator)

PPO is brax's own (`brax.training.agents.ppo.train`); this script maps the reward onto the env's kwargs
(`rl.locomotion.rewards`), starts from a shared init with `restore_params`, and writes, under `output_dir`:

    policy/               model.safetensors (policy/…, value/…, normalizer/…) + brax_policy.json: what soups mix
    checkpoints/step-N/   params.safetensors + trainer_state.json, via rl.runtime (validated on resume)
    metrics.jsonl         one row per evaluation: velocity, control (= −Σ‖a‖²), reward, their stds, seconds
    tensorboard/          the same rows (log_with=[tensorboard])

Normaliser: without `init`, brax learns the observation statistics. With `init` and `normalizer=frozen` (the
default) the init's statistics normalise observations in an env wrapper and brax's own normaliser is off, so the
expert's statistics are bit-for-bit the init's and every expert mixes in one coordinate system.
`normalizer=interpolate` lets brax keep updating them from the init's.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/train_brax")  # a bad command line fails here, before jax is imported

import sys

from omegaconf import DictConfig, OmegaConf

from rl.locomotion.trainer import NORMALIZERS, metrics_row, train, validate_config

CONFIG_PATH = "../configs/train_brax"

__all__ = ["NORMALIZERS", "metrics_row", "train", "validate_config"]


@entry(CONFIG_PATH)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python rl/train_brax.py reward=risky`."""
    OmegaConf.resolve(cfg)
    train(cfg)


if __name__ == "__main__":
    sys.exit(main())

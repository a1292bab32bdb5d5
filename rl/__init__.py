"""Reinforcement learning of the experts: one subpackage per expert family, entry points at `rl/train_<algo>.py`.

- `rl/text/`: text RLHF (the embedded summarisation task, its rewards and reward models, the policy, the
  `text` evaluator of `python -m soups.pareto`, the `summarisation` quickstart recipe).
- `rl/ppo.py`: the PPO maths (pure functions); `rl/runtime.py`: what every trainer shares (checkpoints, resume,
  metrics, guards).
- `rl/train_ppo.py`: the PPO trainer (`accelerate launch rl/train_ppo.py reward=faithful`).
"""

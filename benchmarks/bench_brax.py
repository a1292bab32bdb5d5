"""λ points per minute of a Brax front: one jitted rollout for every λ (params as an argument, as the `brax`
evaluator does) against re-jitting the rollout for each λ (params closed over), on two policies.

    python benchmarks/bench_brax.py --experts RISKY/policy CAUTIOUS/policy --points 5 --episodes 4

Training env steps/s are logged by rl/train_brax.py itself (`train_sps` in metrics.jsonl). jax's persistent
compilation cache is left off here: the comparison is about compiling once vs once per λ within a process.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", nargs=2, required=True, help="two Brax policy directories")
    parser.add_argument("--points", type=int, default=5, help="λ points of the front")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--episode-length", type=int, default=None)
    args = parser.parse_args()

    from rl.locomotion import models
    from rl.locomotion.evaluator import BraxEvaluator

    metas = models.check_compatible(list(args.experts))
    a, b = (models.load_policy(p)[0] for p in args.experts)
    lambdas = np.linspace(0.0, 1.0, args.points)

    def mix(lam: float):
        return jax.tree_util.tree_map(
            lambda x, y: (1 - lam) * x + lam * y if hasattr(x, "dtype") and x.dtype.kind == "f" else x, a, b
        )

    def one_jit() -> float:
        ev = BraxEvaluator(metas[0], episodes=args.episodes, seed=0, episode_length=args.episode_length)
        t0 = time.perf_counter()
        for lam in lambdas:
            ev.evaluate_params(mix(float(lam)))
        return time.perf_counter() - t0

    def rejit() -> float:
        t0 = time.perf_counter()
        for lam in lambdas:  # a fresh evaluator per λ: a fresh function, traced and compiled again
            ev = BraxEvaluator(metas[0], episodes=args.episodes, seed=0, episode_length=args.episode_length)
            ev.evaluate_params(mix(float(lam)))
        return time.perf_counter() - t0

    t_one, t_re = one_jit(), rejit()
    print(f"{args.points} λ points, {args.episodes} episodes each ({metas[0]['env']}/{metas[0]['backend']})")
    print(f"one jit:      {t_one:8.1f} s  {60 * args.points / t_one:8.2f} λ points/min")
    print(f"jit per λ:    {t_re:8.1f} s  {60 * args.points / t_re:8.2f} λ points/min")
    print(f"speed-up:     {t_re / t_one:.2f}×")


if __name__ == "__main__":
    main()

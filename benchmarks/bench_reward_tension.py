"""Are `complete` and `faithful` in tension for the embedded SFT init? A best-of-n check, before any PPO.

Run (CPU; builds the SFT init first if it is not cached, ~2 minutes):

    OMP_NUM_THREADS=1 python3 benchmarks/bench_reward_tension.py [--sft DIR] [--n 8] [--prompts 128]

For each held-out prompt of the embedded task, samples `n` responses from the SFT init (temperature 1, as PPO
rollouts are), then keeps the best response by `complete` and, separately, the best by `faithful`. If the
rewards are in tension, the pick by one reward must score lower on the other than the pick by the other
reward: the paired difference is reported with its standard error. Also reports the greedy init and the
mean of all samples, and the statement mix of the picks (how many made-up statements each selection keeps).
Writes the figures as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from rl.text.evaluator import evaluate_policy, generate_responses
from rl.text.rewards import build_reward_set, count_statements
from rl.text.sft import ensure_sft_init
from rl.text.task import build_task
from soups.utils import seed_everything, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default=None, help="SFT init dir (default: the cached embedded init)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="reward_tension.json")
    args = parser.parse_args()

    # ---- set-up ----
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed_everything(args.seed)
    path = ensure_sft_init(args.sft, seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    samples = build_task({"name": "facts_summary", "n_train": 0, "n_eval": args.prompts}).eval
    rs = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "faithful"})

    # ---- greedy init, then n samples per prompt ----
    greedy = evaluate_policy(model, tok, samples, rs, max_new_tokens=args.max_new_tokens)["objectives"]
    start = time.perf_counter()
    repeated = [s for s in samples for _ in range(args.n)]
    texts = generate_responses(model, tok, [s["prompt"] for s in repeated], max_new_tokens=args.max_new_tokens,
                               do_sample=True, batch_size=64, show_progress=True)
    seconds = time.perf_counter() - start
    rewards = rs(repeated, texts).view(len(samples), args.n, 2)

    # ---- best-of-n by each reward ----
    rows = torch.arange(len(samples))
    picks = {name: rewards[:, :, k].argmax(1) for k, name in enumerate(rs.names)}
    report: dict = {"sft": str(path), "n": args.n, "prompts": len(samples), "sampling_seconds": seconds,
                    "greedy": greedy, "samples_mean": dict(zip(rs.names, rewards.mean((0, 1)).tolist(), strict=True))}
    for name, idx in picks.items():
        best = rewards[rows, idx]
        stmts = [count_statements(samples[i]["facts"], texts[i * args.n + int(j)]) for i, j in enumerate(idx)]
        report[f"best_by_{name}"] = {
            **{o: float(best[:, k].mean()) for k, o in enumerate(rs.names)},
            "statements": sum(c.n_statements for c in stmts) / len(stmts),
            "made_up_or_wrong": sum(c.contradicted + c.unsupported for c in stmts) / len(stmts),
        }
    diff = rewards[rows, picks["complete"]] - rewards[rows, picks["faithful"]]  # paired, [N, 2]
    stderr = diff.std(0) / math.sqrt(len(samples))
    report["pick_complete_minus_pick_faithful"] = {
        o: {"mean": float(diff[:, k].mean()), "stderr": float(stderr[k])} for k, o in enumerate(rs.names)
    }

    # ---- save ----
    write_json(args.out, report)
    for key in ("greedy", "samples_mean", "best_by_complete", "best_by_faithful", "pick_complete_minus_pick_faithful"):
        print(f"{key}: {report[key]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

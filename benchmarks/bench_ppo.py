"""Throughput of our LoRA PPO trainer vs trl 1.12's experimental `PPOTrainer`, same tiny model and sizes.

    python3 -m venv --system-site-packages /tmp/trl112 && /tmp/trl112/bin/pip install trl==1.12.0
    OMP_NUM_THREADS=1 python3 benchmarks/bench_ppo.py            # both; prints the table and the ratios

Both trainers get the same tiny Llama (built from a config, seeded, saved with `save_pretrained`), the same
facts_summary prompts, batch 32, mini-batches of 8, 2 PPO epochs, exactly `--length` sampled tokens per
response (ours: `min_new_tokens = max_new_tokens`; trl: no stop token), the same LoRA (r=8, q/k/v/o), on
CPU in one process. trl runs in its own venv (`--trl-python`), since trl 1.12 is not a dependency.

Measured the same way for both:
- generated tokens/s: new tokens / seconds inside `PeftModelForCausalLM.generate` (patched timer), all
  rollouts but the first (warm-up);
- PPO samples/s: rollouts / wall seconds of whole PPO steps (rollout, rewards, reference and value passes,
  all epochs of updates), between step boundaries after the first step.

Design differences that are part of what is measured: trl's PPO trains a separate value model (a second
network, forward+backward) and scores with a reward model (here a tiny sequence classifier of the same
size); ours shares the trunk for the value head (as the rewarded-soups reference code did) and scores with
the embedded task's rule rewards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------------------
# Shared set-up: model, prompts, generate timer
# ----------------------------------------------------------------------------------------------------------


def build_model(path: Path, hidden: int, layers: int, seed: int) -> None:
    """The tiny policy (and the tokenizer of the embedded task), saved like a Hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rl.text.models import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def prompts(n: int) -> list[dict[str, Any]]:
    from rl.text.task import FactsSummaryConfig, generate_facts_summary

    return generate_facts_summary(FactsSummaryConfig(seed=0), n, "train")


class GenerateTimer:
    """Wraps `PeftModelForCausalLM.generate` (what both trainers call) to time calls and count new tokens."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def install(self) -> None:
        from peft import PeftModelForCausalLM

        original = PeftModelForCausalLM.generate
        timer = self

        def timed(model: Any, *args: Any, **kwargs: Any) -> Any:
            prompt = kwargs.get("input_ids", args[0] if args else None)
            start = time.perf_counter()
            out = original(model, *args, **kwargs)
            seconds = time.perf_counter() - start
            seqs = out.sequences if hasattr(out, "sequences") else out
            timer.calls.append((seconds, int(seqs.shape[0] * (seqs.shape[1] - prompt.shape[1]))))
            return out

        PeftModelForCausalLM.generate = timed

    def tokens_per_s(self) -> float:
        steady = self.calls[1:] or self.calls
        return sum(t for _, t in steady) / sum(s for s, _ in steady)


def summarise(impl: str, args: argparse.Namespace, timer: GenerateTimer, boundaries: list[float]) -> dict[str, Any]:
    if len(boundaries) < 2:
        raise SystemExit(f"{impl}: need at least 2 step boundaries, got {len(boundaries)} (raise --steps)")
    steps = len(boundaries) - 1
    return {
        "impl": impl, "batch": args.batch, "mini_batch": args.mini_batch, "epochs": args.epochs,
        "response_length": args.length, "measured_steps": steps,
        "gen_tokens_per_s": timer.tokens_per_s(),
        "ppo_samples_per_s": steps * args.batch / (boundaries[-1] - boundaries[0]),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from rl import train_ppo
    from rl.text.rewards import build_reward_set
    from rl.text.task import PromptTask

    timer = GenerateTimer()
    timer.install()
    starts: list[float] = []
    plan = train_ppo.step_plan

    def timed_plan(*a: Any, **k: Any) -> Any:  # called once at the start of every step
        starts.append(time.perf_counter())
        return plan(*a, **k)

    train_ppo.step_plan = timed_plan
    with initialize_config_dir(config_dir=str(ROOT / "configs/train_ppo"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model.name_or_path={args.model}", f"output_dir={args.workdir}/ours", "lora.r=8",
            f"generation.response_length=[{args.length},{args.length}]", f"generation.min_new_tokens={args.length}",
            f"ppo.steps={args.steps}", f"ppo.batch_size={args.batch}", f"ppo.mini_batch_size={args.mini_batch}",
            f"ppo.epochs={args.epochs}", "ppo.lr=1e-3", "checkpoint.every=0", "logging.log_with=[]",
            "logging.progress_bar=false",
        ])  # fmt: skip
    task = PromptTask("facts_summary", prompts(512), [])
    reward_set = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "faithful"})
    train_ppo.train(cfg, reward_set=reward_set, task=task)
    return summarise("ours", args, timer, starts[1:])  # from the start of step 2 to the start of the last step


# ----------------------------------------------------------------------------------------------------------
# trl 1.12 experimental PPOTrainer
# ----------------------------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import os as _os

    _os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    timer = GenerateTimer()
    timer.install()
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(args.model)
    value = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1)
    ids = [tok(s["prompt"], add_special_tokens=False)["input_ids"] for s in prompts(512)]
    dataset = Dataset.from_dict({"input_ids": ids})
    config = PPOConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.mini_batch,
        gradient_accumulation_steps=args.batch // args.mini_batch, num_mini_batches=args.batch // args.mini_batch,
        local_rollout_forward_batch_size=args.batch, num_ppo_epochs=args.epochs, response_length=args.length,
        total_episodes=args.steps * args.batch, learning_rate=1e-3, stop_token=None, num_sample_generations=0,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0,
        kl_coef=0.05, dataloader_num_workers=0,
    )  # fmt: skip
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=peft_config, callbacks=[StepTimes()])
    trainer.train()
    out = summarise("trl", args, timer, ends)
    out["trl_version"] = trl.__version__
    return out


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=["both", "ours", "trl"], default="both")
    parser.add_argument("--trl-python", default="/tmp/trl112/bin/python", help="python of a venv with trl==1.12.0")
    parser.add_argument("--model", default=None, help="tiny model dir (built when omitted)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="outputs/bench_ppo/result.json")
    args = parser.parse_args()

    if args.impl != "both":
        result = run_ours(args) if args.impl == "ours" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ppo-"))
    model = Path(args.model) if args.model else workdir / "model"
    if not args.model:
        build_model(model, args.hidden, args.layers, seed=0)
    results: dict[str, Any] = {}
    common = ["--model", str(model), "--workdir", str(workdir), "--batch", str(args.batch), "--mini-batch",
              str(args.mini_batch), "--epochs", str(args.epochs), "--length", str(args.length), "--steps",
              str(args.steps)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    for impl, python in (("ours", sys.executable), ("trl", args.trl_python)):
        if not Path(python).exists():
            results[impl] = {"error": f"{python} not found: create the trl venv (see the module docstring)"}
            continue
        done = subprocess.run([python, __file__, "--impl", impl, *common], env=env, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            results[impl] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"}
        else:
            results[impl] = json.loads(lines[-1][len("RESULT ") :])
    if "error" not in results.get("ours", {}) and "error" not in results.get("trl", {}):
        results["ratio_ours_over_trl"] = {
            k: results["ours"][k] / results["trl"][k] for k in ("gen_tokens_per_s", "ppo_samples_per_s")
        }
    from soups.utils import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

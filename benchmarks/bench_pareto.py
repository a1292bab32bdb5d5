"""λ points evaluated per minute: `soups.pareto`'s resident soup against reloading from disk for every λ.

    python benchmarks/bench_pareto.py                                   # the quickstart's experts (runs/quickstart)
    python benchmarks/bench_pareto.py --root /tmp/qs/runs/quickstart --points 11 --n-prompts 64 --output bench.json
    python benchmarks/bench_pareto.py --synthetic 1024 8 --n-prompts 8    # a ~100M-parameter random base
    python benchmarks/bench_pareto.py --batch-lambdas 8 --only-batched    # grid.batch_lambdas=8 against 1 only

Three ways to evaluate the same λ grid of two LoRA experts, with the same text evaluator, prompts and greedy
decoding (so the rewards must agree, which is checked):

- `resident` (soups.pareto): one `Soup` built once; per λ, `set_weights` rescales the concatenated LoRA blocks
  in place, then the evaluator runs.
- `merge_reload` (the reference code / mergekit way): per λ, write the merged soup to disk (`soups.mix.mix`),
  load it with `AutoModelForCausalLM.from_pretrained`, evaluate.
- `peft_reload` (peft's own way): per λ, load the base and both adapters from disk, combine them with
  `add_weighted_adapter(combination_type="cat")` (exact Σ λ_i B_i A_i), evaluate.

Then `grid.batch_lambdas=K` against 1 (`--batch-lambdas`, default 8) on the same soup, prompts and evaluator:
`resident` one λ per decoding pass against `batched`, K λ per pass (`Soup.batched`: each row its own λ, rows
K × batch_size), in chunks of K λ timed interleaved; the rewards must be identical (greedy decoding).

The three are timed interleaved (one λ of each in turn, the order rotating) so that load from other processes
on a shared machine hits them alike, and both wall and CPU (process) time are reported; the speed-up uses CPU
time. Generation dominates with many prompts; the switching cost shows with few, so the per-λ switch time
(outside evaluation) is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

TASK = {"name": "facts_summary", "seed": 0, "n_train": 0, "n_eval": 128}
REWARD = {"objectives": ["complete", "faithful"], "optimize": "complete"}


def build_synthetic(root: Path, hidden: int, layers: int, seed: int = 0) -> None:
    """A larger random LLaMA on the embedded task's tokenizer and two random LoRA experts (q/k/v/o, r = 8), laid
    out like a quickstart dir (sft/, experts/{complete,faithful}/adapter), to time reloads of a bigger base."""
    from peft import LoraConfig, get_peft_model

    from rl.text.models import build_tiny_causal_lm, build_tokenizer
    from rl.text.sft import SFTInitConfig

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = SFTInitConfig(hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64))
    build_tiny_causal_lm(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).save_pretrained(
        root / "sft"
    )
    tokenizer.save_pretrained(root / "sft")
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(("complete", "faithful")):
        torch.manual_seed(seed + 1 + i)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)  # fmt: skip
        get_peft_model(AutoModelForCausalLM.from_pretrained(root / "sft"), lora).save_pretrained(
            root / "experts" / name / "adapter"
        )


def build_evaluator(root: Path, experts: list[str], n_prompts: int, max_new_tokens: int, synthetic: bool):  # noqa: ANN201
    from omegaconf import OmegaConf

    from rl.text.evaluator import build_text_evaluator

    cfg = OmegaConf.create({
        "name": "text", "task": TASK if synthetic else None, "reward": REWARD if synthetic else None,
        "n_prompts": n_prompts, "batch_size": 64, "max_new_tokens": max_new_tokens, "do_sample": False,
        "tokenizer": str(root / "sft"), "base_model": str(root / "sft"),
    })  # fmt: skip
    return build_text_evaluator(cfg, experts=experts, device=torch.device("cpu"))


class Resident:
    """soups.pareto's way: one Soup built once, `set_weights` per λ."""

    def __init__(self, root: Path, experts: list[str]) -> None:
        from soups.front import open_soup

        self.soup = open_soup(experts, base_model=str(root / "sft"), device=torch.device("cpu"), dtype=torch.float32)

    def model(self, lam: list[float]) -> torch.nn.Module:
        return self.soup.set_weights(lam)


class MergeReload:
    """The reference code / mergekit way: per λ, write the merged soup to disk and load it back."""

    def __init__(self, root: Path, experts: list[str]) -> None:
        self.experts = experts
        self.scratch = Path(tempfile.mkdtemp(prefix="bench_pareto_"))

    def model(self, lam: list[float]) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from soups.mix import mix

        out = self.scratch / "soup"
        mix(self.experts, lam, out, lora_output="merged", progress=False, overwrite=True)
        return AutoModelForCausalLM.from_pretrained(out).eval()


class PeftReload:
    """peft's way: per λ, load the base and the adapters, `add_weighted_adapter(combination_type="cat")`."""

    def __init__(self, root: Path, experts: list[str]) -> None:
        self.root, self.experts = root, experts

    def model(self, lam: list[float]) -> torch.nn.Module:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(self.root / "sft"), self.experts[0],
                                          adapter_name="e0")  # fmt: skip
        model.load_adapter(self.experts[1], adapter_name="e1")
        model.add_weighted_adapter(["e0", "e1"], [float(x) for x in lam], "mix", combination_type="cat")
        model.set_adapter("mix")
        return model.eval()


METHODS = {"resident": Resident, "merge_reload": MergeReload, "peft_reload": PeftReload}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_interleaved(root: Path, experts: list[str], lambdas: list[list[float]], evaluator) -> dict:  # noqa: ANN001
    """Times every method on every λ, interleaved (the order rotates per λ), so that load from other processes on
    a shared machine hits all methods alike. Wall and CPU (process) seconds are both recorded; setup (building
    the resident soup once) is charged to its method."""
    times = {name: {"wall": 0.0, "cpu": 0.0, "eval_wall": 0.0, "eval_cpu": 0.0} for name in METHODS}
    means: dict[str, list[list[float]]] = {name: [] for name in METHODS}
    methods = {}
    for name, cls in METHODS.items():
        w0, c0 = _clock()
        methods[name] = cls(root, experts)
        w1, c1 = _clock()
        times[name]["wall"] += w1 - w0
        times[name]["cpu"] += c1 - c0
    names = list(METHODS)
    for p, lam in enumerate(lambdas):
        for name in names[p % len(names) :] + names[: p % len(names)]:
            w0, c0 = _clock()
            model = methods[name].model(lam)
            w1, c1 = _clock()
            torch.manual_seed(0)
            stats = evaluator.evaluate(model)
            w2, c2 = _clock()
            times[name]["wall"] += w2 - w0
            times[name]["cpu"] += c2 - c0
            times[name]["eval_wall"] += w2 - w1
            times[name]["eval_cpu"] += c2 - c1
            means[name].append([stats[k].mean for k in evaluator.objectives])
            del model
    shutil.rmtree(methods["merge_reload"].scratch, ignore_errors=True)
    out = {}
    for name, t in times.items():
        diff = max(abs(a - b) for ra, rb in zip(means[name], means["resident"]) for a, b in zip(ra, rb))
        out[name] = {
            "wall_s": round(t["wall"], 3), "cpu_s": round(t["cpu"], 3),
            "points_per_min_wall": round(60 * len(lambdas) / t["wall"], 1),
            "points_per_min_cpu": round(60 * len(lambdas) / t["cpu"], 1),
            "switch_cpu_s_per_point": round((t["cpu"] - t["eval_cpu"]) / len(lambdas), 4),
            "eval_cpu_s_per_point": round(t["eval_cpu"] / len(lambdas), 4),
            "max_reward_diff_vs_resident": diff,
        }  # fmt: skip
    return out


def run_batched(root: Path, experts: list[str], lambdas: list[list[float]], evaluator, k: int) -> dict:  # noqa: ANN001
    """`grid.batch_lambdas=k` against 1 on one resident soup: per chunk of k λ, the sequential and the batched
    evaluation in turn (the order alternating), CPU and wall time, and the largest reward difference."""
    soup = Resident(root, experts).soup
    times = {name: {"wall": 0.0, "cpu": 0.0} for name in ("one", "batched")}
    means: dict[str, list[list[float]]] = {"one": [], "batched": []}
    chunks = [lambdas[i : i + k] for i in range(0, len(lambdas), k)]
    for c, chunk in enumerate(chunks):
        for name in (("one", "batched") if c % 2 == 0 else ("batched", "one")):
            w0, c0 = _clock()
            torch.manual_seed(0)
            if name == "one":
                stats = [evaluator.evaluate(soup.set_weights(lam)) for lam in chunk]
            else:
                with soup.batched(chunk) as batch:
                    stats = evaluator.evaluate_batched(batch)
            w1, c1 = _clock()
            times[name]["wall"] += w1 - w0
            times[name]["cpu"] += c1 - c0
            means[name] += [[st[o].mean for o in evaluator.objectives] for st in stats]
    diff = max(abs(a - b) for ra, rb in zip(means["one"], means["batched"]) for a, b in zip(ra, rb))
    out: dict = {name: {"wall_s": round(t["wall"], 3), "cpu_s": round(t["cpu"], 3),
                        "points_per_min_wall": round(60 * len(lambdas) / t["wall"], 1),
                        "points_per_min_cpu": round(60 * len(lambdas) / t["cpu"], 1)}
                 for name, t in times.items()}  # fmt: skip
    out["batch_lambdas"] = k
    out["max_reward_diff"] = diff
    out["speedup_cpu"] = round(times["one"]["cpu"] / times["batched"]["cpu"], 2)
    out["speedup_wall"] = round(times["one"]["wall"] / times["batched"]["wall"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/quickstart", help="a quickstart output dir (sft/, experts/)")
    parser.add_argument("--experts", nargs=2, default=["complete", "faithful"])
    parser.add_argument("--points", type=int, default=11, help="λ grid points")
    parser.add_argument("--n-prompts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--batch-lambdas", type=int, default=8, help="K of the grid.batch_lambdas=K comparison")
    parser.add_argument("--only-batched", action="store_true", help="skip the reload comparison")
    parser.add_argument("--synthetic", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"), default=None,
                        help="time a random LLaMA of this size with random LoRA experts instead of --root")
    args = parser.parse_args()

    from soups.simplex import interpolation_grid

    root = Path(args.root).absolute()
    scratch = None
    if args.synthetic:
        scratch = Path(tempfile.mkdtemp(prefix="bench_pareto_model_"))
        root = scratch
        build_synthetic(root, *args.synthetic)
    experts = [str(root / "experts" / name / "adapter") for name in args.experts]
    lambdas = interpolation_grid(args.points).tolist()
    torch.set_num_threads(1)
    size = sum(f.stat().st_size for f in (root / "sft").glob("*.safetensors"))
    record = {"root": str(root), "synthetic": args.synthetic, "base_bytes": size, "points": args.points,
              "max_new_tokens": args.max_new_tokens,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "runs": []}  # fmt: skip
    for n_prompts in args.n_prompts:
        evaluator = build_evaluator(root, experts, n_prompts, args.max_new_tokens, bool(args.synthetic))
        row: dict = {"n_prompts": n_prompts}
        run_batched(root, experts, lambdas[:2], evaluator, 2)  # warm-up: imports and first calls are free
        batched = run_batched(root, experts, lambdas, evaluator, args.batch_lambdas)
        row["batch_lambdas"] = batched
        print(f"n_prompts={n_prompts:>4} grid.batch_lambdas={args.batch_lambdas}: "
              f"{batched['batched']['points_per_min_cpu']:.1f} λ/min of CPU "
              f"({batched['batched']['points_per_min_wall']:.1f} wall) vs 1: "
              f"{batched['one']['points_per_min_cpu']:.1f} "
              f"({batched['one']['points_per_min_wall']:.1f} wall) = {batched['speedup_cpu']}x CPU, "
              f"{batched['speedup_wall']}x wall; |Δreward| ≤ {batched['max_reward_diff']:.2g}", flush=True)
        if args.only_batched:
            record["runs"].append(row)
            continue
        run_interleaved(root, experts, lambdas[:1], evaluator)  # warm-up: imports and first calls are free
        row.update(run_interleaved(root, experts, lambdas, evaluator))
        for name in METHODS:
            r = row[name]
            print(f"n_prompts={n_prompts:>4} {name:<13} {r['points_per_min_cpu']:>7.1f} λ/min of CPU "
                  f"({r['points_per_min_wall']:.1f} wall); switch {r['switch_cpu_s_per_point']:.3f} s/λ, "
                  f"eval {r['eval_cpu_s_per_point']:.3f} s/λ; |Δreward| ≤ {r['max_reward_diff_vs_resident']:.2g}",
                  flush=True)  # fmt: skip
        for name in ("merge_reload", "peft_reload"):
            ratio = row["resident"]["points_per_min_cpu"] / row[name]["points_per_min_cpu"]
            row[f"speedup_vs_{name}"] = round(ratio, 2)
        print(f"n_prompts={n_prompts:>4} resident is {row['speedup_vs_merge_reload']}x merge_reload, "
              f"{row['speedup_vs_peft_reload']}x peft_reload (CPU time)", flush=True)
        record["runs"].append(row)
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

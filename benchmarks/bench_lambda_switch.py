"""λ-switch benchmark: a resident `Soup` versus rebuilding the model from disk for every λ.

Run (CPU, about a minute):

    OMP_NUM_THREADS=1 python3 benchmarks/bench_lambda_switch.py

Two cases on a tiny GPT-2 built from a config (nothing is downloaded):

- full: 3 full checkpoints. Soup.set_weights(λ) versus (a) mix-then-load: `interpolate` + `write_soup` to disk
  then `from_pretrained`, and (b) load-only: `from_pretrained` of a soup already on disk (a lower bound for
  any rebuild);
- lora: 3 LoRA adapters (different ranks) on one base. Soup.set_weights(λ) (rescales the B blocks of one
  concatenated adapter) versus (a) `mix_lora(merged)` + `from_pretrained`, and (b) `mix_lora(adapter)` +
  base `from_pretrained` + `PeftModel.from_pretrained`, as the rewarded-soups code reloaded adapters per λ.

Each timed λ is checked: the soup's logits must match the rebuilt model's (atol 1e-4), so a fast wrong switch
cannot pass. Prints a markdown table (median ms per λ, and the speed-up of the Soup) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.utils import logging as hf_logging

from soups.checkpoint import open_checkpoint
from soups.interpolate import interpolate
from soups.lora import mix_lora
from soups.simplex import dirichlet_samples
from soups.soup import Soup
from soups.utils import seed_everything, write_json
from soups.writer import write_soup


def _config(args: argparse.Namespace) -> GPT2Config:
    return GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 32), vocab_size=args.vocab,
                      n_positions=128, bos_token_id=0, eos_token_id=0)


def _load(path: Path, device: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float().cpu()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------------------------------------
# set-up: experts on disk
# ----------------------------------------------------------------------------------------------------------


def make_experts(tmp: Path, args: argparse.Namespace) -> tuple[list[Path], Path, list[Path]]:
    """Three full experts, and a base with three LoRA adapters of ranks 4, 8, 16."""
    experts = []
    for i in range(3):
        torch.manual_seed(args.seed + i)
        model = AutoModelForCausalLM.from_config(_config(args))
        experts.append(tmp / f"expert{i}")
        model.save_pretrained(experts[-1])
    base = experts[0]
    adapters = []
    for i, rank in enumerate((4, 8, 16)):
        torch.manual_seed(args.seed + 10 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, fan_in_fan_out=True,
                            target_modules=["c_attn", "c_proj", "c_fc"])
        peft_model = get_peft_model(_load(base, "cpu"), config)
        adapters.append(tmp / f"adapter{i}")
        peft_model.save_pretrained(adapters[-1])
    return experts, base, adapters


# ----------------------------------------------------------------------------------------------------------
# the two cases
# ----------------------------------------------------------------------------------------------------------


def bench_full(experts: list[Path], lambdas: list[list[float]], ids: torch.Tensor, tmp: Path,
               device: str) -> dict[str, Any]:
    """Per-λ seconds for the resident soup, mix-then-load and load-only."""
    build, soup = _timed(device, lambda: Soup.from_checkpoints(experts, device=device, progress=False))
    ckpts = [open_checkpoint(p) for p in experts]
    switch, rebuild, load_only = [], [], []
    for i, lam in enumerate(tqdm(lambdas, desc="full: λ", unit="λ")):
        seconds, _ = _timed(device, lambda lam=lam: soup.set_weights(lam))
        switch.append(seconds)
        out = tmp / f"full-soup-{i}"

        def mix_then_load(lam: list[float] = lam, out: Path = out) -> torch.nn.Module:
            write_soup(out, interpolate(ckpts, lam, device=device), ingredients=ckpts, weights=lam, mode="linear",
                       config_source=ckpts[0].config_dir, progress=False)
            return _load(out, device)

        seconds, rebuilt = _timed(device, mix_then_load)
        rebuild.append(seconds)
        seconds, rebuilt = _timed(device, lambda out=out: _load(out, device))
        load_only.append(seconds)
        torch.testing.assert_close(_logits(soup.model, ids), _logits(rebuilt, ids), atol=1e-4, rtol=0)
        shutil.rmtree(out)
    return {"build": build, "switch": switch, "rebuild": rebuild, "load_only": load_only}


def bench_lora(base: Path, adapters: list[Path], lambdas: list[list[float]], ids: torch.Tensor, tmp: Path,
               device: str) -> dict[str, Any]:
    """Per-λ seconds for the LoRA soup, merged-then-load and adapter-then-load."""
    build, soup = _timed(device, lambda: Soup.from_lora(adapters, _load(base, device)))
    switch, rebuild, reload_adapter = [], [], []
    for i, lam in enumerate(tqdm(lambdas, desc="lora: λ", unit="λ")):
        seconds, _ = _timed(device, lambda lam=lam: soup.set_weights(lam))
        switch.append(seconds)
        merged_dir, adapter_dir = tmp / f"lora-merged-{i}", tmp / f"lora-adapter-{i}"

        def merged_then_load(lam: list[float] = lam, out: Path = merged_dir) -> torch.nn.Module:
            mix_lora(adapters, lam, output=out, output_format="merged", progress=False)
            return _load(out, device)

        def adapter_then_load(lam: list[float] = lam, out: Path = adapter_dir) -> torch.nn.Module:
            mix_lora(adapters, lam, output=out, output_format="adapter", progress=False)
            return PeftModel.from_pretrained(_load(base, device), out).eval()

        seconds, merged = _timed(device, merged_then_load)
        rebuild.append(seconds)
        seconds, reloaded = _timed(device, adapter_then_load)
        reload_adapter.append(seconds)
        expected = _logits(soup.model, ids)
        torch.testing.assert_close(expected, _logits(merged, ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(expected, _logits(reloaded, ids), atol=1e-4, rtol=0)
        shutil.rmtree(merged_dir)
        shutil.rmtree(adapter_dir)
    return {"build": build, "switch": switch, "rebuild": rebuild, "reload_adapter": reload_adapter}


def _ms(values: list[float]) -> float:
    """Median milliseconds: robust to the odd garbage-collection pause or a neighbour's burst on a shared CPU."""
    return 1000.0 * statistics.median(values)


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: median per-λ milliseconds and the soup's speed-up (ratio of medians)."""
    labels = {
        ("full", "switch"): "resident Soup.set_weights",
        ("full", "rebuild"): "interpolate + write_soup + from_pretrained",
        ("full", "load_only"): "from_pretrained of a written soup (lower bound)",
        ("lora", "switch"): "resident LoRA Soup.set_weights (rescale B blocks)",
        ("lora", "rebuild"): "mix_lora(merged) + from_pretrained",
        ("lora", "reload_adapter"): "mix_lora(adapter) + from_pretrained + PeftModel.from_pretrained",
    }
    rows = ["| case | per λ | median ms / λ | Soup speed-up |", "|---|---|---:|---:|"]
    for case, res in results.items():
        base_ms = _ms(res["switch"])
        for method in ("switch", "rebuild", "load_only", "reload_adapter"):
            if method in res:
                ms = _ms(res[method])
                rows.append(f"| {case} | {labels[(case, method)]} | {ms:.3f} | {ms / base_ms:.0f}x |")
        rows.append(f"| {case} | (one-off: building the Soup) | {1000 * res['build']:.1f} | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=int, default=20, help="number of λ values (Dirichlet samples, N=3)")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 layers")
    parser.add_argument("--width", type=int, default=64, help="GPT-2 hidden size")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = parser.parse_args()

    # ---- set-up ---------------------------------------------------------------------------------------------
    seed_everything(args.seed)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lambdas = dirichlet_samples(3, args.lambdas, seed=args.seed).tolist()
    ids = torch.randint(0, args.vocab, (2, 16)).to(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lambda-"))
    try:
        experts, base, adapters = make_experts(tmp, args)
        params = open_checkpoint(experts[0]).numel()

        # ---- loop: both cases -------------------------------------------------------------------------------
        results = {
            "full": bench_full(experts, lambdas, ids, tmp, args.device),
            "lora": bench_lora(base, adapters, lambdas, ids, tmp, args.device),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- save / report --------------------------------------------------------------------------------------
    print(f"\nGPT-2 {args.layers} layers x {args.width} wide ({params / 1e6:.2f}M parameters), {args.lambdas} λ "
          f"values, device {args.device}, torch threads {torch.get_num_threads()}\n")
    print(table(results))
    if args.json is not None:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()

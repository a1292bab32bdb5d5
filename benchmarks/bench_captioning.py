"""Captioning benchmarks: caption metrics per 1,000 captions × 5 references, and SCST throughput.

    python benchmarks/bench_captioning.py                  # both; prints a table (and --json PATH writes it)
    python benchmarks/bench_captioning.py --only metrics

**Metrics.** 1,000 candidate captions of the embedded scenes (another image's reference, so scores vary) against
their image's 5 references, scored in 10 batches of 100 (the way a trainer asks), two ways:
- ours: one `evals.captioning.CaptionScorer` kept across batches (METEOR's java process started once, references'
  BLEU cooking and CIDEr-D tf-idf vectors cached, document frequencies fixed from the training references);
- fresh: pycocoevalcap's scorers built anew for every batch (`Bleu(4)`, `Rouge()`, `Cider()`, `Meteor()`: a
  new JVM per batch), as a naive reward function would.
Both use the pure-Python tokenisation (captions are plain lower-case words). Seconds per metric, per 1,000.

**SCST.** Samples per second (K sampled captions per image, greedy baseline captions, every metric but METEOR as
rewards, one update) of `rl/train_captioning.py` on the tiny captioner, steps after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_metrics(n: int = 1000, batch: int = 100) -> dict[str, Any]:
    """Seconds per metric for `n` captions × 5 refs, in batches of `batch`: ours (kept) vs fresh scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    from evals.captioning import CaptionScorer
    from rl.captioning.task import ScenesConfig, generate_scenes

    scenes = generate_scenes(ScenesConfig(n_train=n + 1, n_val=1, n_test=1), "train")
    refs = [s["refs"] for s in scenes[:n]]
    cands = [scenes[i + 1]["refs"][i % 5] if i % 3 else scenes[i]["refs"][(i + 1) % 5] for i in range(n)]
    out: dict[str, Any] = {"n": n, "batch": batch, "ours": {}, "fresh": {}}
    for metric in ("bleu4", "rouge_l", "cider", "meteor"):
        scorer = CaptionScorer([metric], tokenizer="simple", cider_df_refs=refs if metric == "cider" else None)
        scorer.scores(cands[:1], refs[:1])  # start METEOR's process once (a trainer's set-up)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            scorer.scores(cands[i : i + batch], refs[i : i + batch])
        out["ours"][metric] = time.perf_counter() - t0
        scorer.close()
        make = {"bleu4": lambda: Bleu(4), "rouge_l": Rouge, "cider": Cider, "meteor": Meteor}[metric]
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            gts = {j: refs[j] for j in range(i, min(i + batch, n))}
            res = {j: [cands[j]] for j in gts}
            fresh = make()
            if metric == "bleu4":
                fresh.compute_score(gts, res, verbose=0)
            else:
                fresh.compute_score(gts, res)
            del fresh
        out["fresh"][metric] = time.perf_counter() - t0
    return out


def bench_scst(steps: int = 12, batch: int = 16, samples: int = 5) -> dict[str, Any]:
    """SCST samples/s of `rl/train_captioning.py` (tiny captioner, smoke XE init), median over steps 2..N."""
    from hydra import compose, initialize_config_dir

    from rl import train_captioning

    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(
        config_dir=str(ROOT / "configs" / "train_captioning"), version_base="1.3"
    ):
        cfg = compose("config", overrides=[
            "experiment=smoke", f"output_dir={tmp}/run", f"model.init_dir={tmp}/init", "reward=cider",
            f"scst.steps={steps}", f"scst.batch_size={batch}", f"scst.samples={samples}", "scst.max_new_tokens=24",
            "checkpoint.every=0",
        ])  # fmt: skip
        train_captioning.train(cfg)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in rows[1:]]
    return {"steps": steps, "images_per_step": batch, "samples_per_image": samples,
            "samples_per_s_median": statistics.median(rates),
            "generate_s_median": statistics.median(r["time/generate_s"] for r in rows[1:]),
            "reward_s_median": statistics.median(r["time/reward_s"] for r in rows[1:])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("metrics", "scst"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.only in (None, "metrics"):
        m = results["metrics"] = bench_metrics()
        print(f"caption metrics, {m['n']} captions × 5 refs in batches of {m['batch']} (seconds per 1,000):")
        print(f"  {'metric':<9}{'ours (kept)':>14}{'fresh per batch':>18}{'speed-up':>10}")
        for metric in m["ours"]:
            o, f = m["ours"][metric], m["fresh"][metric]
            print(f"  {metric:<9}{o:>14.2f}{f:>18.2f}{f / o:>9.1f}x")
    if args.only in (None, "scst"):
        s = results["scst"] = bench_scst()
        print(f"SCST: {s['samples_per_s_median']:.0f} samples/s ({s['images_per_step']} images × "
              f"{s['samples_per_image']} samples per step; generate {s['generate_s_median']:.2f} s, rewards "
              f"{s['reward_s_median']:.2f} s per step, medians)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

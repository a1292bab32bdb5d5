"""Live-page benchmark (`python -m soups.serve`): throughput under concurrency, and slider-to-output latency.

Run (CPU; about a minute for the smoke model, plus the quickstart model when runs/quickstart exists):

    python3 benchmarks/bench_serve.py                       # smoke experts, and runs/quickstart if present
    python3 benchmarks/bench_serve.py --run runs/quickstart --json bench_serve.json

The server runs in this process on a free 127.0.0.1 port; requests go over HTTP like any client's.

- Throughput: 40 requests over 8 λ (5 each, shuffled), all at once from 40 threads versus the same 40 one at a
  time, each from cold caches; and the same with 40 distinct (λ, prompt) keys, where nothing can be shared and
  the model lock serialises the generations (the honest cost of one resident model).
- Slider → output: a λ never asked before, through `POST /api/generate` (set_weights + generate + score) and
  through the page's own handler (gradio_client: also the experts' outputs, cached after the first λ, the
  validation means at λ and the front plot); against rebuilding the model for the request (`open_soup` of the
  experts from disk, set λ, generate), what a server without a resident soup pays.
- The λ switch alone (`Soup.set_weights`), for reference; benchmarks/bench_lambda_switch.py measures it fully.

Every concurrent output is checked against the one-at-a-time output of the same key, so a fast wrong answer
cannot pass. Prints markdown tables; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "soups"))

from serve_fixtures import compose, post  # noqa: E402

from soups.utils import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _serve(overrides: list[str], workdir: Path) -> tuple[Any, Any, str]:
    from soups.serve import build_app, build_live, serve_in_thread

    os.chdir(workdir)
    cfg = compose(overrides)
    engine, rows = build_live(cfg)
    server, _, url = serve_in_thread(build_app(engine, rows, n_examples=int(cfg.n_examples)), "127.0.0.1", 0)
    return engine, server, url


def _lambdas(n_experts: int, count: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        raw = [rng.random() + 0.01 for _ in range(n_experts)]
        out.append([round(x / sum(raw), 4) for x in raw])
    return out


def throughput(engine: Any, url: str, prompts: list[str], trials: int) -> dict[str, Any]:
    """Requests/s of 40 requests one at a time versus 40 at once (cold caches), same-λ and distinct keys; the
    median over `trials` (a shared CPU makes single trials noisy)."""
    n = engine.n_experts
    lams = _lambdas(n, 8, seed=1)
    cases = {
        "40 requests, 8 λ × 5": [(lam, prompts[0]) for lam in lams for _ in range(5)],
        "40 requests, 40 distinct (λ, prompt)": [(lam, p) for lam in lams for p in prompts[:5]],
    }
    out: dict[str, Any] = {name: {"sequential_rps": [], "concurrent_rps": []} for name in cases}
    for trial, (name, requests) in ((t, c) for t in range(trials) for c in cases.items()):
        random.Random(trial).shuffle(requests)
        engine.clear_caches()
        t0 = time.perf_counter()
        single = [post(f"{url}/api/generate", {"lambdas": lam, "prompt": p}) for lam, p in requests]
        sequential = time.perf_counter() - t0
        engine.clear_caches()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=40) as pool:
            burst = list(pool.map(lambda r: post(f"{url}/api/generate", {"lambdas": r[0], "prompt": r[1]}), requests))
        concurrent = time.perf_counter() - t0
        for (_, a), (status, b) in zip(single, burst):
            if status != 200 or a["output"] != b["output"]:
                raise SystemExit(f"cross-talk or failure under load: {a} vs {status} {b}")
        out[name]["sequential_rps"].append(len(requests) / sequential)
        out[name]["concurrent_rps"].append(len(requests) / concurrent)
    return {name: {k: statistics.median(v) for k, v in rates.items()} for name, rates in out.items()}


def latency(engine: Any, url: str, prompt: str, repeats: int, overrides: list[str]) -> dict[str, Any]:
    """Median seconds from a new λ to its output: API, page handler, rebuilding the model per request."""
    import torch
    from gradio_client import Client

    from soups.front import open_soup

    n = engine.n_experts
    fresh = iter(_lambdas(n, 5 * repeats + 8, seed=2))
    api, page, rebuild, switch, validation = [], [], [], [], []
    client = Client(url + "/", verbose=False)
    engine.generate([1.0 / n] * n, prompt)  # warm-up: first forward pass, the experts' outputs
    engine.expert_outputs(prompt)
    for _ in range(repeats):
        lam = next(fresh)
        t0 = time.perf_counter()
        status, body = post(f"{url}/api/generate", {"lambdas": lam, "prompt": prompt})
        api.append(time.perf_counter() - t0)
        assert status == 200, body

        lam = next(fresh)
        t0 = time.perf_counter()
        result = client.predict(prompt, 0, False, *lam, api_name="/on_generate")
        page.append(time.perf_counter() - t0)
        assert result[-1] == "ok", result[-1]

        lam = next(fresh)
        t0 = time.perf_counter()
        soup = open_soup(engine.experts, base_model=None, device=torch.device("cpu"), dtype=torch.float32)
        model = soup.set_weights(lam)
        engine.live.generate(model, prompt, seed=0, max_new_tokens=engine.max_new_tokens)
        rebuild.append(time.perf_counter() - t0)
        del soup, model

        t0 = time.perf_counter()
        engine.validation(next(fresh))
        validation.append(time.perf_counter() - t0)

        with engine._model_lock:
            t0 = time.perf_counter()
            engine.soup.set_weights(next(fresh))
            switch.append(time.perf_counter() - t0)
    client.close()
    return {name: statistics.median(values) for name, values in
            (("api_s", api), ("page_s", page), ("rebuild_s", rebuild), ("switch_s", switch),
             ("validation_s", validation))}  # fmt: skip


def bench(label: str, overrides: list[str], repeats: int, trials: int, workdir: Path) -> dict[str, Any]:
    engine, server, url = _serve(overrides, workdir)
    try:
        prompts = engine.live.examples(8)
        result = {"model": label, "experts": engine.expert_names, "max_new_tokens": engine.max_new_tokens}
        result["throughput"] = throughput(engine, url, prompts, trials)
        result["latency"] = latency(engine, url, prompts[0], repeats, overrides)
        n_params = sum(p.numel() for p in engine.soup.model.parameters())
        result["parameters"] = n_params
    finally:
        server.should_exit = True
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "runs" / "quickstart"), help="quickstart dir (skipped if absent)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh λ per latency figure (median)")
    parser.add_argument("--trials", type=int, default=3, help="throughput trials (median)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    cases = [("smoke", ["experiment=smoke", f"smoke.dir={work / 'smoke'}", "front_points=0"])]
    run = Path(args.run).absolute()
    if (run / "experts").is_dir():
        cases.append((f"quickstart ({run.name})", [f"run={run}", "evaluator.n_prompts=16", "front_points=0"]))
    else:
        print(f"no quickstart at {run}: run python -m soups.quickstart to add that row")
    results = [bench(label, overrides, args.repeats, args.trials, work) for label, overrides in cases]

    print(f"\ntorch threads: {__import__('torch').get_num_threads()}, cpus: {os.cpu_count()}")
    print("\n| model | requests | one at a time (req/s) | 40 at once (req/s) |\n|---|---|---|---|")
    for r in results:
        for name, t in r["throughput"].items():
            print(f"| {r['model']} | {name} | {t['sequential_rps']:.1f} | {t['concurrent_rps']:.1f} |")
    print(
        "\n| model | params | new tokens | λ switch | API: new λ → output | page: new λ → all panels | "
        "of which validation at λ | rebuild per request |\n|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        lat = r["latency"]
        print(
            f"| {r['model']} | {r['parameters']:,} | {r['max_new_tokens']} | {1e3 * lat['switch_s']:.2f} ms | "
            f"{1e3 * lat['api_s']:.0f} ms | {1e3 * lat['page_s']:.0f} ms | {1e3 * lat['validation_s']:.0f} ms | "
            f"{1e3 * lat['rebuild_s']:.0f} ms |"
        )
    if args.json:
        write_json(Path(args.json).absolute() if Path(args.json).is_absolute() else REPO / args.json, results)


if __name__ == "__main__":
    main()

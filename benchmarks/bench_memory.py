"""Memory benchmark: peak RSS and wall time of mixing three sharded experts, soups vs naive vs mergekit.

Run (CPU, a few minutes; the experts take 3 × 367 MB of disk under --work):

    OMP_NUM_THREADS=1 python3 benchmarks/bench_memory.py
    OMP_NUM_THREADS=1 python3 benchmarks/bench_memory.py --repeats 3 --json runs/bench_memory/results.json
    python3 benchmarks/bench_memory.py --mergekit-python none        # skip mergekit

mergekit runs in its own environment (`--mergekit-python`, default /tmp/mergekit_env/bin/python), set up by

    python3 -m venv /tmp/mergekit_env --system-site-packages && /tmp/mergekit_env/bin/pip install mergekit

If that python is missing, or mergekit fails to import or to run, the table says so and why.

Set-up. Three float32 LLaMA experts built from one config with `from_config` (nothing is downloaded): one seeded
init, each expert = init + 0.01·N(0, 1) with its own seed, saved with `save_pretrained(max_shard_size="100MB")`
(sharded safetensors with an index). They are reused on later runs when the config matches.

Methods, each measured in a fresh process (never in this one):

- `baseline`: a process that imports torch, transformers and soups.mix (which pulls in hydra) and exits;
- `soups`: the CLI, `python -m soups.mix experts=[A,B,C] weights=[...] output=DIR max_shard_size=100MB`;
- `naive`: three `from_pretrained` models in memory, their state dicts averaged with the same λ, loaded into the
  first model, `save_pretrained(max_shard_size="100MB")` (imports the same libraries as `baseline`);
- `mergekit_baseline`: the mergekit python importing torch, transformers and mergekit;
- `mergekit`: `mergekit-yaml` linear merge (same λ, normalize false, float32) of the same files.

Peak RSS is the child's `ru_maxrss` from `os.wait4(pid)`: the rusage of that one child (and any descendants it
waited for), so runs cannot contaminate each other the way `getrusage(RUSAGE_CHILDREN)` (the max over every child
ever waited for) would. The increase is measured against the matching baseline process. While the child runs, its
`/proc/<pid>/status` is also sampled every few ms for the peak of RssAnon (heap: tensors) and RssFile
(file-backed pages, e.g. a live safetensors mmap): sampled, so a peak shorter than the interval can be missed.

Every output is checked against the exact soup Σ λ_i θ_i computed here in float64, tensor by tensor (max abs
diff), so a fast wrong merge cannot pass. The page cache is warmed by reading the expert files once first, so
disk speed does not favour whichever method runs second. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: The libraries every soups-environment child imports (the baseline imports exactly these and stops).
CHILD_IMPORTS = "import torch, transformers, soups.mix"
MERGEKIT_IMPORTS = "import torch, transformers, mergekit.merge, mergekit.config"
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# set-up: three sharded experts
# ----------------------------------------------------------------------------------------------------------


def expert_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The LLaMA config fields and seed that define the experts (reused on disk when they match)."""
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "seed": args.seed,
        "noise": 0.01,
        "shard": "100MB",
    }


def build_experts(root: Path, args: argparse.Namespace) -> list[Path]:
    """Builds (or reuses) three float32 experts = one init + seeded noise, sharded at 100 MB."""
    spec = expert_spec(args)
    paths = [root / f"expert{i}" for i in range(3)]
    marker = root / "experts.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(
        (p / "model.safetensors.index.json").is_file() for p in paths
    ):
        return paths
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    marker.unlink(missing_ok=True)
    config = LlamaConfig(**{k: v for k, v in spec.items() if k not in ("seed", "noise", "shard")})
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for i, path in enumerate(paths):
        generator = torch.Generator().manual_seed(args.seed + 1 + i)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(init[name] + spec["noise"] * torch.randn(tensor.shape, generator=generator))
        model.save_pretrained(path, max_shard_size=spec["shard"])
        print(f"built {path}", flush=True)
    root.joinpath("experts.json").write_text(json.dumps(spec, indent=1))
    return paths


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def warm_page_cache(paths: list[Path]) -> None:
    """Reads every expert file once so that all methods find them in the page cache."""
    for path in paths:
        for file in weight_files(path):
            with file.open("rb") as fh:
                while fh.read(1 << 24):
                    pass


# ----------------------------------------------------------------------------------------------------------
# measuring one process
# ----------------------------------------------------------------------------------------------------------


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measure_here(cmd: list[str], log: Path, interval: float = 0.005) -> dict[str, Any]:
    """Runs `cmd` as a child of THIS process; its peak RSS (ru_maxrss via wait4), sampled peaks and wall time.

    Call it only from a small process (`--wrap`, stdlib only): on Linux a child's ru_maxrss starts from the RSS
    its parent had when it forked (exec keeps the old address space's high-water mark), so a child forked from
    a process holding torch and three experts would report at least that much, whatever it does itself.
    """
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, kb in _status_kb(proc.pid).items():
                if name in peaks:
                    peaks[name] = max(peaks[name], kb)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child only
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it has been reaped
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,  # Linux: kilobytes
        "peak_anon_mb_sampled": peaks["RssAnon"] * 1024 / 1e6,
        "peak_file_mb_sampled": peaks["RssFile"] * 1024 / 1e6,
        "peak_rss_mb_sampled": peaks["VmRSS"] * 1024 / 1e6,
        "wrapper_rss_mb": _status_kb(os.getpid()).get("VmHWM", 0) * 1024 / 1e6,
        "log": str(log),
    }


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Measures `cmd` from a fresh stdlib-only wrapper process (`--wrap`), which reports as one JSON line."""
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--wrap", str(log), "--", *cmd]
    done = subprocess.run(wrapper, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"measurement wrapper failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# the children (run by `--child NAME`, in a fresh process)
# ----------------------------------------------------------------------------------------------------------


def child(name: str, experts: list[str], weights: list[float], output: str) -> None:
    """The body of a measured soups-environment process (imports exactly `CHILD_IMPORTS` first)."""
    import torch
    import transformers

    import soups.mix  # noqa: F401 - imported so the naive child carries the same libraries as the baseline

    if name == "baseline":
        return
    if name != "naive":
        raise SystemExit(f"unknown child {name!r}")
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    models = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in experts]
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        averaged = {
            k: sum(w * s[k] for w, s in zip(weights, states)) if v.is_floating_point() else v
            for k, v in states[0].items()
        }
    models[0].load_state_dict(averaged)
    models[0].save_pretrained(output, max_shard_size="100MB")
    print(f"naive: {time.perf_counter() - start:.2f} s")


# ----------------------------------------------------------------------------------------------------------
# correctness: every output against the exact float64 soup
# ----------------------------------------------------------------------------------------------------------


def max_abs_diffs(experts: list[Path], weights: list[float], outputs: dict[str, Path]) -> dict[str, float | str]:
    """max |out − Σ λ_i θ_i| (θ in float64) over all tensors, per output; a string when an output is unusable."""
    from soups.checkpoint import open_checkpoint
    from soups.utils import SoupsError

    ckpts = [open_checkpoint(p) for p in experts]
    opened: dict[str, Any] = {}
    result: dict[str, float | str] = {}
    for name, path in outputs.items():
        try:
            opened[name] = open_checkpoint(path)
        except SoupsError as err:
            result[name] = f"unreadable: {err}"
            continue
        if set(opened[name].keys()) != set(ckpts[0].keys()):
            missing = sorted(set(ckpts[0].keys()) ^ set(opened[name].keys()))
            result[name] = f"different tensors (e.g. {missing[0]!r})"
            del opened[name]
        else:
            result[name] = 0.0
    for key in ckpts[0].keys():
        exact = sum(w * c.get_tensor(key).double() for w, c in zip(weights, ckpts))
        for name, ckpt in opened.items():
            diff = float((ckpt.get_tensor(key).double() - exact).abs().max())
            result[name] = max(float(result[name]), diff)
    return result


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each figure (one repeat: that run)."""
    keys = ("wall_s", "peak_rss_mb", "peak_rss_mb_sampled", "peak_anon_mb_sampled", "peak_file_mb_sampled")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["rc"] = max(r["rc"] for r in runs)
    out["runs"] = runs
    return out


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y > 0 else "n/a"


def table(results: dict[str, Any], expert_mb: float) -> str:
    """The markdown table (increases over the matching baseline; ratios against soups)."""
    methods = results["methods"]
    rows = [
        "| method | peak RSS (MB) | increase over baseline (MB) | increase / one expert | sampled peak anon (MB) "
        "| sampled peak file-backed (MB) | wall (s) | wall − baseline wall (s) | wall vs soups | increase vs soups "
        "| max abs diff vs exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    soups = methods.get("soups")
    for name in ("baseline", "soups", "naive", "mergekit_baseline", "mergekit"):
        if name not in methods:
            continue
        m = methods[name]
        if m.get("error"):
            rows.append(f"| {name} | {m['error']} | | | | | | | | | |")
            continue
        base = methods["mergekit_baseline" if name.startswith("mergekit") else "baseline"]
        is_base = name.endswith("baseline")
        inc = m["peak_rss_mb"] - base["peak_rss_mb"]
        net = m["wall_s"] - base["wall_s"]
        anon = m["peak_anon_mb_sampled"] - base["peak_anon_mb_sampled"]
        file = m["peak_file_mb_sampled"] - base["peak_file_mb_sampled"]
        cells = [
            name,
            f"{m['peak_rss_mb']:.0f}",
            "" if is_base else f"{inc:.0f}",
            "" if is_base else f"{inc / expert_mb:.2f}",
            f"{m['peak_anon_mb_sampled']:.0f}" + ("" if is_base else f" ({anon:+.0f})"),
            f"{m['peak_file_mb_sampled']:.0f}" + ("" if is_base else f" ({file:+.0f})"),
            f"{m['wall_s']:.1f}",
            "" if is_base else f"{net:.1f}",
        ]
        if is_base or soups is None or soups.get("error"):
            cells += ["", ""]
        else:
            s_inc = soups["peak_rss_mb"] - methods["baseline"]["peak_rss_mb"]
            s_net = soups["wall_s"] - methods["baseline"]["wall_s"]
            cells += [_ratio(net, s_net), _ratio(inc, s_inc)]
        diff = results["max_abs_diff"].get(name, "")
        cells.append(diff if isinstance(diff, str) else f"{diff:.1e}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def _mergekit_problem(python: str) -> str | None:
    """None when `python` can import mergekit and has mergekit-yaml beside it; else the reason."""
    if python.lower() == "none":
        return "skipped (--mergekit-python none)"
    if not Path(python).is_file():
        return f"not installed: {python} does not exist (see the module docstring to set it up)"
    probe = subprocess.run([python, "-c", MERGEKIT_IMPORTS], capture_output=True, text=True)
    if probe.returncode != 0:
        return "mergekit does not import: " + " ".join(probe.stderr.strip().splitlines()[-1:])[:200]
    if not (Path(python).parent / "mergekit-yaml").is_file():
        return f"no mergekit-yaml beside {python}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_memory", help="experts and outputs")
    parser.add_argument("--weights", type=float, nargs=3, default=[0.2, 0.3, 0.5], help="λ of the three experts")
    parser.add_argument("--layers", type=int, default=6, help="LLaMA layers")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=2048, help="MLP size")
    parser.add_argument("--heads", type=int, default=12, help="attention heads")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median reported)")
    parser.add_argument("--mergekit-python", default="/tmp/mergekit_env/bin/python",
                        help="python of an environment with mergekit installed, or 'none'")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default WORK/results.json)")
    parser.add_argument("--methods", nargs="+", default=["soups", "naive", "mergekit"],
                        choices=["soups", "naive", "mergekit"], help="methods to measure (baselines always run)")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wrap", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--experts", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wrap is not None:  # a measurement wrapper: stdlib only, so its own RSS (the child's floor) is small
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        print(json.dumps(measure_here(command, args.wrap)))
        return
    if args.child is not None:
        child(args.child, args.experts, args.weights, args.output)
        return

    # ---- set-up ---------------------------------------------------------------------------------------------
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    experts = build_experts(work / "experts", args)
    expert_bytes = sum(f.stat().st_size for f in weight_files(experts[0]))
    expert_mb = expert_bytes / 1e6
    print(f"experts: 3 x {expert_mb:.0f} MB ({len(weight_files(experts[0]))} shards each) in {work / 'experts'}")
    warm_page_cache(experts)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    outputs = {name: work / f"out_{name}" for name in ("soups", "naive", "mergekit")}
    lam = args.weights
    me = [sys.executable, str(Path(__file__).resolve())]
    commands: dict[str, list[str]] = {
        "baseline": me + ["--child", "baseline"],
        "soups": [sys.executable, "-m", "soups.mix", f"experts=[{','.join(map(str, experts))}]",
                  f"weights=[{','.join(map(str, lam))}]", f"output={outputs['soups']}", "max_shard_size=100MB",
                  "progress=false"],
        "naive": me + ["--child", "naive", "--experts", *map(str, experts), "--weights", *map(str, lam),
                       "--output", str(outputs["naive"])],
    }
    for name in ("soups", "naive"):
        if name not in args.methods:
            del commands[name]
    mergekit_problem = _mergekit_problem(args.mergekit_python) if "mergekit" in args.methods else None
    if mergekit_problem is None and "mergekit" in args.methods:
        config = work / "mergekit.yaml"
        models = "\n".join(f"  - model: {p}\n    parameters:\n      weight: {w}" for p, w in zip(experts, lam))
        config.write_text(f"merge_method: linear\nmodels:\n{models}\nparameters:\n  normalize: false\n"
                          "dtype: float32\n")
        shard_params = str(100_000_000 // 4)  # 100 MB of float32, like the other two
        commands["mergekit_baseline"] = [args.mergekit_python, "-c", MERGEKIT_IMPORTS]
        commands["mergekit"] = [str(Path(args.mergekit_python).parent / "mergekit-yaml"), str(config),
                                str(outputs["mergekit"]), "--out-shard-size", shard_params, "--no-copy-tokenizer",
                                "--quiet"]

    # ---- loop: methods interleaved per repeat, each in a fresh process --------------------------------------
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for rep in range(args.repeats):
        for name, cmd in commands.items():
            if name in outputs:
                shutil.rmtree(outputs[name], ignore_errors=True)
            run = measure(cmd, logs / f"{name}-{rep}.log", env)
            runs[name].append(run)
            print(f"[{rep + 1}/{args.repeats}] {name}: rc {run['rc']}, peak RSS {run['peak_rss_mb']:.0f} MB, "
                  f"{run['wall_s']:.1f} s", flush=True)

    # ---- correctness and report -----------------------------------------------------------------------------
    methods: dict[str, Any] = {}
    for name, rs in runs.items():
        methods[name] = summarise(rs)
        if methods[name]["rc"] != 0:
            tail = " ".join(Path(rs[-1]["log"]).read_text().strip().splitlines()[-1:])[:200]
            methods[name]["error"] = f"failed (rc {methods[name]['rc']}): {tail}"
    if mergekit_problem is not None:
        methods["mergekit"] = {"error": f"mergekit {mergekit_problem}"}
    produced = {n: p for n, p in outputs.items() if n in runs and not methods[n].get("error")}
    diffs = max_abs_diffs(experts, lam, produced)
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "omp_num_threads": env["OMP_NUM_THREADS"]},
        "experts": {"paths": [str(p) for p in experts], "bytes_each": expert_bytes, "spec": expert_spec(args)},
        "weights": lam,
        "methods": methods,
        "max_abs_diff": diffs,
    }
    soups = methods.get("soups", {})
    if not soups.get("error"):
        ratio = (soups["peak_rss_mb"] - methods["baseline"]["peak_rss_mb"]) / expert_mb
        results["soups_increase_over_expert"] = ratio
        results["bound_1_5_met"] = ratio <= 1.5
    print(f"\nLLaMA {args.layers} layers x {args.hidden} (vocab {args.vocab}), 3 float32 experts of {expert_mb:.0f} MB "
          f"sharded at 100 MB, λ = {lam}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {args.repeats} repeat(s)\n")
    print(table(results, expert_mb))
    if "bound_1_5_met" in results:
        verdict = "met" if results["bound_1_5_met"] else "NOT met"
        print(f"\nsoups peak-RSS increase = {results['soups_increase_over_expert']:.2f} x one expert (bound 1.5: "
              f"{verdict})")
    path = args.json or work / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {path}")
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Packed-Ensembles forward time vs a loop over M separate models (eval mode, CPU by default).

    OMP_NUM_THREADS=2 python benchmarks/bench_packed_speed.py
    python benchmarks/bench_packed_speed.py --device cuda --batch 256 --size 32 --width 64

For each configuration PE-(α, M, γ) it times one forward of a packed ResNet-18 against M plain ResNet-18s
(`packed_resnet18` with α = M = γ = 1, the same per-member width) run one after the other, and reports the
median wall time over `--repeats` calls after a warm-up, the ratio loop / packed, and parameter counts. The
models are timed round-robin (one call each per round, the start rotating), so that a load change on a shared
machine hits all of them alike instead of whichever model was being timed then. The packed networks are
torch-uncertainty's (`vision.ensembles.packed`): PE-(2, 4, 2) at width 64 is the paper's 8.18M parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from soups.utils import steady_malloc
from vision.ensembles.packed import packed_resnet18


@torch.no_grad()
def round_robin_ms(
    models: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]], x: torch.Tensor, repeats: int, sync: bool
) -> dict[str, float]:
    """Median wall time of `fn(x)` in milliseconds for each (name, fn): two warm-up calls each, then `repeats`
    rounds of one timed call per model, the first model of a round rotating by one."""
    for _, fn in models:
        for _ in range(2):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name, _ in models}
    for r in range(repeats):
        for name, fn in models[r % len(models) :] + models[: r % len(models)]:
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x)
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images per forward")
    parser.add_argument("--size", type=int, default=32, help="image side (CIFAR-style stem)")
    parser.add_argument("--width", type=int, default=32, help="first-stage width of one ResNet-18 (64 = standard)")
    parser.add_argument("--members", type=int, default=4, help="M")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    args = parser.parse_args(argv)
    steady_malloc()  # no per-forward page faults from glibc returning activation blocks to the OS
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    m = args.members
    plain = [packed_resnet18(10, 3, args.width, alpha=1, num_estimators=1, gamma=1).to(device).eval() for _ in range(m)]

    def loop(inp: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(inp) for net in plain])

    packed = {
        f"PE-({alpha}, {m}, {gamma})": packed_resnet18(10, 3, args.width, alpha=alpha, num_estimators=m, gamma=gamma)
        .to(device)
        .eval()
        for alpha, gamma in [(2, 1), (2, 2), (4, 2)]
    }
    loop_name = f"{m} x ResNet-18 (loop)"
    ms = round_robin_ms([(loop_name, loop), *packed.items()], x, args.repeats, device.type == "cuda")
    loop_params = sum(p.numel() for net in plain for p in net.parameters())
    print(f"batch {args.batch}x3x{args.size}x{args.size}, ResNet-18 width {args.width}, M = {m}, {device}")
    print("| model | params | forward ms | loop / packed |")
    print("| --- | --- | --- | --- |")
    print(f"| {loop_name} | {loop_params:,} | {ms[loop_name]:.1f} | 1.00 |")
    for name, net in packed.items():
        params = sum(p.numel() for p in net.parameters())
        print(f"| {name} | {params:,} | {ms[name]:.1f} | {ms[loop_name] / ms[name]:.2f} |")


if __name__ == "__main__":
    main()

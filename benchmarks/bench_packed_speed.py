"""Packed-Ensembles forward time vs a loop over M separate models (eval mode, CPU by default).

    OMP_NUM_THREADS=2 python benchmarks/bench_packed_speed.py
    python benchmarks/bench_packed_speed.py --device cuda --batch 256 --size 32 --width 64

For each configuration PE-(α, M, γ) it times one forward of a packed ResNet-18 against M plain ResNet-18s
(`packed_resnet18` with α = M = γ = 1, the same per-member width) run one after the other, and reports the
median wall time over `--repeats` calls after a warm-up, the ratio loop / packed, and parameter counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from soups.utils import steady_malloc
from vision.ensembles.packed import packed_resnet18


@torch.no_grad()
def median_ms(fn: nn.Module | object, x: torch.Tensor, repeats: int, sync: bool) -> float:
    """Median wall time of `fn(x)` in milliseconds (two warm-up calls)."""
    for _ in range(2):
        fn(x)  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)  # type: ignore[operator]
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


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

    sync = device.type == "cuda"
    loop_ms = median_ms(loop, x, args.repeats, sync)
    loop_params = sum(p.numel() for net in plain for p in net.parameters())
    print(f"batch {args.batch}x3x{args.size}x{args.size}, ResNet-18 width {args.width}, M = {m}, {device}")
    print("| model | params | forward ms | loop / packed |")
    print("| --- | --- | --- | --- |")
    print(f"| {m} x ResNet-18 (loop) | {loop_params:,} | {loop_ms:.1f} | 1.00 |")
    for alpha, gamma in [(2, 1), (2, 2), (4, 2)]:
        net = packed_resnet18(10, 3, args.width, alpha=alpha, num_estimators=m, gamma=gamma).to(device).eval()
        ms = median_ms(net, x, args.repeats, sync)
        params = sum(p.numel() for p in net.parameters())
        print(f"| PE-({alpha}, {m}, {gamma}) | {params:,} | {ms:.1f} | {loop_ms / ms:.2f} |")


if __name__ == "__main__":
    main()

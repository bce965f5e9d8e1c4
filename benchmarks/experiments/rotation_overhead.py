"""What `--mlp-hadamard` costs per layer on CPU: the native W4A8 kernel on a `down_proj` with and without the fused
online input rotation (blocks of 512), same weights, same inputs, bf16 activations, rank-16 low-rank branch.

Prints, per shape and M, the best of 7 alternated trials of each and their ratio (the rotation's overhead).

    python benchmarks/experiments/rotation_overhead.py [--shapes smollm2 llama3-8b] [--ms 1 16 1024] [--threads 1] [--isa avx2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SHAPES = {"smollm2": (576, 1536), "llama3-8b": (4096, 14336)}  # down_proj (N, K)


def layer_for(kernel, q, scale, inv_smooth, down, up, block: int) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = torch.bfloat16, q.shape[0], 8
    layer.aser_weight_bits, layer.aser_hadamard, layer.bias = 4, block, None
    # the linear method folds 1/sqrt(b) into the smoothing vector; irrelevant to time
    kernel.prepare(layer, q, scale, inv_smooth, down, up, -1)
    if block and not getattr(layer, "aser_hadamard_fused", False):
        raise SystemExit("the native CPU kernel did not take the rotation (extension not built?)")
    return layer


def best_seconds(kernel, layer, x: torch.Tensor, reps: int) -> float:
    kernel.apply(layer, x, None)
    start = time.perf_counter()
    for _ in range(reps):
        kernel.apply(layer, x, None)
    return (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16, 1024])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--isa", help="native kernel ISA path (VLLM_ASER_CPU_ISA; default: the best this CPU has)")
    args = p.parse_args()
    if args.isa:
        os.environ["VLLM_ASER_CPU_ISA"] = args.isa
    torch.set_num_threads(args.threads)
    from vllm_aser.kernels.select import CPUKernel

    print(f"threads {args.threads}, ISA path {args.isa or 'best'}, blocks of {args.block}")
    for shape in args.shapes:
        n, k = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, 1, generator=g) * 0.01 + 0.001
        inv_smooth = torch.rand(k, generator=g) + 0.5
        down = (torch.randn(16, k, generator=g) * 0.01).bfloat16()
        up = (torch.randn(n, 16, generator=g) * 0.01).bfloat16()
        kernel = CPUKernel()
        plain = layer_for(kernel, q, scale, inv_smooth, down, up, 0)
        rotated = layer_for(kernel, q, scale, inv_smooth, down, up, args.block)
        for m in args.ms:
            x = torch.randn(m, k, generator=g).bfloat16()
            reps = max(3, int(2e7 // (m * n * k) * 10))
            best = {"plain": float("inf"), "rotated": float("inf")}
            for _ in range(7):
                for name, layer in (("plain", plain), ("rotated", rotated)):
                    best[name] = min(best[name], best_seconds(kernel, layer, x, reps))
            print(f"{shape:10s} down_proj {n}x{k}  M={m:5d}  plain {best['plain'] * 1e6:10.1f} us  "
                  f"rotated {best['rotated'] * 1e6:10.1f} us  x{best['rotated'] / best['plain']:.3f}", flush=True)


if __name__ == "__main__":
    main()

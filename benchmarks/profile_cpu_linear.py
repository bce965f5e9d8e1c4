"""Where the time of one ASER linear goes on this CPU (vLLM CPU build ops), stage by stage, against BF16.

Stages of the `cpu` kernel: smoothing (x * 1/s), dynamic per-token int8 quantization, the oneDNN int8 GEMM
(with per-channel dequantization in its epilogue), and the low-rank branch (x down^T, then out += t up^T: in
float32 up to CPU_FLOAT32_LOWRANK_MAX_ROWS rows, in bf16 above). The last two columns are the branch as earlier
versions ran it: float32 factors added to the bf16 output in place (mixed dtype), and bf16 factors at every size.
Shapes: SmolLM2-135M's fused linears and a ~1B Llama's; bf16 activations; median of repeated calls.

    python benchmarks/profile_cpu_linear.py [--rank 16] [--ms 1 16 64 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SHAPES = {
    "smollm2 qkv": (960, 576), "smollm2 gate_up": (3072, 576), "smollm2 down": (576, 1536),
    "1b qkv": (3072, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
}


def median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16, 64, 256])
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    from vllm import _custom_ops as ops

    from vllm_aser.kernels.torch_ops import CPU_FLOAT32_LOWRANK_MAX_ROWS  # importing registers the custom op

    torch.manual_seed(0)
    dt = torch.bfloat16
    print(f"torch threads: {torch.get_num_threads()}; rank {args.rank}; times in microseconds (median)")
    header = (f"{'shape':16s} {'M':>4s} | {'bf16':>7s} | {'smooth':>7s} {'quant':>7s} {'int8mm':>7s} {'lowrank':>7s} "
              f"{'sum':>7s} | {'aser op':>7s} {'x bf16':>6s} | {'no-smooth':>9s} | {'LR fp32+':>8s} {'LR bf16':>7s}")
    print(header)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k).to(dt) * 0.02
        q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
        scale = torch.rand(n, 1) * 0.01
        handle_holder = scale.contiguous()
        dnnl = ops.create_onednn_scaled_mm(q.t(), handle_holder, dt, True, False, 32)
        inv_smooth = (torch.rand(k) + 0.5).to(dt)
        down = (torch.randn(args.rank, k) * 0.02).to(dt)
        up = (torch.randn(n, args.rank) * 0.02).to(dt)
        down_t, up_t = down.float().t().contiguous(), up.float().t().contiguous()  # how the cpu kernel keeps them
        for m in args.ms:
            x = torch.randn(m, k).to(dt)
            xs = x * inv_smooth
            xq, xsc, _ = ops.onednn_scaled_int8_quant(xs, None, None, True)
            out = torch.empty(m, n, dtype=dt)
            t_bf16 = median_us(lambda: torch.nn.functional.linear(x, w), args.reps)
            t_smooth = median_us(lambda: x * inv_smooth, args.reps)
            t_quant = median_us(lambda: ops.onednn_scaled_int8_quant(xs, None, None, True), args.reps)
            t_mm = median_us(lambda: torch.ops._C.onednn_scaled_mm(out, xq, xsc, None, None, None,
                                                                   dnnl.handler_tensor), args.reps)
            down_lp, up_lp = down.t().contiguous(), up.t().contiguous()
            if m <= CPU_FLOAT32_LOWRANK_MAX_ROWS:
                t_lr = median_us(lambda: out.add_(torch.mm(torch.mm(xs.float(), down_t), up_t).to(dt)), args.reps)
            else:
                t_lr = median_us(lambda: out.addmm_(torch.mm(xs, down_lp), up_lp), args.reps)
            t_lr_mixed = median_us(lambda: out.add_(torch.mm(torch.mm(xs.float(), down_t), up_t)), args.reps)
            t_lr_bf16 = median_us(lambda: out.addmm_(xs @ down.t(), up.t()), args.reps)
            lowrank = (down_t, up_t, down_lp, up_lp)
            t_op = median_us(lambda: torch.ops.vllm_aser.cpu_linear(x, dnnl.handler_tensor, inv_smooth, *lowrank,
                                                                    None, n, 8), args.reps)
            t_op_ns = median_us(lambda: torch.ops.vllm_aser.cpu_linear(x, dnnl.handler_tensor, None, *lowrank,
                                                                       None, n, 8), args.reps)
            total = t_smooth + t_quant + t_mm + t_lr
            print(f"{name:16s} {m:4d} | {t_bf16:7.1f} | {t_smooth:7.1f} {t_quant:7.1f} {t_mm:7.1f} {t_lr:7.1f} "
                  f"{total:7.1f} | {t_op:7.1f} {t_bf16 / t_op:6.2f} | {t_op_ns:9.1f} | {t_lr_mixed:8.1f} {t_lr_bf16:7.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

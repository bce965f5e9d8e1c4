"""Where the time of one ASER linear goes on the int8 fallback path of the `cpu` kernel (VLLM_ASER_CPU_NO_NATIVE=1:
int4 unpacked to int8, vLLM CPU build ops), stage by stage, against what vLLM runs for the same layer unquantized
(BF16, oneDNN with a prepacked weight) and in-tree W8A8. The native W4A8 kernel is measured by cpu_linear.py.

Stages of the `cpu` kernel: smoothing (x * 1/s); the int8 GEMM (AMX with fused per-token quantization where the
CPU and shape allow, as vLLM's W8A8 on these CPUs; else oneDNN's, with its quantization measured apart); the
low-rank branch (x down^T, then out += t up^T: float32 up to CPU_FLOAT32_LOWRANK_MAX_ROWS rows, bf16 above).
`aser op` is the whole custom op as vLLM calls it; `oneDNN op` the same with VLLM_ASER_CPU_NO_AMX=1.
Shapes: SmolLM2-135M's fused linears and a ~1B Llama's; bf16 activations; median of repeated calls.

    python benchmarks/experiments/profile_cpu_linear.py [--rank 16] [--ms 1 16 64 256 1024]
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16, 64, 256, 1024])
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    from vllm import _custom_ops as ops

    from vllm_aser.kernels.select import NO_AMX_ENV_VAR, NO_NATIVE_ENV_VAR, CPUKernel
    from vllm_aser.kernels.torch_ops import _add_lowrank

    torch.manual_seed(0)
    dt = torch.bfloat16
    print(f"torch threads: {torch.get_num_threads()}; rank {args.rank}; times in microseconds (median)")
    print(f"{'shape':16s} {'M':>5s} | {'bf16':>8s} {'w8a8':>8s} | {'smooth':>7s} {'int8mm':>8s} {'lowrank':>7s} | "
          f"{'aser op':>8s} {'oneDNN op':>9s} | {'op/bf16':>7s} {'op/w8a8':>7s} {'LR/mm':>6s}")
    kernel = CPUKernel()
    os.environ[NO_NATIVE_ENV_VAR] = "1"
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k).to(dt) * 0.02
        q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
        scale = torch.rand(n, 1) * 0.01 + 0.001
        inv_smooth = torch.rand(k) + 0.5
        down, up = torch.randn(args.rank, k) * 0.02, torch.randn(n, args.rank) * 0.02
        layers = {}
        for amx in (True, False):
            layer = torch.nn.Module()
            layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = dt, n, 8
            os.environ[NO_AMX_ENV_VAR] = "0" if amx else "1"
            kernel.prepare(layer, q, scale, inv_smooth, down, up, -1)
            layers[amx] = layer
        os.environ.pop(NO_AMX_ENV_VAR)
        amx_layer = layers[True] if layers[True].aser_cpu_path == "amx" else None
        bf16 = ops.create_onednn_mm(w.t(), 32)  # what vLLM runs for an unquantized linear of this size
        packed = torch.ops._C.convert_weight_packed(q) if amx_layer is not None else None
        for m in args.ms:
            x = torch.randn(m, k).to(dt)
            xs = x * layers[False].aser_inv_smooth
            out = torch.empty(m, n, dtype=dt)
            lowrank = (layers[False].aser_down, layers[False].aser_up, layers[False].aser_down_lp,
                       layers[False].aser_up_lp)
            t_bf16 = median_us(lambda: ops.onednn_mm(bf16, x, None), args.reps)
            t_smooth = median_us(lambda: x * layers[False].aser_inv_smooth, args.reps)
            if amx_layer is not None:
                s = scale.reshape(-1)
                t_w8a8 = median_us(lambda: torch.ops._C.int8_scaled_mm_with_quant(x, packed, s, None, dt, True),
                                   args.reps)
                t_mm = median_us(lambda: torch.ops._C.int8_scaled_mm_with_quant(
                    xs, amx_layer.aser_weight_packed, amx_layer.aser_weight_scale, None, dt, True), args.reps)
            else:
                def onednn_mm():
                    xq, xsc, _ = ops.onednn_scaled_int8_quant(xs, None, None, True)
                    torch.ops._C.onednn_scaled_mm(out, xq, xsc, None, None, None, layers[False].aser_dnnl_handle)

                t_w8a8 = t_mm = median_us(onednn_mm, args.reps)
            t_lr = median_us(lambda: _add_lowrank(out, xs, *lowrank), args.reps)
            t_op = median_us(lambda: kernel.apply(layers[True], x, None), args.reps)
            t_dnnl = median_us(lambda: kernel.apply(layers[False], x, None), args.reps)
            print(f"{name:16s} {m:5d} | {t_bf16:8.1f} {t_w8a8:8.1f} | {t_smooth:7.1f} {t_mm:8.1f} {t_lr:7.1f} | "
                  f"{t_op:8.1f} {t_dnnl:9.1f} | {t_bf16 / t_op:7.2f} {t_w8a8 / t_op:7.2f} {t_lr / t_mm:6.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-linear CPU micro-benchmark: the ASER native W4A8 kernel against what vLLM's CPU build runs for the same
layer as in-tree W8A8 (AMX int8 GEMM with fused quantization where the CPU has it, else oneDNN quantization +
oneDNN int8 GEMM) and as BF16 (oneDNN with a prepacked weight).

Llama-3-8B and ~1B Llama shapes, M = 1 / 16 / 256, bf16 activations. Weights are cycled through enough copies to
exceed the last-level cache twice over, so decode figures are DRAM streaming, not cache hits. The ASER rows use
rank 16 (about 1% extra parameters at 4096 wide) and a smoothing vector; `GB/s` is the int4 weight bytes streamed
per second, against the machine's copy bandwidth (torch copy of 1 GiB, read + write bytes) measured in the same
run. Writes docs/throughput/cpu_linear.{json,md}.

    python benchmarks/cpu_linear.py [--ms 1 16 256] [--shapes 8b 1b] [--rank 16] [--isa avx2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.machine import describe_machine  # noqa: E402

SHAPES = {  # (N, K) per decoder linear, q/k/v and gate/up fused as vLLM runs them
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)},
}
OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "throughput"


def last_level_cache_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 64 * 2**20


def copy_bandwidth_gbs() -> float:
    src = torch.ones(2**30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / min(times) / 1e9


def read_bandwidth_gbs() -> float:
    """Bytes read per second by a float32 sum over 1 GiB (all threads): the ceiling for streaming weights."""
    src = torch.ones(2**28, dtype=torch.float32)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / min(times) / 1e9


def median_us(calls: list, min_seconds: float = 0.4) -> float:
    """Median time of one call, cycling through `calls` (one per weight copy) so that weights come from DRAM."""
    for c in calls:
        c()
    times, start = [], time.perf_counter()
    i = 0
    while time.perf_counter() - start < min_seconds or len(times) < 5:
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16, 256])
    p.add_argument("--shapes", nargs="*", default=["8b", "1b"], choices=list(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--isa", default=None, help="native kernel ISA path (default: the best this CPU has)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    from vllm import _custom_ops as ops

    from vllm_aser.kernels import cpu_w4a8
    from vllm_aser.kernels.select import _amx_int8_available

    isa = args.isa or cpu_w4a8.cpu_isa()[0]
    if isa is None:
        print(f"no native kernel: {cpu_w4a8.cpu_isa()[1]}", file=sys.stderr)
        return 1
    machine, threads = describe_machine(), torch.get_num_threads()
    llc = last_level_cache_bytes()
    bandwidth, read_bw = copy_bandwidth_gbs(), read_bandwidth_gbs()
    print(f"{machine}; {threads} threads; native path {isa}; rank {args.rank}; LLC {llc / 2**20:.0f} MiB; "
          f"copy bandwidth {bandwidth:.1f} GB/s (read + write), read bandwidth {read_bw:.1f} GB/s")
    dt = torch.bfloat16
    torch.manual_seed(0)
    rows = []
    print(f"{'shape':14s} {'M':>4s} | {'bf16 us':>9s} {'w8a8 us':>9s} {'aser us':>9s} | {'x bf16':>6s} "
          f"{'x w8a8':>6s} | {'GB/s int4':>9s} {'% copy':>6s} {'% read':>6s}")
    for family in args.shapes:
        for name, (n, k) in SHAPES[family].items():
            copies = {b: max(1, math.ceil(2 * llc / (n * k * b))) for b in (0.5, 1, 2)}
            q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
            scale = torch.rand(n, 1) * 0.01 + 0.001
            inv_smooth = torch.rand(k) + 0.5
            down = (torch.randn(args.rank, k) * 0.02).half()
            up = (torch.randn(n, args.rank) * 0.02).half()
            aser = [cpu_w4a8.pack(q, scale, -1, down, up, None) for _ in range(copies[0.5])]
            amx = _amx_int8_available(n, k, dt, 8)
            if amx:
                w8 = [torch.ops._C.convert_weight_packed(q) for _ in range(copies[1])]
                s8 = scale.reshape(-1).contiguous()
            else:
                s8 = scale.reshape(-1, 1).contiguous()
                w8 = [ops.create_onednn_scaled_mm(q.t(), s8, dt, True, False, 32) for _ in range(copies[1])]
            bf16 = [ops.create_onednn_mm((torch.randn(n, k) * 0.02).to(dt).t(), 32) for _ in range(copies[2])]
            for m in args.ms:
                x = torch.randn(m, k).to(dt)
                t_bf16 = median_us([lambda h=h: ops.onednn_mm(h, x, None) for h in bf16])
                if amx:
                    t_w8 = median_us([lambda w=w: torch.ops._C.int8_scaled_mm_with_quant(x, w, s8, None, dt, True)
                                      for w in w8])
                else:
                    def w8a8(h):
                        xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
                        out = torch.empty(m, n, dtype=dt)
                        torch.ops._C.onednn_scaled_mm(out, xq, xs, None, None, None, h.handler_tensor)
                    t_w8 = median_us([lambda h=h: w8a8(h) for h in w8])
                t_aser = median_us([lambda w=w: cpu_w4a8.w4a8_linear(x, w, inv_smooth, 8, isa) for w in aser])
                gbs = n * k / 2 / (t_aser * 1e-6) / 1e9
                row = dict(shape=f"{family} {name}", n=n, k=k, m=m, bf16_us=t_bf16, w8a8_us=t_w8, aser_us=t_aser,
                           w8a8_kernel="amx" if amx else "onednn", int4_gbs=gbs, copy_gbs=bandwidth,
                           read_gbs=read_bw)
                rows.append(row)
                print(f"{row['shape']:14s} {m:4d} | {t_bf16:9.1f} {t_w8:9.1f} {t_aser:9.1f} | {t_bf16 / t_aser:6.2f} "
                      f"{t_w8 / t_aser:6.2f} | {gbs:9.1f} {100 * gbs / bandwidth:5.0f}% {100 * gbs / read_bw:5.0f}%",
                      flush=True)
            del aser, w8, bf16
    if args.no_write:
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine, threads=threads, isa=isa, rank=args.rank, copy_gbs=bandwidth, read_gbs=read_bw,
                llc_bytes=llc)
    (OUT_DIR / "cpu_linear.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = ["# Per-linear CPU benchmark\n",
             f"Written by `python benchmarks/cpu_linear.py`; do not edit by hand. {machine}; {threads} threads; "
             f"native path `{isa}`; ASER rank {args.rank} with smoothing; weights cycled past the {llc / 2**20:.0f} "
             f"MiB last-level cache; copy bandwidth {bandwidth:.1f} GB/s (read + write bytes), read bandwidth "
             f"{read_bw:.1f} GB/s (float32 sum). Times are medians in microseconds.\n",
             "| shape | M | BF16 us | W8A8 us | ASER us | ASER x BF16 | ASER x W8A8 | int4 GB/s | % of copy | % of read |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['n']}x{r['k']}) | {r['m']} | {r['bf16_us']:.0f} | {r['w8a8_us']:.0f} "
                     f"({r['w8a8_kernel']}) | {r['aser_us']:.0f} | {r['bf16_us'] / r['aser_us']:.2f} | "
                     f"{r['w8a8_us'] / r['aser_us']:.2f} | {r['int4_gbs']:.1f} | "
                     f"{100 * r['int4_gbs'] / r['copy_gbs']:.0f}% | {100 * r['int4_gbs'] / r['read_gbs']:.0f}% |")
    (OUT_DIR / "cpu_linear.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

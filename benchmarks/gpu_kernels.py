"""GPU microbenchmark of the ASER CUDA kernels against FP16 and W8A8 GEMMs (torch + triton only, no vLLM).

For the linear shapes of Llama-3-8B and of one tensor-parallel shard (TP=8) of Llama-3-70B, and M tokens in
{1, 16, 64, 256, 1024, 4096}, times with CUDA events (warm-up, then the median of many calls, inputs and weights
rotated through more memory than the L2 cache holds):
  fp16      torch.nn.functional.linear, FP16 weights
  w8a8      torch._int_mm on int8 activations (already quantized) and int8 weights, then per-token x per-channel
            scaling to FP16 (M padded to 17 where _int_mm needs M > 16)
  w4a8      the ASER kernel pair without the low-rank branch (activation quantization included)
  aser      the ASER kernel pair with a rank-64 low-rank branch (ASER's own GEMM: the fallback path)
and, where vLLM's CUDA build is importable (`--vllm auto`, the default), vLLM's own kernels:
  w8a8_cutlass   vLLM's W8A8: scaled_int8_quant + cutlass_scaled_mm (per-token x per-channel)
  marlin_w4a8    vLLM's Marlin W4A8 (int8 activations): per_token_quant_int8 + marlin_gemm
  aser_marlin    what a served ASER layer runs where Marlin takes it: ASER's Triton smoothing / int8 / low-rank
                 down kernel, Marlin's GEMM, the low-rank up added in place (rank 64)
and prints times, ratios to fp16, achieved TB/s and TOP/s against the device's measured copy bandwidth and FP16
matmul rate. Writes JSON and CSV (and a PNG when matplotlib is installed; `--plot FILE.json` draws it later).

    python benchmarks/gpu_kernels.py --out docs/gpu            # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke --out /tmp/x   # CPU: tiny shapes, checks only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_aser.kernels import triton_w4a8 as tk  # noqa: E402

SHAPES = {  # name -> (N, K) of y = x W^T
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama3-70b-tp8": {"qkv": (1280, 8192), "o": (8192, 1024), "gate_up": (7168, 8192), "down": (8192, 3584)},
}
SMOKE_SHAPES = {"smoke": {"a": (40, 72), "b": (96, 136), "c": (128, 256)}}  # c: fits Marlin's tiles
MS = (1, 16, 64, 256, 1024, 4096)
RANK = 64
METHODS = ("fp16", "w8a8", "w4a8", "aser")
VLLM_METHODS = ("w8a8_cutlass", "marlin_w4a8", "aser_marlin")
PARTS = ("aser_quant", "aser_gemm")  # the two kernels of `aser`, timed alone
L2_FLUSH_BYTES = 256 << 20  # rotate through at least this much memory per method (H100 L2: 50 MB)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fns: list, device: str, warmup: int, iters: int, graphs: bool = False) -> float:
    """Median microseconds of one call, cycling through `fns` (each bound to different buffers).

    With `graphs`, the calls are captured in one CUDA graph whose replays are timed (per call): that is how vLLM
    runs decode-sized batches, and it keeps the Python launch cost of small kernels out of the GPU time.
    """
    for i in range(max(warmup, len(fns))):  # also runs the autotuner before any capture
        fns[i % len(fns)]()
    sync(device)
    if graphs and device == "cuda":
        # one graph replays `calls` calls (cycling the buffer sets): the replay's own launch cost is shared out
        calls = max(len(fns), 20)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                for i in range(calls):
                    fns[i % len(fns)]()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        sync(device)
        times = []
        for _ in range(max(5, iters // 5)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        return statistics.median(times)
    times = []
    for i in range(iters):
        fn = fns[i % len(fns)]
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def device_peaks(device: str) -> dict:
    """Measured device-to-device copy bandwidth (GB/s) and FP16 / int8 matmul rates (TFLOP/s, TOP/s)."""
    if device != "cuda":
        return {"copy_gbps": float("nan"), "fp16_tflops": float("nan"), "int8_tops": float("nan")}
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)], device, 3, 20)
    a = torch.randn(8192, 8192, dtype=torch.float16, device=device)
    mm_us = time_calls([lambda: a @ a], device, 3, 20)
    ai = torch.randint(-127, 127, (8192, 8192), dtype=torch.int8, device=device)
    bi = torch.randint(-127, 127, (8192, 8192), dtype=torch.int8, device=device).t()  # column-major: cuBLASLt's fast path
    imm_us = time_calls([lambda: torch._int_mm(ai, bi)], device, 3, 20)
    n = 8192
    return {"copy_gbps": 2 * src.numel() / us / 1e3, "fp16_tflops": 2 * n**3 / mm_us / 1e6,
            "int8_tops": 2 * n**3 / imm_us / 1e6}


def copies_for(nbytes: int, smoke: bool) -> int:
    return 1 if smoke else max(2, min(16, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1))))


def vllm_why_not(device: str) -> str | None:
    """None when vLLM's W8A8 and Marlin ops can be timed here."""
    try:
        from vllm_aser.kernels import marlin_w4a8
    except ImportError as e:
        return f"vLLM is not importable ({e})"
    if not marlin_w4a8.have_marlin_ops() or not hasattr(torch.ops._C, "cutlass_scaled_mm"):
        return "this vLLM build has no CUDA Marlin / CUTLASS ops"
    if device != "cuda":
        return "no CUDA device"
    return None


def bench_shape(n: int, k: int, m: int, device: str, smoke: bool, warmup: int, iters: int,
                graphs: bool, methods: tuple[str, ...] = METHODS) -> dict:
    if n % 64 or k % 128:  # vLLM's rows need Marlin's (and CUTLASS's) tiles
        methods = tuple(m for m in methods if m not in VLLM_METHODS)
    g = torch.Generator(device="cpu").manual_seed(m * 7 + n + k)
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, 1, generator=g) * 0.01 + 0.001)
    w_fp = (q.float() * scale).to(dtype)
    rank = min(RANK, k, n)
    down = (torch.randn(rank, k, generator=g) * 0.02).to(dtype)
    up = (torch.randn(n, rank, generator=g) * 0.02).to(dtype)
    inv_smooth = torch.rand(k, generator=g) + 0.5

    weights = [tk.pack_int4_kn(q.to(device), scale.to(device), -1)
               for _ in range(copies_for(n * k // 2, smoke))]
    fp_ws = [w_fp.to(device) for _ in range(copies_for(n * k * 2, smoke))]
    i8_ws = [q.to(device).t() for _ in range(copies_for(n * k, smoke))]  # [K, N] column-major, as vLLM passes it
    xs = [torch.randn(m, k, generator=g).to(dtype).to(device) for _ in range(4)]
    inv_smooth, down, up_t, w_scale = (t.to(device) for t in (inv_smooth, down, up.t().contiguous(),
                                                               scale.reshape(1, n).float()))
    m_mm = max(m, 17)  # torch._int_mm needs M > 16 on CUDA
    xq8 = [torch.randint(-127, 127, (m_mm, k), dtype=torch.int8, generator=g).to(device) for _ in range(4)]
    a_scale = torch.rand(m_mm, 1, generator=g).to(device)

    if "marlin_w4a8" in methods:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils import int8_utils

        import vllm_aser.kernels.torch_ops  # noqa: F401  (registers torch.ops.vllm_aser.cuda_marlin_linear)
        from vllm_aser.kernels import marlin_w4a8

        marlin_ws = [marlin_w4a8.prepare(q.to(device), scale.to(device), -1, dtype)
                     for _ in range(copies_for(n * k // 2, smoke))]
        w_scale_col = scale.reshape(n, 1).float().to(device)

    def marlin_call(mw, x, with_aser: bool):
        if with_aser:
            return torch.ops.vllm_aser.cuda_marlin_linear(
                x, mw.qweight, mw.scales, mw.zeros, mw.g_idx, mw.perm, mw.workspace, mw.global_scale, None,
                inv_smooth, down, up_t, None, n, 8, mw.is_k_full)
        xq, xsc = int8_utils.per_token_quant_int8(x)
        return marlin_w4a8.gemm(xq, xsc, mw.qweight, mw.scales, mw.zeros, mw.g_idx, mw.perm, mw.workspace, None,
                                None, n, mw.is_k_full)

    def make(method: str, i: int):
        x = xs[i % len(xs)]
        if method == "w8a8_cutlass":
            w = i8_ws[i % len(i8_ws)]

            def run():
                xq, xsc, _ = ops.scaled_int8_quant(x)
                return ops.cutlass_scaled_mm(xq, w, xsc, w_scale_col, dtype)
            return run
        if method in ("marlin_w4a8", "aser_marlin"):
            mw = marlin_ws[i % len(marlin_ws)]
            return lambda: marlin_call(mw, x, method == "aser_marlin")
        if method == "fp16":
            w = fp_ws[i % len(fp_ws)]
            return lambda: torch.nn.functional.linear(x, w)
        if method == "w8a8":
            w, xa = i8_ws[i % len(i8_ws)], xq8[i % len(xq8)]
            return lambda: (torch._int_mm(xa, w).float() * a_scale * w_scale).to(dtype)
        w = weights[i % len(weights)]
        if method == "w4a8":
            return lambda: tk.aser_linear_triton(x, w, inv_smooth, None, None, None)
        if method == "aser_quant":  # kernel 1 alone
            return lambda: tk.smooth_quant_lowrank(x, inv_smooth, down)
        if method == "aser_gemm":  # kernel 2 alone, on kernel 1's outputs
            xq, xsc, t = parts[i % len(parts)]
            return lambda: tk.w4a8_gemm(xq, xsc, w, t, up_t, None, dtype)
        return lambda: tk.aser_linear_triton(x, w, inv_smooth, down, up_t, None)

    triton_rows = "aser" in methods
    parts = [tk.smooth_quant_lowrank(x, inv_smooth, down) for x in xs]
    row = {"n": n, "k": k, "m": m, "rank": rank}
    count = max(len(weights), len(fp_ws), len(i8_ws), len(xs))
    for method in methods + (PARTS if triton_rows else ()):
        row[f"{method}_us"] = time_calls([make(method, i) for i in range(count)], device, warmup, iters, graphs)
    # correctness of the timed kernel on this shape (against a dequantized torch computation)
    x = xs[0]
    ref = ((x.float() * inv_smooth) @ (q.float() * scale).t().to(device)
           + ((x.float() * inv_smooth) @ down.float().t()) @ up_t.float())
    if triton_rows:
        out = tk.aser_linear_triton(x, weights[0], inv_smooth, down, up_t, None).float()
        row["aser_rel_err_vs_unquantized_act"] = float((out - ref).norm() / ref.norm())
    if "aser_marlin" in methods:
        out = marlin_call(marlin_ws[0], x, True).float()
        row["aser_marlin_rel_err_vs_unquantized_act"] = float((out - ref).norm() / ref.norm())
    # bytes that must move at least once: weights (+ low-rank factors), activations in and out
    act = m * k * x.element_size() + m * n * x.element_size()
    row["bytes"] = {"fp16": n * k * 2 + act, "w8a8": n * k + act, "w4a8": n * k // 2 + act,
                    "aser": n * k // 2 + (n + k) * rank * 2 + act}
    row["bytes"] |= {"w8a8_cutlass": row["bytes"]["w8a8"], "marlin_w4a8": row["bytes"]["w4a8"],
                     "aser_marlin": row["bytes"]["aser"]}
    row["ops"] = 2 * m * n * k
    return row


def compiled_report() -> list[dict]:
    """Registers, spills, shared memory and the matrix instructions of every kernel variant compiled so far."""
    report = []
    for fn in (tk._w4a8_gemm_kernel, tk._smooth_quant_lowrank_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                ptx = kernel.asm.get("ptx", "") if hasattr(kernel, "asm") else ""
                src = getattr(kernel, "src", None)
                consts = getattr(src, "constants", {}) if src is not None else {}
                blocks = {str(k[-1] if isinstance(k, tuple) else k): v for k, v in consts.items()
                          if "BLOCK" in str(k) or "GROUP" in str(k) or "HAS_" in str(k)}
                report.append({
                    "kernel": fn.__name__, "constexprs": {k: str(v) for k, v in blocks.items()},
                    "num_warps": getattr(kernel.metadata, "num_warps", None),
                    "num_stages": getattr(kernel.metadata, "num_stages", None),
                    "shared_bytes": getattr(kernel.metadata, "shared", None),
                    "n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                    "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
                })
    return report


def summarize(rows: list[dict], peaks: dict, methods: tuple[str, ...] = METHODS) -> list[dict]:
    flat = []
    for r in rows:
        for method in [m for m in methods if f"{m}_us" in r]:
            us = r[f"{method}_us"]
            tbps = r["bytes"][method] / us / 1e6
            flat.append({
                "model": r["model"], "layer": r["layer"], "n": r["n"], "k": r["k"], "m": r["m"], "method": method,
                "us": round(us, 2), "speedup_vs_fp16": round(r["fp16_us"] / us, 3),
                "tbps": round(tbps, 3), "tops": round(r["ops"] / us / 1e6, 2),
                "pct_copy_bw": round(100 * tbps * 1e3 / peaks["copy_gbps"], 1) if peaks["copy_gbps"] == peaks["copy_gbps"] else None,
                "lowrank_overhead_pct": _overhead(r, method),
                "rel_err": round(r[f"{method}_rel_err_vs_unquantized_act"], 5) if method.startswith("aser") else None,
                "quant_us": round(r["aser_quant_us"], 2) if method == "aser" and "aser_quant_us" in r else None,
                "gemm_us": round(r["aser_gemm_us"], 2) if method == "aser" and "aser_gemm_us" in r else None,
            })
    return flat


def _overhead(r: dict, method: str) -> float | None:
    """ASER's smoothing + low-rank cost over the same GEMM without them (Marlin: over vLLM's own W4A8 path)."""
    base = {"aser": "w4a8_us", "aser_marlin": "marlin_w4a8_us"}.get(method)
    if not base or base not in r or f"{method}_us" not in r:
        return None
    return round(100 * (r[f"{method}_us"] / r[base] - 1), 1)


def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    flat = data["results"]
    models = sorted({r["model"] for r in flat})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), dpi=120, squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in [m for m in METHODS + VLLM_METHODS if m != "fp16" and any(r["method"] == m for r in flat)]:
            pts = {}
            for r in flat:
                if r["model"] == model and r["method"] == method:
                    pts.setdefault(r["m"], []).append(r["speedup_vs_fp16"])
            ms = sorted(pts)
            # geometric mean over the model's layers
            ax.plot(ms, [math.exp(sum(math.log(max(v, 1e-9)) for v in pts[m]) / len(pts[m])) for m in ms], marker="o", label=method)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up over FP16 (geomean of layers)")
        ax.set_title(f"{model} on {data['device']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-bench"), help="folder for the JSON / CSV / PNG")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (checks the script)")
    p.add_argument("--models", nargs="*", default=list(SHAPES), help="subset of " + ", ".join(SHAPES))
    p.add_argument("--ms", type=int, nargs="*", default=list(MS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--eager", action="store_true", help="time plain launches instead of CUDA-graph replays")
    p.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON")
    p.add_argument("--methods", nargs="*", help="time only these (fp16 always): e.g. fp16 marlin_w4a8 aser_marlin")
    p.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                   help="also time vLLM's CUTLASS W8A8, Marlin W4A8 and ASER on Marlin (auto: when importable)")
    args = p.parse_args(argv)
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.smoke and tk.INTERPRET):
        print("gpu_kernels: no CUDA device (on CPU only `TRITON_INTERPRET=1 ... --smoke` runs)", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if args.smoke else {m: SHAPES[m] for m in args.models}
    ms = (1, 7, 33) if args.smoke else args.ms
    warmup, iters = (1, 2) if args.smoke else (10, args.iters)
    reason = vllm_why_not(device) if args.vllm != "off" else "--vllm off"
    if args.vllm == "on" and reason:
        print(f"gpu_kernels: --vllm on, but {reason}", file=sys.stderr)
        return 2
    methods = METHODS + (() if reason and args.vllm != "on" else VLLM_METHODS)
    if args.methods:
        if unknown := [m for m in args.methods if m not in METHODS + VLLM_METHODS]:
            p.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS + VLLM_METHODS)})")
        if missing := [m for m in args.methods if m not in methods]:
            p.error(f"--methods {' '.join(missing)}: not available here ({reason})")
        methods = ("fp16", *[m for m in args.methods if m != "fp16"])  # fp16: every ratio's baseline
    if reason:
        print(f"vLLM rows skipped: {reason}")
    peaks = device_peaks(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreted smoke run)"
    print(f"device: {name}; copy {peaks['copy_gbps']:.0f} GB/s, FP16 matmul {peaks['fp16_tflops']:.0f} TFLOP/s, "
          f"int8 _int_mm {peaks['int8_tops']:.0f} TOP/s", flush=True)
    rows = []
    shown = methods[1:]
    print(f"{'model':15s} {'layer':8s} {'N':>6s} {'K':>6s} {'M':>5s} | {'fp16 us':>8s} "
          + " ".join(f"{m[:12]:>12s}" for m in shown) + " (x fp16) | ASER extra | quant/gemm us | rel err")
    for model, layers in shapes.items():
        for layer, (n, k) in layers.items():
            for m in ms:
                r = bench_shape(n, k, m, device, args.smoke, warmup, iters, not args.eager, methods) | {
                    "model": model, "layer": layer}
                rows.append(r)
                ratio = lambda meth: (f"{r['fp16_us'] / r[f'{meth}_us']:12.2f}" if f"{meth}_us" in r  # noqa: E731
                                      else f"{'-':>12s}")
                fastest_aser = "aser_marlin" if "aser_marlin_us" in r else "aser"
                extra = _overhead(r, fastest_aser) if f"{fastest_aser}_us" in r else None
                parts = (f"{r['aser_quant_us']:6.1f}/{r['aser_gemm_us']:7.1f}" if "aser_quant_us" in r
                         else f"{'-':>14s}")
                err = r.get(f"{fastest_aser}_rel_err_vs_unquantized_act")
                print(f"{model:15s} {layer:8s} {n:6d} {k:6d} {m:5d} | {r['fp16_us']:8.1f} "
                      + " ".join(ratio(meth) for meth in shown) + "          | "
                      + (f"{extra:+9.1f}%" if extra is not None else f"{'-':>10s}") + f" | {parts} | "
                      + (f"{err:.4f}" if err is not None else "-"), flush=True)
    flat = summarize(rows, peaks, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"device": name, "torch": torch.__version__, "triton": __import__("triton").__version__,
               "timing": "eager launches" if args.eager else "CUDA graph replays", "peaks": peaks, "rank": RANK,
               "gemm_configs": tk.tuned_configs(), "compiled": compiled_report() if device == "cuda" else [],
               "results": flat}
    seen = set()
    for c in payload["compiled"]:
        line = (f"{c['kernel'][1:12]} {'x'.join(v for k, v in c['constexprs'].items() if k.startswith('BLOCK_'))} "
                f"w{c['num_warps']} s{c['num_stages']}: regs {c['n_regs']} spills {c['n_spills']} "
                f"smem {c['shared_bytes']} wgmma {c['wgmma']} mma.sync {c['mma_sync']}")
        if line not in seen:
            seen.add(line)
            print(line)
    json_path = args.out / "gpu_kernels.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    with (args.out / "gpu_kernels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    try:
        print(f"wrote {json_path}, {plot(json_path)}")
    except ImportError:
        print(f"wrote {json_path} (no matplotlib here: `python benchmarks/gpu_kernels.py --plot {json_path}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

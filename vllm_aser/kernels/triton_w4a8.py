"""CUDA path of the ASER linear: two Triton kernels (no vLLM import, so the GPU benchmark runs on a bare machine).

1. `smooth_quant_lowrank`: per block of tokens, x / smooth -> per-token absmax -> int8 codes and scales, and the
   low-rank down-projection t = (x / smooth) down^T (tensor cores, fp32 accumulation). x is read twice (absmax
   pass, then the rounding pass), the second time mostly from L2.
2. `w4a8_gemm`: int8 activations times int4 weights packed 8 per int32 along K ([K/8, N], unpacked in registers),
   int32 accumulation, and an epilogue that applies per-token x per-channel (or per-group) scales, adds t up^T and
   the bias, and writes fp16/bf16. Autotuned per (M bucket, N, K): small-M tiles for decode, large for prefill.

Under TRITON_INTERPRET=1 both run on CPU tensors (fixed tile sizes, no autotuning): the tests use that. The
interpreter's bf16 tl.dot is wrong, so interpreted runs do the low-rank dots in float32 (DOT_F32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PACK = 8  # int4 values per int32


@triton.jit
def _smooth_quant_lowrank_kernel(
    x_ptr, inv_smooth_ptr, down_ptr, xq_ptr, xs_ptr, t_ptr,
    M, K, R,
    stride_xm, stride_dr, stride_qm, stride_tm,
    QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_smooth_ptr + rk, mask=rk < K, other=0.0)[None, :]
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        if HAS_LOWRANK:
            d = tl.load(down_ptr + rr[None, :] * stride_dr + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K),
                        other=0.0)
            if DOT_F32:
                t += tl.dot(x, d.to(tl.float32))
            else:
                t += tl.dot(x.to(d.dtype), d)
    scale = tl.maximum(amax, 1e-10) / QMAX
    tl.store(xs_ptr + rm, scale, mask=rm < M)
    if HAS_LOWRANK:
        tl.store(t_ptr + rm[:, None] * stride_tm + rr[None, :], t, mask=(rm[:, None] < M) & (rr[None, :] < R))
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_smooth_ptr + rk, mask=rk < K, other=0.0)[None, :]
        v = x / scale[:, None]
        v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))  # round half away from zero
        q = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(xq_ptr + rm[:, None] * stride_qm + rk[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _w4a8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, w_scale_ptr, t_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_bk, stride_wg, stride_tm, stride_ur, stride_cm,
    GROUP_SIZE: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row-tiles share their weight column-tiles in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rp = tl.arange(0, BLOCK_K // 8)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0)
        pk = k0 // 8 + rp
        packed = tl.load(b_ptr + pk[:, None] * stride_bk + rn[None, :], mask=(pk[:, None] * 8 < K) & (rn[None, :] < N),
                         other=0)
        nibbles = (packed[:, None, :] >> shifts) & 0xF  # [BLOCK_K/8, 8, BLOCK_N]: k = 8 * row + nibble
        w = (tl.reshape(nibbles, [BLOCK_K, BLOCK_N]) - 8).to(tl.int8)
        part = tl.dot(a, w, out_dtype=tl.int32)
        if GROUP_SIZE == 0:
            acc_i += part
        else:  # BLOCK_K divides GROUP_SIZE: this K-block lies in one group
            ws = tl.load(w_scale_ptr + (k0 // GROUP_SIZE) * stride_wg + rn, mask=rn < N, other=0.0)
            acc_f += part.to(tl.float32) * ws[None, :]
    a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
    if GROUP_SIZE == 0:
        ws = tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
        out = acc_i.to(tl.float32) * a_scale[:, None] * ws[None, :]
    else:
        out = acc_f * a_scale[:, None]
    if HAS_LOWRANK:
        rr = tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                    other=0.0)
        up = tl.load(up_ptr + rr[:, None] * stride_ur + rn[None, :], mask=(rr[:, None] < R) & (rn[None, :] < N),
                     other=0.0)
        if DOT_F32:
            out += tl.dot(t, up.to(tl.float32))
        else:
            out += tl.dot(t.to(up.dtype), up)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _gemm_configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in [
        (16, 64, 16, 4, 4), (16, 64, 32, 4, 4), (64, 128, 32, 4, 4),  # small weight groups
        (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),  # decode
        (32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4),  # mid
        (64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),  # prefill
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=warps, num_stages=stages))
    return configs


def _prune(configs, named_args, **kwargs):
    """Tiles must not straddle weight groups, and tiny M never needs big M tiles."""
    group, m_bucket = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 0)), named_args["M_BUCKET"]
    fitting = [c for c in configs if group == 0 or group % c.kwargs["BLOCK_K"] == 0]
    return [c for c in fitting if c.kwargs["BLOCK_M"] <= max(16, m_bucket)] or fitting


_w4a8_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_LOWRANK"],
    prune_configs_by={"early_config_prune": _prune},
)(_w4a8_gemm_kernel)


@dataclass
class PackedW4:
    """Weights in the layout the CUDA GEMM reads: int4 packed along K, K-major ([ceil(K/8), N] int32)."""

    packed: torch.Tensor  # int32 [ceil(K/8), N]
    scale: torch.Tensor  # float32 [n_groups, N] (n_groups = 1 per channel)
    group_size: int  # 0 = per output channel
    in_features: int
    out_features: int


def pack_int4_kn(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> PackedW4:
    """q int8 [N, K] in [-8, 7], scale [N, n_groups] (the artifact's layout) -> PackedW4."""
    n, k = q.shape
    if group_size not in (-1, 0) and group_size % 16:
        raise ValueError(f"the CUDA kernel needs a group size that is a multiple of 16, got {group_size}")
    pad = (-k) % PACK
    nibbles = (torch.nn.functional.pad(q.to(torch.int32), (0, pad)) + 8).reshape(n, -1, PACK)
    shifts = torch.arange(PACK, dtype=torch.int32, device=q.device) * 4
    packed = (nibbles << shifts).sum(dim=2, dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return PackedW4(packed.t().contiguous(), scale.float().t().contiguous(), max(group_size, 0), k, n)


def _pow2(v: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(v))


def smooth_quant_lowrank(
    x: torch.Tensor, inv_smooth: torch.Tensor | None, down: torch.Tensor | None, act_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] -> (int8 codes [M, K], per-token scales float32 [M], t = (x / s) down^T float32 [M, R] or None)."""
    m, k = x.shape
    x = x.contiguous()
    r = 0 if down is None else down.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    t = torch.empty((m, r), dtype=torch.float32, device=x.device) if r else None
    block_m = 16
    block_k = 64 if INTERPRET else 128
    grid = (triton.cdiv(m, block_m),)
    _smooth_quant_lowrank_kernel[grid](
        x, inv_smooth if inv_smooth is not None else x, down if r else x, xq, xs, t if r else xs,
        m, k, r,
        x.stride(0), down.stride(0) if r else 0, xq.stride(0), t.stride(0) if r else 0,
        QMAX=2 ** (act_bits - 1) - 1, HAS_SMOOTH=inv_smooth is not None, HAS_LOWRANK=bool(r), DOT_F32=INTERPRET,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_pow2(r),
    )
    return xq, xs, t


def w4a8_gemm(
    xq: torch.Tensor, xs: torch.Tensor, weight: PackedW4, t: torch.Tensor | None = None,
    up_t: torch.Tensor | None = None, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """int8 [M, K] x PackedW4 -> out_dtype [M, N]; adds t [M, R] @ up_t [R, N] and bias when given."""
    m, k = xq.shape
    if k != weight.in_features:
        raise ValueError(f"activation has {k} features, weight expects {weight.in_features}")
    n = weight.out_features
    r = 0 if t is None else t.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    args = (
        xq, weight.packed, xs, weight.scale, t if r else xs, up_t if r else xs, bias if bias is not None else xs, c,
        m, n, k, r, min(triton.next_power_of_2(max(m, 1)), 4096),
        xq.stride(0), weight.packed.stride(0), weight.scale.stride(0), t.stride(0) if r else 0,
        up_t.stride(0) if r else 0, c.stride(0),
    )
    flags = dict(GROUP_SIZE=weight.group_size, HAS_LOWRANK=bool(r), HAS_BIAS=bias is not None, DOT_F32=INTERPRET,
                 BLOCK_R=_pow2(r))
    if INTERPRET:
        block_k = 32 if weight.group_size % 32 == 0 else 16
        _w4a8_gemm_kernel[(triton.cdiv(m, 16) * triton.cdiv(n, 32),)](
            *args, **flags, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=4)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4a8_gemm_tuned[grid](*args, **flags)
    return c


def aser_linear_triton(
    x: torch.Tensor, weight: PackedW4, inv_smooth: torch.Tensor | None, down: torch.Tensor | None,
    up_t: torch.Tensor | None, bias: torch.Tensor | None, act_bits: int = 8,
) -> torch.Tensor:
    """The whole ASER linear on [..., K] activations with the two kernels."""
    shape = x.shape
    xq, xs, t = smooth_quant_lowrank(x.reshape(-1, shape[-1]), inv_smooth, down, act_bits)
    out = w4a8_gemm(xq, xs, weight, t, up_t, bias, x.dtype)
    return out.reshape(*shape[:-1], weight.out_features)

"""CUDA path of the ASER linear: two Triton kernels (no vLLM import, so the GPU benchmark runs on a bare machine).

1. `smooth_quant_lowrank`: per block of tokens, x / smooth -> per-token absmax -> int8 codes and scales, and the
   low-rank down-projection t = (x / smooth) down^T (tensor cores, fp32 accumulation). x is read twice (absmax
   pass, then the rounding pass), the second time mostly from L2.
2. `w4a8_gemm`: int8 activations times int4 weights, two per byte along K ([K/2, N], unpacked in registers with one
   32-bit AND and one shift-and-AND per 8 codes, each nibble landing in the top of its byte as 16 q so that no
   sign extension is needed; the 1/16 is folded into the scales), int32 accumulation, and an epilogue that applies per-token x per-channel (or per-group) scales, adds t up^T and
   the bias, and writes fp16/bf16. Autotuned per (M bucket, N, K): small-M tiles for decode, large for prefill.

Under TRITON_INTERPRET=1 both run on CPU tensors (fixed tile sizes, no autotuning): the tests use that. The
interpreter's bf16 tl.dot is wrong, so interpreted runs do the low-rank dots in float32 (DOT_F32).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
UNIT = 64  # K values per packing unit: 32 bytes, low nibbles then high nibbles


@triton.jit
def _smooth_quant_lowrank_kernel(
    x_ptr, inv_smooth_ptr, down_ptr, xq_ptr, xs_ptr, t_ptr,
    M, K, R, CHUNK,
    stride_xm, stride_dr, stride_qm, stride_ts, stride_tm,
    QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LOWRANK: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # program (i, s): rows i*BLOCK_M.., K columns [s*CHUNK, (s+1)*CHUNK). Every program of a row block finds the
    # rows' absmax over all of K (x is small and L2-resident at the sizes where the split is > 1), then rounds its
    # own chunk and writes its partial t; the GEMM epilogue sums the partials.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_KA):  # wide tiles: few dependent iterations
        rk = k0 + tl.arange(0, BLOCK_KA)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_smooth_ptr + rk, mask=rk < K, other=0.0)[None, :]
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.maximum(amax, 1e-10) / QMAX
    if split == 0:
        tl.store(xs_ptr + rm, scale, mask=rm < M)
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_end = tl.minimum(K, (split + 1) * CHUNK)
    for k0 in range(split * CHUNK, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rm[:, None] < M) & (rk[None, :] < k_end)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_smooth_ptr + rk, mask=rk < K, other=0.0)[None, :]
        if HAS_LOWRANK:
            d = tl.load(down_ptr + rr[None, :] * stride_dr + rk[:, None],
                        mask=(rr[None, :] < R) & (rk[:, None] < k_end), other=0.0)
            if DOT_F32:
                t += tl.dot(x, d.to(tl.float32))
            else:
                t += tl.dot(x.to(d.dtype), d)
        v = x / scale[:, None]
        v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))  # round half away from zero
        q = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(xq_ptr + rm[:, None] * stride_qm + rk[None, :], q.to(tl.int8), mask=mask)
    if HAS_LOWRANK:
        tl.store(t_ptr + split * stride_ts + rm[:, None] * stride_tm + rr[None, :], t,
                 mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _low_nibbles_x16(b, USE_ASM: tl.constexpr):
    """Bytes of two 4-bit two's-complement codes -> 16 x the low code as int8 (the nibble moved to the top of
    its byte, so the sign comes for free): a shift and an AND per four bytes."""
    if USE_ASM:
        return tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r",
                                         [b], dtype=tl.int8, is_pure=True, pack=4)
    return ((b << 4) & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)


@triton.jit
def _high_nibbles_x16(b, USE_ASM: tl.constexpr):
    """Bytes of two 4-bit two's-complement codes -> 16 x the high code as int8: one AND per four bytes."""
    if USE_ASM:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [b], dtype=tl.int8, is_pure=True,
                                         pack=4)
    return (b & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)


@triton.jit
def _lowrank_up(t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_ur,
                DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """(sum over s of t[s, rm, :]) @ up_t[:, rn] in float32: the low-rank up-projection of a tile, from the partial
    down-projections of the K chunks (shared by the GEMM's epilogue and the in-place add after Marlin)."""
    rr = tl.arange(0, BLOCK_R)
    t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for s in range(0, T_SPLITS):
        t += tl.load(t_ptr + s * stride_ts + rm[:, None] * stride_tm + rr[None, :],
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    up = tl.load(up_ptr + rr[:, None] * stride_ur + rn[None, :], mask=(rr[:, None] < R) & (rn[None, :] < N),
                 other=0.0)
    if DOT_F32:
        product = tl.dot(t, up.to(tl.float32))
    else:
        product = tl.dot(t.to(up.dtype), up)
    return product


@triton.jit
def _w4a8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, w_scale_ptr, t_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, K, R, T_SPLITS, M_BUCKET,
    stride_am, stride_bk, stride_wg, stride_ts, stride_tm, stride_ur, stride_cm,
    GROUP_SIZE: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    USE_ASM: tl.constexpr,
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
    # byte row r of a K tile holds k = 64 * (r // 32) + r % 32 (low nibble) and that + 32 (high nibble)
    rp = tl.arange(0, BLOCK_K // 2)
    k_lo = (rp // 32) * 64 + rp % 32
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kl = tl.max_contiguous(tl.multiple_of(k0 + k_lo, 32), 32)
        kh = tl.max_contiguous(tl.multiple_of(kl + 32, 32), 32)
        a_lo = tl.load(a_ptr + rm[:, None] * stride_am + kl[None, :], mask=(rm[:, None] < M) & (kl[None, :] < K),
                       other=0)
        a_hi = tl.load(a_ptr + rm[:, None] * stride_am + kh[None, :], mask=(rm[:, None] < M) & (kh[None, :] < K),
                       other=0)
        pk = k0 // 2 + rp
        b = tl.load(b_ptr + pk[:, None] * stride_bk + rn[None, :],
                    mask=(pk[:, None] < tl.cdiv(K, 64) * 32) & (rn[None, :] < N), other=0)
        w_lo = _low_nibbles_x16(b, USE_ASM)  # 16 q: |a| <= 127, |16 q| <= 128, so int32 holds K up to ~130k
        w_hi = _high_nibbles_x16(b, USE_ASM)
        if GROUP_SIZE == 0:
            acc_i = tl.dot(a_lo, w_lo, acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(a_hi, w_hi, acc_i, out_dtype=tl.int32)
        else:  # BLOCK_K divides GROUP_SIZE: this K-block lies in one group
            part = tl.dot(a_lo, w_lo, out_dtype=tl.int32)
            part = tl.dot(a_hi, w_hi, part, out_dtype=tl.int32)
            ws = tl.load(w_scale_ptr + (k0 // GROUP_SIZE) * stride_wg + rn, mask=rn < N, other=0.0)
            acc_f += part.to(tl.float32) * ws[None, :]
    a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0) * 0.0625  # the codes came in as 16 q
    if GROUP_SIZE == 0:
        ws = tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
        out = acc_i.to(tl.float32) * a_scale[:, None] * ws[None, :]
    else:
        out = acc_f * a_scale[:, None]
    if HAS_LOWRANK:
        out += _lowrank_up(t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_ur, DOT_F32,
                           BLOCK_M, BLOCK_R)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _lowrank_up_add_kernel(
    out_ptr, t_ptr, up_ptr, bias_ptr,
    M, N, R, T_SPLITS,
    stride_om, stride_ts, stride_tm, stride_ur,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out[m, n] += (sum over s of t[s, m, :]) @ up_t[:, n] (+ bias[n]), in place: the low-rank branch after a
    # GEMM that cannot take it in its epilogue (Marlin)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _lowrank_up(t_ptr, up_ptr, rm, rn, M, N, R, T_SPLITS, stride_ts, stride_tm, stride_ur, DOT_F32, BLOCK_M,
                      BLOCK_R)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    out = tl.load(out_ptr + rm[:, None] * stride_om + rn[None, :], mask=mask, other=0.0).to(tl.float32) + acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in [
        (16, 64, 64, 4, 4), (64, 128, 64, 4, 4),  # weight groups of 64 (K tiles hold whole 64-wide byte units)
        (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),  # decode
        (16, 32, 256, 4, 4), (16, 32, 512, 4, 3), (16, 64, 512, 4, 3), (16, 128, 256, 4, 3),  # decode, deep
        (32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3),  # mid
        (64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3),  # prefill
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


def tuned_configs() -> dict[str, str]:
    """The GEMM tile chosen per autotuning key so far (for benchmark reports)."""
    cache = getattr(_w4a8_gemm_tuned, "cache", {})
    return {str(key): str(config) for key, config in cache.items()}


@dataclass
class PackedW4:
    """Weights in the layout the CUDA GEMM reads: two int4 codes per byte, K-major ([K_pad / 2, N] uint8).

    Byte row 32 u + j holds q[64 u + j] in its low nibble and q[64 u + 32 + j] in its high nibble (4-bit two's
    complement), so that a K tile splits into two contiguous 32-wide halves, each unpacked to 16 q with one or two
    32-bit operations per 4 codes.
    """

    packed: torch.Tensor  # uint8 [ceil(K / 64) * 32, N]
    scale: torch.Tensor  # float32 [n_groups, N] (n_groups = 1 per channel)
    group_size: int  # 0 = per output channel
    in_features: int
    out_features: int


def pack_int4_kn(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> PackedW4:
    """q int8 [N, K] in [-8, 7], scale [N, n_groups] (the artifact's layout) -> PackedW4."""
    n, k = q.shape
    if group_size not in (-1, 0) and group_size % UNIT:
        raise ValueError(f"the CUDA kernel needs a group size that is a multiple of {UNIT}, got {group_size}")
    codes = torch.nn.functional.pad(q.to(torch.int16) & 0xF, (0, (-k) % UNIT))  # padding decodes to 0
    units = codes.reshape(n, -1, 2, UNIT // 2)  # [N, K/64, half, 32]
    packed = (units[:, :, 0] | (units[:, :, 1] << 4)).to(torch.uint8).reshape(n, -1)  # [N, K_pad / 2]
    return PackedW4(packed.t().contiguous(), scale.float().t().contiguous(), max(group_size, 0), k, n)


def _pow2(v: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(v))


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Enough programs to occupy every SM twice (a fixed small number under the interpreter)."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def smooth_quant_lowrank(
    x: torch.Tensor, inv_smooth: torch.Tensor | None, down: torch.Tensor | None, act_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] -> (int8 codes [M, K], per-token scales float32 [M], partial t float32 [S, M, R] or None).

    t = (x / s) down^T, summed over its S K-chunks by the GEMM: at decode sizes a single program per 16 tokens
    would read the whole [R, K] factor alone, so K is split until the grid fills the GPU.
    """
    m, k = x.shape
    x = x.contiguous()
    r = 0 if down is None else down.shape[0]
    block_m = 16
    block_k = 64 if INTERPRET else 128
    m_blocks, k_blocks = triton.cdiv(m, block_m), triton.cdiv(k, block_k)
    splits = min(k_blocks, triton.cdiv(_programs_wanted(x.device), max(m_blocks, 1)))
    chunk = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(k, chunk)
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    t = torch.empty((splits, m, r), dtype=torch.float32, device=x.device) if r else None
    _smooth_quant_lowrank_kernel[(m_blocks, splits)](
        x, inv_smooth if inv_smooth is not None else x, down if r else x, xq, xs, t if r else xs,
        m, k, r, chunk,
        x.stride(0), down.stride(0) if r else 0, xq.stride(0), t.stride(0) if r else 0, t.stride(1) if r else 0,
        QMAX=2 ** (act_bits - 1) - 1, HAS_SMOOTH=inv_smooth is not None, HAS_LOWRANK=bool(r), DOT_F32=INTERPRET,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_KA=64 if INTERPRET else min(1024, _pow2(k)), BLOCK_R=_pow2(r),
        num_warps=8 if k >= 2048 and not INTERPRET else 4,
    )
    return xq, xs, t


def w4a8_gemm(
    xq: torch.Tensor, xs: torch.Tensor, weight: PackedW4, t: torch.Tensor | None = None,
    up_t: torch.Tensor | None = None, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """int8 [M, K] x PackedW4 -> out_dtype [M, N]; adds (sum over S of t [S, M, R]) @ up_t [R, N] and bias when
    given (t: the partial sums that `smooth_quant_lowrank` writes)."""
    m, k = xq.shape
    if k != weight.in_features:
        raise ValueError(f"activation has {k} features, weight expects {weight.in_features}")
    n = weight.out_features
    r = 0 if t is None else t.shape[2]
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    args = (
        xq, weight.packed, xs, weight.scale, t if r else xs, up_t if r else xs, bias if bias is not None else xs, c,
        m, n, k, r, t.shape[0] if r else 0, min(triton.next_power_of_2(max(m, 1)), 4096),
        xq.stride(0), weight.packed.stride(0), weight.scale.stride(0), t.stride(0) if r else 0, t.stride(1) if r else 0,
        up_t.stride(0) if r else 0, c.stride(0),
    )
    flags = dict(GROUP_SIZE=weight.group_size, HAS_LOWRANK=bool(r), HAS_BIAS=bias is not None, DOT_F32=INTERPRET,
                 USE_ASM=not INTERPRET, BLOCK_R=_pow2(r))
    if INTERPRET:
        _w4a8_gemm_kernel[(triton.cdiv(m, 16) * triton.cdiv(n, 32),)](
            *args, **flags, BLOCK_M=16, BLOCK_N=32, BLOCK_K=UNIT, GROUP_M=4)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4a8_gemm_tuned[grid](*args, **flags)
    return c


def lowrank_up_add_(out: torch.Tensor, t: torch.Tensor | None, up_t: torch.Tensor | None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] += (sum over S of t [S, M, R]) @ up_t [R, N] (+ bias), in place, one launch."""
    m, n = out.shape
    r = 0 if t is None else t.shape[2]
    if not r and bias is None:
        return out
    block_n = 32 if INTERPRET else 128
    _lowrank_up_add_kernel[(triton.cdiv(m, 16), triton.cdiv(n, block_n))](
        out, t if r else out, up_t if r else out, bias if bias is not None else out,
        m, n, r, t.shape[0] if r else 0,
        out.stride(0), t.stride(0) if r else 0, t.stride(1) if r else 0, up_t.stride(0) if r else 0,
        HAS_BIAS=bias is not None, DOT_F32=INTERPRET, BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=_pow2(r),
        num_warps=4,
    )
    return out


def aser_linear_triton(
    x: torch.Tensor, weight: PackedW4, inv_smooth: torch.Tensor | None, down: torch.Tensor | None,
    up_t: torch.Tensor | None, bias: torch.Tensor | None, act_bits: int = 8,
) -> torch.Tensor:
    """The whole ASER linear on [..., K] activations with the two kernels."""
    shape = x.shape
    xq, xs, t = smooth_quant_lowrank(x.reshape(-1, shape[-1]), inv_smooth, down, act_bits)
    out = w4a8_gemm(xq, xs, weight, t, up_t, bias, x.dtype)
    return out.reshape(*shape[:-1], weight.out_features)

"""The native W4A8 CPU kernel (vllm_aser/csrc/w4a8_cpu.cpp): weights stay packed int4, int8 x int4 integer dot
products, ASER's smoothing and low-rank branch fused around the GEMM.

This module knows the kernel's weight layout and its ISA paths; it imports neither vLLM nor the plugin, so the
kernel can be tested and benchmarked on its own.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

BLOCK_N, BLOCK_K = 16, 8  # one packed block: 16 output channels x 8 input channels, 64 bytes
LOWRANK_UNIT = 16  # ranks are padded to a multiple of this (one vector of float32 lanes)
LOWRANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the kernel reads each as stored
ISA_ENV_VAR = "VLLM_ASER_CPU_ISA"  # cap the ISA path (e.g. avx2 on an AVX-512 machine, to test the lower paths)
ISAS = {"avx2": 1, "avx512bw": 2, "avx512_vnni": 3}  # the kernel's enum, lowest first
ISA_DESCRIPTIONS = {
    "avx2": "AVX2 vpmaddubsw/vpmaddwd (int4 x int8 pairs cannot saturate int16)",
    "avx512bw": "AVX-512BW vpmaddubsw/vpmaddwd",
    "avx512_vnni": "AVX-512 VNNI vpdpbusd",
}


@functools.cache
def extension_status() -> tuple[bool, str]:
    """(loaded, why not): the extension is built at install time; never compiled at serve time."""
    try:
        import vllm_aser._w4a8_cpu  # noqa: F401  (registers torch.ops.aser_cpu)
    except ImportError as exc:
        return False, (f"the native kernel vllm_aser._w4a8_cpu is not built ({exc}); reinstall with torch present "
                       "(`pip install --no-build-isolation -e .`, as scripts/setup_cpu_env.sh does)")
    # shapes for torch.compile: vLLM traces the model with fake tensors, the op stays one opaque call
    torch.library.register_fake("aser_cpu::w4a8_linear")(_w4a8_linear_fake)
    if hasattr(torch.ops.aser_cpu, "hadamard"):
        torch.library.register_fake("aser_cpu::hadamard")(lambda x, block: torch.empty_like(x))
    if hasattr(torch.ops.aser_cpu, "w4a8_moe"):
        torch.library.register_fake("aser_cpu::w4a8_moe")(lambda x, *args: torch.empty_like(x))
    return True, ""


def _w4a8_linear_fake(x, w, w_scale, group_size, inv_smooth, down, up, bias, n_out, act_bits, isa, hadamard=0):
    return x.new_empty((x.shape[0], n_out))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_isa() -> tuple[str | None, str]:
    """The ISA path to use on this CPU (the best one, or lower if VLLM_ASER_CPU_ISA asks), and why."""
    loaded, reason = extension_status()
    if not loaded:
        return None, reason
    best = int(torch.ops.aser_cpu.best_isa())
    names = {v: k for k, v in ISAS.items()}
    if best not in names:
        return None, "this CPU has no AVX2/FMA/F16C: the native kernel needs at least AVX2"
    wanted = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not wanted:
        return names[best], f"best path on this CPU ({ISA_DESCRIPTIONS[names[best]]})"
    if wanted not in ISAS:
        raise ValueError(f"{ISA_ENV_VAR}={wanted!r}: choose one of {', '.join(ISAS)}")
    if ISAS[wanted] > best:
        raise ValueError(f"{ISA_ENV_VAR}={wanted}: this CPU supports at most {names[best]}")
    return wanted, f"capped by {ISA_ENV_VAR} ({ISA_DESCRIPTIONS[wanted]})"


@dataclass
class PackedW4A8:
    """A linear's tensors in the kernel's layout (see the comment at the top of w4a8_cpu.cpp)."""

    weight: torch.Tensor  # uint8 [N/16, K/8, 64]
    scale: torch.Tensor  # float32 [N/16, groups, 16]
    group_size: int  # -1: per channel
    down: torch.Tensor | None  # [K, rank] (transposed, rank padded to a multiple of 16), the artifact's dtype
    up: torch.Tensor | None  # [N/16, rank, 16], the same dtype
    bias: torch.Tensor | None  # float32 [N/16 * 16]
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.down, self.up, self.bias)
                   if t is not None)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _blocks_of_channels(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, X] -> [N/16, X, 16] (zero-padded channels): 16 channels contiguous, as one vector of the kernel."""
    t = F.pad(t, (0, 0, 0, n_pad - t.shape[0]))
    return t.reshape(n_pad // BLOCK_N, BLOCK_N, -1).transpose(1, 2).contiguous()


def pack_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int4 codes [N, K] (-8..7) and scales [N, groups] -> the kernel's packed weight and scales."""
    n, k = q.shape
    if q.min() < -8 or q.max() > 7:
        raise ValueError("pack_weight: codes outside the int4 range -8..7")
    n_pad, k_pad = _ceil_to(n, BLOCK_N), _ceil_to(k, BLOCK_K)
    u = F.pad(q.to(torch.int16) + 8, (0, k_pad - k, 0, n_pad - n), value=8).to(torch.uint8)  # offset binary
    u = u.reshape(n_pad // BLOCK_N, BLOCK_N, k_pad // BLOCK_K, 2, 4)  # [nb, n, kb, half, j]: k = 8kb + 4half + j
    byte = u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)  # [nb, n, kb, j]
    weight = byte.permute(0, 2, 1, 3).reshape(n_pad // BLOCK_N, k_pad // BLOCK_K, BLOCK_N * 4).contiguous()
    n_groups = 1 if group_size == -1 else -(-k // group_size)
    if scale.shape != (n, n_groups):
        raise ValueError(f"pack_weight: scale shape {tuple(scale.shape)}, expected {(n, n_groups)}")
    return weight, _blocks_of_channels(scale.float(), n_pad)


def pack(q, scale, group_size, down, up, bias) -> PackedW4A8:
    n = q.shape[0]
    weight, packed_scale = pack_weight(q, scale, group_size)
    n_pad = weight.shape[0] * BLOCK_N
    if down is not None:  # in the artifact's dtype; ranks padded with zero factors; down transposed to [K, rank]
        if down.dtype not in LOWRANK_DTYPES:
            raise ValueError(f"pack: low-rank factors of dtype {down.dtype}; expected one of {LOWRANK_DTYPES}")
        r_pad = _ceil_to(down.shape[0], LOWRANK_UNIT) - down.shape[0]
        down = F.pad(down, (0, 0, 0, r_pad)).t().contiguous()
        up = _blocks_of_channels(F.pad(up.to(down.dtype), (0, r_pad)), n_pad)
    return PackedW4A8(
        weight=weight,
        scale=packed_scale,
        group_size=group_size,
        down=down,
        up=up,
        bias=None if bias is None else F.pad(bias.float(), (0, n_pad - n)).contiguous(),
        out_features=n,
    )


def why_not(q_bits: int, act_bits: int, in_features: int, group_size: int,
            down: torch.Tensor | None, up: torch.Tensor | None) -> str | None:
    """None if the native kernel can run this layer, else the reason (MPLinearKernel.can_implement's pattern)."""
    isa, reason = cpu_isa()
    if isa is None:
        return reason
    if q_bits != 4:
        return f"{q_bits}-bit weights (the native kernel takes int4)"
    if not 2 <= act_bits <= 8:
        return f"{act_bits}-bit activations"
    if group_size != -1 and group_size % BLOCK_K:
        return f"group size {group_size} is not a multiple of {BLOCK_K}"
    if down is not None and (down.dtype not in LOWRANK_DTYPES or up is None or up.dtype != down.dtype):
        return f"low-rank factors of dtype {down.dtype} / {None if up is None else up.dtype}"
    return None


def w4a8_linear(x: torch.Tensor, packed: PackedW4A8, inv_smooth: torch.Tensor | None, act_bits: int,
                isa: str | None = None) -> torch.Tensor:
    """y = Q_a(x * inv_smooth) @ W^T + ((x * inv_smooth) @ down^T) @ up^T + bias, in x's dtype."""
    isa = isa or cpu_isa()[0]
    shape = x.shape
    out = torch.ops.aser_cpu.w4a8_linear(
        x.reshape(-1, shape[-1]).contiguous(), packed.weight, packed.scale, packed.group_size, inv_smooth,
        packed.down, packed.up, packed.bias, packed.out_features, act_bits, ISAS[isa],
    )
    return out.reshape(*shape[:-1], packed.out_features)


MOE_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # the kernel's enum


def stack_packed(packs: list[PackedW4A8]) -> PackedW4A8:
    """Experts' packed linears (same shapes) as one with a leading expert dimension, for `w4a8_moe`. Ranks differ
    per expert: the low-rank factors are zero-padded to the largest (zero factors add nothing)."""
    first = packs[0]
    if any(p.weight.shape != first.weight.shape or p.group_size != first.group_size or p.bias is not None
           for p in packs):
        raise ValueError("stack_packed: experts must share shapes and group size and have no bias")
    rank = max((0 if p.down is None else p.down.shape[1]) for p in packs)
    down = up = None
    if rank:
        k, dtype = next((p.down.shape[0], p.down.dtype) for p in packs if p.down is not None)
        down = torch.zeros(len(packs), k, rank, dtype=dtype)
        up = torch.zeros(len(packs), first.weight.shape[0], rank, BLOCK_N, dtype=dtype)
        for e, p in enumerate(packs):
            if p.down is not None:
                down[e, :, :p.down.shape[1]] = p.down
                up[e, :, :p.up.shape[1]] = p.up
    return PackedW4A8(weight=torch.stack([p.weight for p in packs]), scale=torch.stack([p.scale for p in packs]),
                      group_size=first.group_size, down=down, up=up, bias=None, out_features=first.out_features)


def w4a8_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: PackedW4A8,
             w13_inv_smooth: torch.Tensor | None, w2: PackedW4A8, w2_inv_smooth: torch.Tensor | None,
             act_bits: int, activation: str, isa: str | None = None) -> torch.Tensor:
    """A MoE layer's routed experts: sum_k weight_k * w2_e(act(gate_e(x)) * up_e(x)), e = topk_ids[:, k], each
    linear a W4A8 one as `w4a8_linear` (stacked by `stack_packed`; inv_smooth [E, K] or None)."""
    isa = isa or cpu_isa()[0]
    return torch.ops.aser_cpu.w4a8_moe(
        x, topk_ids, topk_weights, w13.weight, w13.scale, w13_inv_smooth, w13.down, w13.up, w2.weight, w2.scale,
        w2_inv_smooth, w2.down, w2.up, w13.group_size, w2.group_size, w13.out_features // 2, act_bits, ISAS[isa],
        MOE_ACTIVATIONS[activation],
    )


@dataclass
class NativeExperts:
    """A MoE layer's experts stacked for `w4a8_moe`: one native call per layer and step."""

    w13: PackedW4A8
    w13_inv_smooth: torch.Tensor | None  # [E, K] float32
    w2: PackedW4A8
    w2_inv_smooth: torch.Tensor | None
    act_bits: int
    isa: str

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 activation: str) -> torch.Tensor:
        return w4a8_moe(x, topk_ids, topk_weights, self.w13, self.w13_inv_smooth, self.w2, self.w2_inv_smooth,
                        self.act_bits, activation, self.isa)


def stack_inv_smooth(values: list[torch.Tensor | None], k: int) -> torch.Tensor | None:
    """Per-expert inverse smoothing (None: identity) as [E, K], or None when every expert's is the identity."""
    if all(v is None for v in values):
        return None
    return torch.stack([torch.ones(k) if v is None else v.float() for v in values]).contiguous()

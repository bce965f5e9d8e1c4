"""Plain-torch stand-ins for vLLM's CUDA-only Marlin ops, so that the plugin's Marlin glue runs on CPU.

`gptq_marlin_repack` keeps the GPTQ layout it is given (the real one re-tiles it: vLLM's business, exercised on a
GPU); `marlin_gemm` computes what Marlin's int8-activation kernel computes from that layout and from the scales as
vLLM's MarlinLinearKernel leaves them (permuted; with groups, int16 integers relative to the layer's largest scale
and a global factor folded into the activation scales). Everything ASER passes through is therefore checked: the
uint4b8 packing, the scale layout, the int8 codes and scales, the bias and the call's arguments.
"""

from __future__ import annotations

import functools

import torch

from vllm_aser.kernels import marlin_w4a8


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 codes and float32 scales [M] in plain torch (no vLLM op: runs with any build)."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-10) / 127
    return torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def unpack_uint4b8(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ [K / 8, N] int32 -> signed codes [K, N]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(1) >> shifts[None, :, None]) & 0xF  # [K / 8, 8, N]
    return nibbles.reshape(-1, packed.shape[1]) - 8


def _unpermute(permuted: torch.Tensor, permute) -> torch.Tensor:
    index = permute(torch.arange(permuted.numel(), dtype=torch.float64).reshape(permuted.shape)).long()
    out = torch.empty_like(permuted)
    out.reshape(-1)[index.reshape(-1)] = permuted.reshape(-1)
    return out


def unpermute_scales(scales: torch.Tensor, size_k: int, size_n: int, group_size: int) -> torch.Tensor:
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_permute_scales

    return _unpermute(scales, lambda s: marlin_permute_scales(s, size_k, size_n, group_size, is_a_8bit=True))


def unpermute_bias(bias: torch.Tensor) -> torch.Tensor:
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_permute_bias

    return _unpermute(bias, marlin_permute_bias)


def fake_repack(b_q_weight, *args, **kwargs):
    return b_q_weight.clone()


def _emulate(a, b_q_weight, b_bias, b_scales, a_scales, size_n, size_k):
    assert a.dtype == torch.int8 and a.shape[1] == size_k
    assert a_scales.dtype == torch.float32 and a_scales.shape == (a.shape[0], 1)
    codes = unpack_uint4b8(b_q_weight).float()  # [K, N]
    groups = b_scales.shape[0]
    group_size = -1 if groups == 1 else size_k // groups
    if groups > 1:  # vLLM's int8 path: int16 integers viewed as the activation dtype
        scales = b_scales.view(torch.int16).float()
    else:
        scales = b_scales.float()
    scales = unpermute_scales(scales, size_k, size_n, group_size)  # [groups, N]
    weight = codes * scales.repeat_interleave(size_k // groups, dim=0)
    out = (a.float() @ weight) * a_scales
    if b_bias is not None:
        out = out + unpermute_bias(b_bias.float())
    return out.to(b_scales.dtype)  # int16 group scales are viewed as the activation dtype: still the output's


def marlin_gemm_v032(a, c, b_q_weight, b_bias, b_scales, a_scales, global_scale, b_zeros, workspace, b_q_type,
                     size_m, size_n, size_k, use_atomic_add=False, use_fp32_reduce=False, is_zp_float=False):
    assert c is None and global_scale is None and b_zeros.numel() == 0 and size_m == a.shape[0]
    return _emulate(a, b_q_weight, b_bias, b_scales, a_scales, size_n, size_k)


CALLS_V026: list[dict] = []


def marlin_gemm_v026(a, c, b_q_weight, b_bias, b_scales, a_scales, global_scale, b_zeros, g_idx, perm, workspace,
                     b_q_type, size_m, size_n, size_k, is_k_full=True, use_atomic_add=False, use_fp32_reduce=False,
                     is_zp_float=False):
    CALLS_V026.append(dict(g_idx=g_idx, perm=perm, is_k_full=is_k_full))
    return _emulate(a, b_q_weight, b_bias, b_scales, a_scales, size_n, size_k)


def install(monkeypatch, gemm=marlin_gemm_v032) -> None:
    """Marlin looks available (capability 9.0, ops present) and runs on the fakes."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import marlin_utils

    monkeypatch.setattr(ops, "gptq_marlin_repack", fake_repack, raising=False)
    monkeypatch.setattr(ops, "marlin_gemm", gemm, raising=False)
    monkeypatch.setattr(marlin_utils, "marlin_make_workspace_new",
                        lambda device, max_blocks_per_sm=1: torch.zeros(8 * max_blocks_per_sm, dtype=torch.int32))
    monkeypatch.setattr(marlin_w4a8, "cuda_capability", lambda device: 90)
    monkeypatch.setattr(marlin_w4a8, "have_marlin_ops", lambda: True)
    marlin_w4a8._marlin_api.cache_clear()  # resolved again against the fakes (and after the test, the real ops)
    monkeypatch.setattr(marlin_w4a8, "_marlin_api", functools.cache(marlin_w4a8._marlin_api.__wrapped__))


def install_vllm_benchmark_ops(monkeypatch) -> None:
    """`install`, plus torch stand-ins for the other CUDA-only vLLM ops benchmarks/gpu_kernels.py times."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import int8_utils

    install(monkeypatch)

    def scaled_int8_quant(x, scale=None, azp=None, symmetric=True):
        xq, xs = int8_per_token(x)
        return xq, xs.reshape(-1, 1), None

    def cutlass_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias=None):
        return ((a.float() @ b.float()) * scale_a * scale_b.reshape(1, -1)).to(out_dtype)

    monkeypatch.setattr(ops, "scaled_int8_quant", scaled_int8_quant)
    monkeypatch.setattr(ops, "cutlass_scaled_mm", cutlass_scaled_mm)
    monkeypatch.setattr(int8_utils, "per_token_quant_int8",
                        lambda x: tuple(t.reshape(x.shape[0], -1) for t in scaled_int8_quant(x)[:2]))

"""The `cpu` kernel (AMX or oneDNN int8 GEMM + low-rank branch) against the plain-torch reference, odd shapes."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp(min=1e-30)))


def make_layer(kernel, q, scale, inv_smooth, down, up, group, dtype, act_bits):
    layer = torch.nn.Module()
    layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = dtype, q.shape[0], act_bits
    kernel.prepare(layer, q, scale, inv_smooth, down, up, group)
    return layer


AMX_SHAPES = [(64, 96, -1), (32, 160, 32)]  # K % 32 == 0 and N % 32 == 0: the AMX int8 GEMM where the CPU has it


@pytest.mark.parametrize("m", [1, 7, 33, 70])
@pytest.mark.parametrize("n,k,group", [(37, 72, -1), (50, 136, 64), (24, 40, -1), *AMX_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,smooth,act_bits", [(8, True, 8), (0, False, 8), (16, True, 6)])
def test_cpu_kernel_matches_reference(m, n, k, group, dtype, rank, smooth, act_bits):
    from vllm_aser.kernels.select import CPUKernel, ReferenceKernel

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    n_groups = 1 if group == -1 else -(-k // group)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.001
    inv_smooth = torch.rand(k, generator=g) + 0.5 if smooth else torch.ones(k)
    down = torch.randn(rank, k, generator=g) * 0.1 if rank else None
    up = torch.randn(n, rank, generator=g) * 0.1 if rank else None
    bias = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, 3] = 40.0  # an outlier token channel

    ref_kernel, cpu_kernel = ReferenceKernel(), CPUKernel()
    ref = ref_kernel.apply(make_layer(ref_kernel, q, scale, inv_smooth, down, up, group, dtype, act_bits), x, bias)
    out = cpu_kernel.apply(make_layer(cpu_kernel, q, scale, inv_smooth, down, up, group, dtype, act_bits), x, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    # float32 per-channel: the same integers and scales, so only summation order differs, except where x / s_x
    # lands within float rounding of a .5 boundary (one int8 step on one element; seen once at M = 70): > 60 dB.
    # bf16: x / s is rounded to bf16 before the int8 quantizer, which moves some elements across a rounding
    # boundary (one int8 step), plus bf16 output rounding (> 30 dB). Group scales are requantized to per-channel
    # int8: up to half an int8 step per weight (> 35 dB in float32).
    if dtype == torch.bfloat16:
        floor = 30
    else:
        floor = 60 if group == -1 else 35
    assert sqnr_db(ref.float(), out.float()) > floor


@pytest.mark.parametrize("n,k", [(64, 96), (48, 96), (37, 72)])
def test_amx_path_taken_where_vllm_allows_it(n, k, monkeypatch):
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    from vllm_aser.kernels.select import NO_AMX_ENV_VAR, CPUKernel

    q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
    args = (q, torch.full((n, 1), 0.01), torch.ones(k), None, None, -1, torch.bfloat16, 8)
    assert make_layer(CPUKernel(), *args).aser_amx == (n % 32 == 0 and check_cpu_sgl_kernel(n, k, torch.int8))
    monkeypatch.setenv(NO_AMX_ENV_VAR, "1")
    assert not make_layer(CPUKernel(), *args).aser_amx
    assert not make_layer(CPUKernel(), *args[:-2], torch.float32, 8).aser_amx


def test_3d_input_keeps_leading_dims():
    from vllm_aser.kernels.select import CPUKernel

    kernel = CPUKernel()
    q = torch.randint(-7, 8, (16, 24), dtype=torch.int8)
    layer = make_layer(kernel, q, torch.full((16, 1), 0.01), torch.ones(24), None, None, -1, torch.float32, 8)
    assert kernel.apply(layer, torch.randn(2, 5, 24), None).shape == (2, 5, 16)

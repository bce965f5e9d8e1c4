"""The `cpu` kernel against the plain-torch reference on odd shapes: the native W4A8 kernel on every ISA path this
CPU can run (AVX2, AVX-512BW, AVX-512 VNNI; VLLM_ASER_CPU_ISA caps the path), and the int8 fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_aser.kernels import cpu_w4a8

pytestmark = pytest.mark.vllm


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp(min=1e-30)))


def make_layer(kernel, q, scale, inv_smooth, down, up, group, dtype, act_bits, bias=None):
    layer = torch.nn.Module()
    layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = dtype, q.shape[0], act_bits
    layer.aser_weight_bits = 4
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    kernel.prepare(layer, q, scale, inv_smooth, down, up, group)
    return layer


def _reachable_isas() -> list[str]:
    best = cpu_w4a8.ISAS.get(cpu_w4a8.cpu_isa()[0] or "", 0) if cpu_w4a8.extension_status()[0] else 0
    return [name for name, level in cpu_w4a8.ISAS.items() if level <= best]


# Every native path goes in the list, whether or not this CPU runs it: an unreachable one skips with the reason
# (CI covers the paths of the CPU it lands on; the lower paths always run on a better CPU).
PATHS = [*cpu_w4a8.ISAS, "fallback"]


@pytest.fixture
def path(request, monkeypatch):
    from vllm_aser.kernels.select import NO_NATIVE_ENV_VAR

    name = request.param
    if name == "fallback":
        monkeypatch.setenv(NO_NATIVE_ENV_VAR, "1")
    else:
        assert cpu_w4a8.extension_status()[0], cpu_w4a8.extension_status()[1]  # the set-up builds it: never skip
        if name not in _reachable_isas():
            pytest.skip(f"this CPU has no {name} (best path: {cpu_w4a8.cpu_isa()[0]})")
        monkeypatch.setenv(cpu_w4a8.ISA_ENV_VAR, name)
    cpu_w4a8.cpu_isa.cache_clear()
    yield name
    cpu_w4a8.cpu_isa.cache_clear()


def _case(m, n, k, group, rank, smooth, dtype, lowrank_dtype=torch.float16):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    n_groups = 1 if group == -1 else -(-k // group)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.001
    inv_smooth = torch.rand(k, generator=g) + 0.5 if smooth else torch.ones(k)
    down = (torch.randn(rank, k, generator=g) * 0.1).to(lowrank_dtype) if rank else None
    up = (torch.randn(n, rank, generator=g) * 0.1).to(lowrank_dtype) if rank else None
    bias = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, 3] = 40.0  # an outlier token channel
    return q, scale, inv_smooth, down, up, bias, x


SHAPES = [(37, 72, -1), (50, 136, 64), (24, 40, -1), (64, 96, -1), (32, 160, 32), (17, 300, 128), (16, 8, 8)]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("m", [1, 7, 33, 70])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,smooth,act_bits", [(8, True, 8), (0, False, 8), (16, True, 6)])
def test_cpu_kernel_matches_reference(path, m, n, k, group, dtype, rank, smooth, act_bits):
    from vllm_aser.kernels.select import CPUKernel, ReferenceKernel

    q, scale, inv_smooth, down, up, bias, x = _case(m, n, k, group, rank, smooth, dtype)
    ref_kernel, cpu_kernel = ReferenceKernel(), CPUKernel()
    ref = ref_kernel.apply(make_layer(ref_kernel, q, scale, inv_smooth, down, up, group, dtype, act_bits), x, bias)
    layer = make_layer(cpu_kernel, q, scale, inv_smooth, down, up, group, dtype, act_bits, bias)
    assert layer.aser_cpu_path == ("native" if path != "fallback" else layer.aser_cpu_path)
    out = cpu_kernel.apply(layer, x, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    # native: the same integers as the reference (x * inv_smooth and x / s_x in float32, round half to even), so
    # only the summation order and the output rounding differ (measured on AMD EPYC AVX-512 VNNI: >= 81 dB in
    # bf16, >= 96 dB in float32, every path). Fallback: x * inv_smooth is rounded to the activation dtype before
    # the int8 quantizer (one int8 step on some elements in bf16, > 30 dB), and group scales are requantized to
    # per-channel int8 (up to half an int8 step per weight, > 35 dB in float32).
    if path != "fallback":
        floor = 60 if dtype == torch.bfloat16 else 80
    elif dtype == torch.bfloat16:
        floor = 30
    else:
        floor = 60 if group == -1 else 35
    assert sqnr_db(ref.float(), out.float()) > floor


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fallback"], indirect=True)
def test_native_kernel_catches_a_dropped_branch_or_smoothing(path):
    """Negative controls: the reference without the low-rank branch, or with another smoothing vector, must fall
    far below the floor the kernel test asserts (so that test would catch either bug)."""
    from vllm_aser.kernels.select import CPUKernel, ReferenceKernel

    q, scale, inv_smooth, down, up, bias, x = _case(33, 50, 136, 64, 8, True, torch.float32)
    ref_kernel, cpu_kernel = ReferenceKernel(), CPUKernel()
    out = cpu_kernel.apply(make_layer(cpu_kernel, q, scale, inv_smooth, down, up, 64, torch.float32, 8, bias), x, bias)
    no_branch = ref_kernel.apply(make_layer(ref_kernel, q, scale, inv_smooth, None, None, 64, torch.float32, 8), x,
                                 bias)
    other_smooth = inv_smooth * (1 + 0.05 * torch.randn(inv_smooth.shape, generator=torch.Generator().manual_seed(1)))
    perturbed = ref_kernel.apply(make_layer(ref_kernel, q, scale, other_smooth, down, up, 64, torch.float32, 8), x,
                                 bias)
    assert sqnr_db(no_branch, out) < 40 and sqnr_db(perturbed, out) < 40


def test_native_kernel_refuses_what_it_cannot_run():
    """Layers the native kernel cannot take go to the int8 fallback, with the reason."""
    if not cpu_w4a8.extension_status()[0]:
        pytest.fail(cpu_w4a8.extension_status()[1])
    assert cpu_w4a8.why_not(4, 8, 72, -1, None, None) is None
    assert "8-bit weights" in cpu_w4a8.why_not(8, 8, 72, -1, None, None)
    assert "group size 12" in cpu_w4a8.why_not(4, 8, 72, 12, None, None)
    down = torch.zeros(2, 72)
    assert cpu_w4a8.why_not(4, 8, 72, -1, down, down.t()) is None
    assert "float64" in cpu_w4a8.why_not(4, 8, 72, -1, down.double(), down.t().double())
    assert "dtype" in cpu_w4a8.why_not(4, 8, 72, -1, down, down.t().half())


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fallback"], indirect=True)
@pytest.mark.parametrize("lowrank_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_native_kernel_reads_lowrank_factors_as_stored(path, lowrank_dtype, m):
    """The artifact's low-rank dtype follows --dtype (bfloat16 by default, float32 for float32 models): the
    native kernel reads each as stored, nothing is rounded on the way."""
    from vllm_aser.kernels.select import CPUKernel, ReferenceKernel

    q, scale, inv_smooth, down, up, bias, x = _case(m, 50, 136, 64, 24, True, torch.float32, lowrank_dtype)
    ref_kernel, cpu_kernel = ReferenceKernel(), CPUKernel()
    layer = make_layer(cpu_kernel, q, scale, inv_smooth, down, up, 64, torch.float32, 8, bias)
    assert layer.aser_cpu_path == "native" and layer.aser_native_down.dtype == lowrank_dtype
    ref = ref_kernel.apply(make_layer(ref_kernel, q, scale, inv_smooth, down, up, 64, torch.float32, 8), x, bias)
    assert sqnr_db(ref, cpu_kernel.apply(layer, x, bias)) > 80


def test_float64_lowrank_factors_fall_back_and_stay_right():
    from vllm_aser.kernels.select import CPUKernel, ReferenceKernel

    q, scale, inv_smooth, down, up, bias, x = _case(7, 37, 72, -1, 8, True, torch.float32, torch.float64)
    ref_kernel, cpu_kernel = ReferenceKernel(), CPUKernel()
    layer = make_layer(cpu_kernel, q, scale, inv_smooth, down, up, -1, torch.float32, 8)
    assert layer.aser_cpu_path in ("amx", "onednn")
    ref = ref_kernel.apply(make_layer(ref_kernel, q, scale, inv_smooth, down, up, -1, torch.float32, 8), x, bias)
    assert sqnr_db(ref, cpu_kernel.apply(layer, x, bias)) > 60


@pytest.mark.parametrize("n,k", [(64, 96), (48, 96), (37, 72)])
def test_amx_path_taken_where_vllm_allows_it(n, k, monkeypatch):
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    from vllm_aser.kernels.select import NO_AMX_ENV_VAR, NO_NATIVE_ENV_VAR, CPUKernel

    monkeypatch.setenv(NO_NATIVE_ENV_VAR, "1")
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
    args = (q, torch.full((n, 1), 0.01), torch.ones(k), None, None, -1, torch.bfloat16, 8)
    amx = n % 32 == 0 and check_cpu_sgl_kernel(n, k, torch.int8)
    assert make_layer(CPUKernel(), *args).aser_cpu_path == ("amx" if amx else "onednn")
    monkeypatch.setenv(NO_AMX_ENV_VAR, "1")
    assert make_layer(CPUKernel(), *args).aser_cpu_path == "onednn"
    assert make_layer(CPUKernel(), *args[:-2], torch.float32, 8).aser_cpu_path == "onednn"


@pytest.mark.parametrize("path", ["avx2", "fallback"], indirect=True)
def test_3d_input_keeps_leading_dims(path):
    from vllm_aser.kernels.select import CPUKernel

    kernel = CPUKernel()
    q = torch.randint(-7, 8, (16, 24), dtype=torch.int8)
    layer = make_layer(kernel, q, torch.full((16, 1), 0.01), torch.ones(24), None, None, -1, torch.float32, 8)
    assert kernel.apply(layer, torch.randn(2, 5, 24), None).shape == (2, 5, 16)
    assert kernel.apply(layer, torch.randn(2, 5, 24)[:, :, :24].transpose(0, 1), None).shape == (5, 2, 16)


@pytest.mark.skipif(os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2", reason="this is the inner run")
def test_fallback_right_where_onednn_has_no_vnni():
    """The int8 fallback as on an AVX2-only CPU, on any CPU: oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA, read when
    oneDNN starts, hence a subprocess) multiplies through vpmaddubsw, whose int16 pair sums saturate for
    full-range int8 weights; the fallback must keep the requantized group weights within 7 bits there. The
    native kernel's AVX2 path is covered above (VLLM_ASER_CPU_ISA=avx2)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", VLLM_ASER_CPU_NO_AMX="1")  # oneDNN's path, not vLLM's AMX
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-x",
         "-k", "matches_reference and fallback"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_missing_extension_falls_back_with_the_reason(monkeypatch):
    """Without the native kernel (a build without torch, a non-x86 machine) every layer still loads, on the
    int8 fallback, and the reason says how to get the native kernel."""
    from vllm_aser.kernels.select import CPUKernel

    monkeypatch.setattr(cpu_w4a8, "extension_status", lambda: (False, "not built (test)"))
    cpu_w4a8.cpu_isa.cache_clear()
    try:
        assert cpu_w4a8.why_not(4, 8, 72, -1, None, None) == "not built (test)"
        q = torch.randint(-8, 8, (37, 72), dtype=torch.int8)
        layer = make_layer(CPUKernel(), q, torch.full((37, 1), 0.01), torch.ones(72), None, None, -1,
                           torch.float32, 8)
        assert layer.aser_cpu_path in ("amx", "onednn")
    finally:
        cpu_w4a8.cpu_isa.cache_clear()


def test_cuda_kernel_refuses_8bit_weights_by_name():
    """Checked before anything touches a GPU: the error names the layer and the way out."""
    from vllm_aser.kernels.select import CUDAKernel

    layer = torch.nn.Module()
    layer.aser_weight_bits, layer.aser_name = 8, "model.layers.3.mlp.down_proj"
    q = torch.randint(-100, 100, (16, 32), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj: the cuda kernel runs int4 weights only"):
        CUDAKernel().prepare(layer, q, torch.ones(16, 1), torch.ones(32), None, None, -1)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fallback"], indirect=True)
@pytest.mark.parametrize("m", [1, 7, 33])
# blocks below, at and above the vector width (8 lanes on AVX2, 16 on AVX-512), with and without a lone last stage
@pytest.mark.parametrize("n,k,block,group", [(37, 72, 8, -1), (50, 136, 8, 8), (17, 304, 16, -1), (24, 40, 2, -1),
                                             (31, 128, 64, 64), (29, 384, 128, -1), (64, 1536, 512, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_fuses_the_input_rotation(path, m, n, k, block, group, dtype):
    """The layer's online Hadamard (input_hadamard) inside the kernel's activation pass, against the reference that
    rotates x in float32 first; the plugin hands the kernel inv_smooth / sqrt(b), as the linear method does."""
    from vllm_aser.kernels.reference import aser_linear, dequantize_weight
    from vllm_aser.kernels.select import CPUKernel

    q, scale, inv_smooth, down, up, bias, x = _case(m, n, k, group, 8, True, dtype)
    ref = aser_linear(x, dequantize_weight(q, scale, group), inv_smooth, down, up, bias, 8, hadamard=block)
    kernel = CPUKernel()
    layer = torch.nn.Module()
    layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = dtype, n, 8
    layer.aser_weight_bits, layer.aser_hadamard = 4, block
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    kernel.prepare(layer, q, scale, inv_smooth / block**0.5, down, up, group)
    assert layer.aser_cpu_path == "native" and layer.aser_hadamard_fused
    out = kernel.apply(layer, x, bias)
    # float32: a 512-wide butterfly and the reference's matmul sum in different orders, which can move an
    # activation across an int8 rounding boundary (one quantization step in one element): 71 dB measured for
    # k = 1536, block 512 on an Intel Xeon with AMX, against > 80 dB elsewhere
    assert sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.bfloat16 else 68)
    unrotated = aser_linear(x, dequantize_weight(q, scale, group), inv_smooth, down, up, bias, 8)
    assert sqnr_db(unrotated.float(), out.float()) < 20  # the rotation is not a no-op on these inputs

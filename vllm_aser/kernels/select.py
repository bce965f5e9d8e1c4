"""Kernel choice, made once per process from the platform (override: VLLM_ASER_KERNEL=reference|cpu|cuda)."""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

import vllm_aser.kernels.torch_ops  # noqa: F401  (registers the custom ops the kernels call)
from vllm_aser.kernels.path_log import PATHS
from vllm_aser.kernels import cpu_w4a8, marlin_w4a8
from vllm_aser.kernels.reference import dequantize_weight

ENV_VAR = "VLLM_ASER_KERNEL"
NO_AMX_ENV_VAR = "VLLM_ASER_CPU_NO_AMX"  # 1: the int8 fallback uses oneDNN's GEMM even where AMX is there
NO_NATIVE_ENV_VAR = "VLLM_ASER_CPU_NO_NATIVE"  # 1: skip the native W4A8 kernel (int4 unpacked to int8 instead)


def _keep(layer: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    layer.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))


class ReferenceKernel:
    name = "reference"
    description = "plain torch: dequantized weight, fake-quantized activations, float32 math (the oracle; slow)"

    def prepare(self, layer, q, scale, inv_smooth, down, up, group_size: int) -> None:
        _keep(layer, "aser_weight", dequantize_weight(q, scale, group_size))
        _keep(layer, "aser_inv_smooth", inv_smooth.float())
        _keep(layer, "aser_down", None if down is None else down.float())
        _keep(layer, "aser_up", None if up is None else up.float())

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.vllm_aser.reference_linear(
            x, layer.aser_weight, layer.aser_inv_smooth, layer.aser_down, layer.aser_up, bias, layer.aser_act_bits
        )


class CPUKernel:
    name = "cpu"
    description = ("per layer: the native W4A8 kernel (packed int4 x int8, ASER's smoothing and low-rank branch "
                   "fused) where it can run the layer, else int4 unpacked to int8 on vLLM's AMX or oneDNN int8 GEMM "
                   "+ low-rank branch")

    def prepare(self, layer, q, scale, inv_smooth, down, up, group_size: int) -> None:
        act_dtype = layer.aser_act_dtype
        is_identity = bool(torch.all(inv_smooth == 1))
        reason = _native_why_not(layer, q, down, up, group_size)
        if reason is None:
            packed = cpu_w4a8.pack(q, scale, group_size, down, up, getattr(layer, "bias", None))
            layer.aser_cpu_path = "native"
            layer.aser_isa = cpu_w4a8.ISAS[cpu_w4a8.cpu_isa()[0]]
            layer.aser_group = group_size
            for name in ("weight", "scale", "down", "up", "bias"):
                _keep(layer, f"aser_native_{name}", getattr(packed, name))
            _keep(layer, "aser_inv_smooth", None if is_identity else inv_smooth.float().contiguous())
            # the layer's online input rotation runs inside the kernel's activation pass
            layer.aser_hadamard_fused = bool(getattr(layer, "aser_hadamard", 0))
            _log_path("cpu", "native", cpu_w4a8.cpu_isa()[1], layer)
            return
        qmax = int8_weight_max()
        if group_size == -1 and int(q.abs().max()) <= qmax:
            weight, channel_scale = q, scale.float()
        else:  # the int8 GEMMs take per-channel scales only: requantize the group-dequantized weight
            dequant = dequantize_weight(q, scale, group_size)
            channel_scale = (dequant.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
            weight = torch.round(dequant / channel_scale).clamp(-qmax, qmax).to(torch.int8)
        amx = _amx_int8_available(*weight.shape, act_dtype, layer.aser_act_bits)
        layer.aser_cpu_path = "amx" if amx else "onednn"
        _log_path("cpu", layer.aser_cpu_path, f"fallback: the native W4A8 kernel cannot run them: {reason}", layer)
        if amx:
            _keep(layer, "aser_weight_packed", torch.ops._C.convert_weight_packed(weight.contiguous()))
            _keep(layer, "aser_weight_scale", channel_scale.reshape(-1).contiguous())
        else:
            from vllm import _custom_ops as ops

            # the oneDNN handler keeps a pointer to the scales (not a copy): they must live as long as the layer
            _keep(layer, "aser_weight_scale", channel_scale.reshape(-1, 1).contiguous())
            dnnl = ops.create_onednn_scaled_mm(weight.t(), layer.aser_weight_scale, act_dtype, True, False, 32)
            _keep(layer, "aser_dnnl_handle", dnnl.handler_tensor)
            layer.aser_dnnl = dnnl  # owns the handler: releases it when the layer goes
        _keep(layer, "aser_inv_smooth", None if is_identity else inv_smooth.to(act_dtype))
        # The low-rank factors, transposed for plain GEMMs, in float32 (the reference's precision; fastest for a
        # few rows) and in the activation dtype (fastest for many rows): see CPU_FLOAT32_LOWRANK_MAX_ROWS.
        _keep(layer, "aser_down", None if down is None else down.float().t().contiguous())
        _keep(layer, "aser_up", None if up is None else up.float().t().contiguous())
        low_precision = down is not None and act_dtype != torch.float32
        _keep(layer, "aser_down_lp", down.to(act_dtype).t().contiguous() if low_precision else None)
        _keep(layer, "aser_up_lp", up.to(act_dtype).t().contiguous() if low_precision else None)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.aser_cpu_path == "native":
            shape = x.shape
            # the layer's own bias is packed at load and added in the kernel's epilogue; any other is added after
            fused_bias = bias is not None and layer.aser_native_bias is not None
            out = torch.ops.aser_cpu.w4a8_linear(
                x.reshape(-1, shape[-1]), layer.aser_native_weight, layer.aser_native_scale, layer.aser_group,
                layer.aser_inv_smooth, layer.aser_native_down, layer.aser_native_up,
                layer.aser_native_bias if fused_bias else None, layer.aser_out_features, layer.aser_act_bits,
                layer.aser_isa, layer.aser_hadamard if layer.aser_hadamard_fused else 0,
            )
            if bias is not None and not fused_bias:
                out = out + bias
            return out.reshape(*shape[:-1], layer.aser_out_features)
        lowrank = (layer.aser_down, layer.aser_up, layer.aser_down_lp, layer.aser_up_lp)
        if layer.aser_cpu_path == "amx":
            return torch.ops.vllm_aser.cpu_amx_linear(
                x, layer.aser_weight_packed, layer.aser_weight_scale, layer.aser_inv_smooth, *lowrank, bias
            )
        return torch.ops.vllm_aser.cpu_linear(
            x, layer.aser_dnnl_handle, layer.aser_inv_smooth, *lowrank, bias, layer.aser_out_features,
            layer.aser_act_bits,
        )

    def stack_experts(self, pairs: list[nn.Module]) -> tuple[cpu_w4a8.NativeExperts | None, str]:
        """Every expert's prepared w13 and w2 stacked for one native call per MoE layer, or None and the reason
        (an expert the native kernel could not take: then the experts run one by one)."""
        linears = [lin for pair in pairs for lin in (pair.w13, pair.w2)]
        other = next((lin for lin in linears if lin.aser_cpu_path != "native"), None)
        if other is not None:
            return None, f"{other.aser_name} runs on the {other.aser_cpu_path} path"

        def packed(lin) -> cpu_w4a8.PackedW4A8:
            return cpu_w4a8.PackedW4A8(lin.aser_native_weight, lin.aser_native_scale, lin.aser_group,
                                       lin.aser_native_down, lin.aser_native_up, lin.aser_native_bias,
                                       lin.aser_out_features)

        stacked = {}
        for name in ("w13", "w2"):
            lins = [getattr(pair, name) for pair in pairs]
            stacked[name] = cpu_w4a8.stack_packed([packed(lin) for lin in lins])
            stacked[name + "_inv"] = cpu_w4a8.stack_inv_smooth([lin.aser_inv_smooth for lin in lins],
                                                               lins[0].aser_in_features)
        first = pairs[0].w13
        isa = {v: k for k, v in cpu_w4a8.ISAS.items()}[first.aser_isa]
        return cpu_w4a8.NativeExperts(stacked["w13"], stacked["w13_inv"], stacked["w2"], stacked["w2_inv"],
                                      first.aser_act_bits, isa), ""


@functools.cache
def int8_weight_max() -> int:
    """The largest int8 weight the fallback's int8 GEMMs can take exactly on this CPU. Without VNNI (AVX2,
    AVX-512 before Cascade Lake, or oneDNN capped below it by ONEDNN_MAX_CPU_ISA), oneDNN's u8 x s8 products go
    through vpmaddubsw, whose int16 pair sums saturate for full-range weights: 2 x 255 x 63 is the most that fits."""
    flags = cpu_w4a8.cpu_flags()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2", "AVX512_CORE")
    has_vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) and not capped
    return 127 if has_vnni else 63


def _native_why_not(layer, q, down, up, group_size: int) -> str | None:
    if os.environ.get(NO_NATIVE_ENV_VAR) == "1":
        return f"{NO_NATIVE_ENV_VAR}=1"
    bits = getattr(layer, "aser_weight_bits", 4)
    return cpu_w4a8.why_not(bits, layer.aser_act_bits, q.shape[1], group_size, down, up)


def _log_path(kernel: str, path: str, reason: str, layer) -> None:
    """The layer's path, for the summary logged once every layer is prepared (vllm_aser/kernels/path_log.py)."""
    PATHS.record(kernel, path, reason, getattr(layer, "aser_name", "?"))


def _amx_int8_available(n: int, k: int, act_dtype: torch.dtype, act_bits: int) -> bool:
    """vLLM's AMX int8 kernel: 8-bit symmetric per-token activations, 16-bit activation dtype, and the shapes
    vLLM itself accepts for it (check_cpu_sgl_kernel: AMX present, K % 32 == 0, N % 16 == 0), with N a multiple
    of 32: its int8 weight packing (convert_weight_packed) rejects N = 16 mod 32."""
    if act_bits != 8 or act_dtype not in (torch.bfloat16, torch.float16) or os.environ.get(NO_AMX_ENV_VAR) == "1":
        return False
    import vllm._custom_ops  # noqa: F401  (loads vLLM's compiled ops into torch.ops._C)

    if not (hasattr(torch.ops._C, "int8_scaled_mm_with_quant") and hasattr(torch.ops._C, "convert_weight_packed")):
        return False
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    if not (n % 32 == 0 and check_cpu_sgl_kernel(n, k, torch.int8)):
        return False
    # Linux hands out AMX tile state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM); vLLM's AMX kernel
    # does not ask, so in a process where no oneDNN AMX op ran first its first tile instruction is SIGILL
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init_amx()) if init_amx is not None else True


class CUDAKernel:
    name = "cuda"
    description = ("per layer: vLLM's Marlin W4A8 GEMM (int8 activations) between ASER's Triton smoothing/low-rank "
                   "kernels where Marlin can run the layer, else ASER's Triton int8 x packed-int4 GEMM")

    def prepare(self, layer, q, scale, inv_smooth, down, up, group_size: int) -> None:
        name = getattr(layer, "aser_name", "an ASER layer")
        if (bits := getattr(layer, "aser_weight_bits", 4)) != 4:
            raise ValueError(f"{name}: the cuda kernel runs int4 weights only, this artifact has {bits}-bit weights: "
                             f"set {ENV_VAR}=reference, or re-quantize with --w-bits 4")
        act_dtype = layer.aser_act_dtype
        is_identity = bool(torch.all(inv_smooth == 1))
        _keep(layer, "aser_inv_smooth", None if is_identity else inv_smooth.float().contiguous())
        _keep(layer, "aser_down", None if down is None else down.to(act_dtype).contiguous())
        _keep(layer, "aser_up_t", None if up is None else up.t().to(act_dtype).contiguous())
        reason = marlin_w4a8.why_not(bits, layer.aser_act_bits, *q.shape, group_size, act_dtype,
                                     marlin_w4a8.cuda_capability(q.device), marlin_w4a8.have_marlin_ops())
        if reason is None:
            weights = marlin_w4a8.prepare(q, scale, group_size, act_dtype)
            layer.aser_cuda_path = "marlin"
            layer.aser_marlin_k_full = weights.is_k_full
            for field in ("qweight", "scales", "zeros", "g_idx", "perm", "workspace", "global_scale"):
                _keep(layer, f"aser_marlin_{field}", getattr(weights, field))
            own_bias = getattr(layer, "bias", None)
            _keep(layer, "aser_marlin_bias", None if own_bias is None else marlin_w4a8.permute_bias(own_bias.data))
            _log_path("cuda", "marlin", "vLLM's Marlin W4A8 GEMM", layer)
            return
        from vllm_aser.kernels.triton_w4a8 import UNIT, pack_int4_kn

        if group_size != -1 and group_size % UNIT:
            raise ValueError(f"{name}: the cuda kernel needs a weight group size that is a multiple of {UNIT} (this "
                             f"model has {group_size}): re-quantize with --group-size 128, or set {ENV_VAR}=reference")
        weight = pack_int4_kn(q, scale, group_size)
        layer.aser_cuda_path = "triton"
        layer.aser_group = weight.group_size
        layer.aser_in_features = weight.in_features
        _keep(layer, "aser_packed", weight.packed)
        _keep(layer, "aser_scale", weight.scale)
        _log_path("cuda", "triton", f"fallback: Marlin cannot run them: {reason}", layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.aser_cuda_path == "marlin":
            fused_bias = bias is not None and layer.aser_marlin_bias is not None
            return torch.ops.vllm_aser.cuda_marlin_linear(
                x, layer.aser_marlin_qweight, layer.aser_marlin_scales, layer.aser_marlin_zeros,
                layer.aser_marlin_g_idx, layer.aser_marlin_perm, layer.aser_marlin_workspace,
                layer.aser_marlin_global_scale, layer.aser_marlin_bias if fused_bias else None, layer.aser_inv_smooth,
                layer.aser_down, layer.aser_up_t, None if fused_bias else bias, layer.aser_out_features,
                layer.aser_act_bits, layer.aser_marlin_k_full,
            )
        return torch.ops.vllm_aser.cuda_linear(
            x, layer.aser_packed, layer.aser_scale, layer.aser_inv_smooth, layer.aser_down, layer.aser_up_t, bias,
            layer.aser_group, layer.aser_in_features, layer.aser_out_features, layer.aser_act_bits,
        )


KERNELS = {k.name: k for k in (ReferenceKernel, CPUKernel, CUDAKernel)}


def _cuda_kernel_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cpu_kernel_available() -> bool:
    import vllm._custom_ops  # noqa: F401  (loads vLLM's compiled ops into torch.ops._C)

    return hasattr(torch.ops._C, "onednn_scaled_mm") and hasattr(torch.ops._C, "create_onednn_scaled_mm_handler")


@functools.cache
def select_kernel():
    """The kernel for this process; logged once."""
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    logger = init_logger("vllm.aser")
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower()
    if wanted not in ("auto", *KERNELS):
        raise ValueError(f"{ENV_VAR}={wanted!r}: choose one of auto, {', '.join(KERNELS)}")
    if wanted == "auto":
        if current_platform.is_cpu() and _cpu_kernel_available():
            wanted = "cpu"
        elif current_platform.is_cuda() and _cuda_kernel_available():
            wanted = "cuda"
        else:
            wanted = "reference"
            logger.warning("ASER: no fast kernel for platform %s yet; using the slow reference kernel",
                           current_platform.device_name)
    if wanted == "cpu" and not (current_platform.is_cpu() and _cpu_kernel_available()):
        raise ValueError(f"{ENV_VAR}=cpu needs vLLM's CPU build (oneDNN ops); this platform has none")
    if wanted == "cuda" and not (current_platform.is_cuda() and _cuda_kernel_available()):
        raise ValueError(f"{ENV_VAR}=cuda needs a CUDA device and Triton")
    kernel = KERNELS[wanted]()
    logger.info("ASER kernel: %s (%s); set %s to override", kernel.name, kernel.description, ENV_VAR)
    if current_platform.is_cpu():
        _request_amx()
        _log_cpu_threads(logger)
    return kernel


def _request_amx() -> None:
    """Ask Linux for AMX tile state for this process (arch_prctl ARCH_REQ_XCOMP_PERM, through torch) before any
    kernel uses tiles: vLLM's AMX kernels do not ask, and a tile instruction without it is SIGILL."""
    import torch

    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if init_amx is not None:
        init_amx()


def _log_cpu_threads(logger) -> None:
    """Say how many OpenMP threads run the model: vLLM's automatic binding keeps one core per worker for its
    scheduler, which on a small machine leaves the model a fraction of the cores (half of them on 2 cores)."""
    import torch

    threads, usable = torch.get_num_threads(), os.cpu_count() or 1
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if threads < usable and bind == "auto":
        logger.warning("ASER: the model runs on %d OpenMP thread(s) of this machine's %d CPUs "
                       "(VLLM_CPU_OMP_THREADS_BIND=%s); for one worker, VLLM_CPU_OMP_THREADS_BIND=0-%d uses all "
                       "of them (scripts/cpu_env.sh sets it)", threads, usable, bind, usable - 1)
    else:
        logger.info("ASER: the model runs on %d OpenMP thread(s) (VLLM_CPU_OMP_THREADS_BIND=%s)", threads, bind)

"""ASERLinearMethod: declares the artifact's tensors as TP-aware vLLM parameters and runs the chosen kernel."""

from __future__ import annotations

import math

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from vllm_aser import format as fmt
from vllm_aser.kernels.path_log import PATHS
from vllm_aser.kernels.hadamard import block_hadamard_unscaled, kronecker_factors, native_hadamard_available
from vllm_aser.kernels.reference import unpack_int
from vllm_aser.kernels.select import select_kernel
from vllm_aser.parameters import LowRankDownParameter, LowRankUpParameter, SiblingSharedParameter


@register_weight_loader_v2_supported_method
class ASERLinearMethod(LinearMethodBase):
    def __init__(self, spec: fmt.ASERQuantConfig, ranks: list[int], prefix: str, hadamard: int = 0):
        self.spec = spec
        self.ranks = ranks  # one per fused sub-layer
        self.prefix = prefix
        self.hadamard = hadamard  # input Hadamard block, 0: the input is not rotated
        self.kernel = select_kernel()

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        spec, loader = self.spec, extra_weight_attrs["weight_loader"]
        in_part, out_total = input_size_per_partition, sum(output_partition_sizes)
        # a checkpoint that stores the fused layer whole (Phi-3's qkv_proj, gate_up_proj): one rank, one smoothing
        # vector, one down-projection; vLLM splits the output-dim tensors among the sub-layers itself
        self.prefused = len(self.ranks) == 1 and len(output_partition_sizes) > 1
        if len(self.ranks) != len(output_partition_sizes) and not self.prefused:
            raise fmt.FormatError(
                f"{self.prefix}: {len(output_partition_sizes)} fused sub-layers but {len(self.ranks)} ranks"
            )
        sharded_input = in_part != input_size
        if sharded_input and in_part % spec.pack_factor:
            raise ValueError(
                f"{self.prefix}: {in_part} input features per tensor-parallel rank is not a multiple of "
                f"{spec.pack_factor} (int{spec.weight_bits} packing): use a smaller --tensor-parallel-size"
            )
        if self.hadamard and in_part % self.hadamard:
            fits = in_part & -in_part  # the largest power of two dividing the slice
            raise ValueError(
                f"{self.prefix}: {in_part} input features per tensor-parallel rank is not a multiple of the layer's "
                f"input Hadamard block {self.hadamard} (each rank rotates whole blocks of its own input): use a "
                f"smaller --tensor-parallel-size, or re-quantize with --mlp-hadamard {fits if fits >= 2 else 'none'}"
            )
        group = spec.weight_group_size
        if sharded_input and group != -1 and in_part % group:
            raise ValueError(
                f"{self.prefix}: {in_part} input features per rank is not a multiple of the group size {group}: "
                "use a smaller --tensor-parallel-size"
            )
        layer.register_parameter(
            fmt.WEIGHT_PACKED,
            PackedvLLMParameter(
                data=torch.empty(out_total, math.ceil(in_part / spec.pack_factor), dtype=torch.int32),
                input_dim=1,
                output_dim=0,
                packed_dim=1,
                packed_factor=spec.pack_factor,
                weight_loader=loader,
            ),
        )
        if group == -1:
            scale = ChannelQuantScaleParameter(
                data=torch.empty(out_total, 1, dtype=torch.float32), output_dim=0, weight_loader=loader
            )
        else:
            scale = GroupQuantScaleParameter(
                data=torch.empty(out_total, spec.num_groups(in_part), dtype=torch.float32),
                output_dim=0,
                input_dim=1,
                weight_loader=loader,
            )
        layer.register_parameter(fmt.WEIGHT_SCALE, scale)
        layer.register_parameter(
            fmt.WEIGHT_SHAPE, BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=loader)
        )
        smooth = torch.ones(in_part, dtype=torch.float32)
        layer.register_parameter(
            fmt.SMOOTH,
            RowvLLMParameter(input_dim=0, weight_loader=loader, data=smooth) if self.prefused else
            SiblingSharedParameter(what=fmt.SMOOTH, layer_name=self.prefix, input_dim=0, weight_loader=loader,
                                   data=smooth),
        )
        self._create_lowrank(layer, in_part, out_total, loader)
        layer.logical_widths = output_partition_sizes
        layer.aser_in_features = in_part
        layer.aser_out_features = out_total
        layer.aser_act_bits = spec.activation_bits
        layer.aser_weight_bits = spec.weight_bits
        layer.aser_name = self.prefix
        layer.aser_act_dtype = params_dtype
        PATHS.expect()

    def _create_lowrank(self, layer: torch.nn.Module, in_part: int, out_total: int, loader) -> None:
        """Pre-fused checkpoint: the layer's own single pair. Shared: one down-projection for all fused sub-layers (each writes the same copy, like the smoothing
        vector) and a plain column-sharded up-projection. Separate: one rank slot per sub-layer and a
        block-diagonal up-projection."""
        lowrank_dtype = getattr(torch, self.spec.lowrank_dtype)
        if self.prefused:
            rank = self.ranks[0]
            if not rank:
                return
            down = RowvLLMParameter(input_dim=1, weight_loader=loader,
                                    data=torch.zeros(rank, in_part, dtype=lowrank_dtype))
            up = ChannelQuantScaleParameter(data=torch.zeros(out_total, rank, dtype=lowrank_dtype), output_dim=0,
                                            weight_loader=loader)
        elif self.spec.lowrank_shared:
            if len(set(self.ranks)) != 1:
                raise fmt.FormatError(
                    f"{self.prefix}: quantization_config.lowrank_shared is true but the fused sub-layers have "
                    f"different ranks {self.ranks}"
                )
            rank = self.ranks[0]
            if not rank:
                return
            down = SiblingSharedParameter(what=fmt.LOWRANK_DOWN, layer_name=self.prefix, input_dim=1,
                                          weight_loader=loader, data=torch.zeros(rank, in_part, dtype=lowrank_dtype))
            up = ChannelQuantScaleParameter(data=torch.zeros(out_total, rank, dtype=lowrank_dtype), output_dim=0,
                                            weight_loader=loader)
        else:
            total_rank = sum(self.ranks)
            if not total_rank:
                return
            down = LowRankDownParameter(ranks=self.ranks, data=torch.zeros(total_rank, in_part, dtype=lowrank_dtype),
                                        weight_loader=loader)
            up = LowRankUpParameter(ranks=self.ranks, data=torch.zeros(out_total, total_rank, dtype=lowrank_dtype),
                                    weight_loader=loader)
        layer.register_parameter(fmt.LOWRANK_DOWN, down)
        layer.register_parameter(fmt.LOWRANK_UP, up)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        spec = self.spec
        q = unpack_int(layer.weight_packed.data, spec.weight_bits, layer.aser_in_features)
        scale = layer.weight_scale.data
        inv_smooth = 1.0 / layer.smooth_scale.data
        if self.hadamard:  # the +-1 transform's 1/sqrt(b) joins the smoothing
            inv_smooth = inv_smooth / self.hadamard**0.5
        down = getattr(layer, fmt.LOWRANK_DOWN, None)
        up = getattr(layer, fmt.LOWRANK_UP, None)
        down = None if down is None else down.data
        up = None if up is None else up.data
        layer.aser_hadamard = self.hadamard
        self.kernel.prepare(layer, q, scale, inv_smooth, down, up, spec.weight_group_size)
        # how apply() rotates the input, decided once: inside the kernel (the native CPU path says so in prepare),
        # by the native butterfly op, or by two small +-1 GEMMs (CUDA; a CPU without the native extension)
        layer.aser_rotate_input = None
        if self.hadamard and not getattr(layer, "aser_hadamard_fused", False):
            device = inv_smooth.device
            layer.aser_rotate_input = "native" if native_hadamard_available(device) else "kronecker"
            if layer.aser_rotate_input == "kronecker":
                left, right = kronecker_factors(self.hadamard)
                layer.register_buffer("aser_hadamard_left", left.to(device, layer.aser_act_dtype), persistent=False)
                layer.register_buffer("aser_hadamard_right", right.to(device, layer.aser_act_dtype), persistent=False)
        for name in fmt.ALL_SUFFIXES:
            if hasattr(layer, name):
                delattr(layer, name)
        PATHS.finished()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.aser_rotate_input == "native":  # a butterfly per block (b log b adds), one pass over x
            x = torch.ops.aser_cpu.hadamard(x.reshape(-1, x.shape[-1]), self.hadamard).reshape(x.shape)
        elif layer.aser_rotate_input == "kronecker":
            x = block_hadamard_unscaled(x, layer.aser_hadamard_left, layer.aser_hadamard_right)
        return self.kernel.apply(layer, x, bias)

"""ASERConfig: the `aser` quantization method, registered with vLLM on import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_aser import format as fmt


@register_quantization_config(fmt.QUANT_METHOD)
class ASERConfig(QuantizationConfig):
    def __init__(self, spec: fmt.ASERQuantConfig | None = None):
        super().__init__()
        self.spec = spec if spec is not None else fmt.ASERQuantConfig()

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"ASERConfig(w{s.weight_bits}a{s.activation_bits}, group={s.weight_group_size}, "
            f"method={s.method}, layers={len(s.ranks)})"
        )

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ASERConfig:
        return cls(fmt.ASERQuantConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Check the checkpoint's tensors against the config before vLLM allocates anything."""
        if not self.spec.ranks:
            raise fmt.FormatError(
                f"{model_name}: config.json has no ASER quantization_config: quantize the model with "
                "aser-quantize first (or drop --quantization aser to serve it unquantized)"
            )
        if Path(model_name).is_dir():
            fmt.validate_checkpoint(model_name, self.spec)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """vLLM renames some models' modules (its `hf_to_vllm_mapper`, e.g. multimodal wrappers that move the
        text model under `language_model.`): the per-module ranks, rotations and ignore list follow. Called after
        maybe_update_config, which checks the checkpoint under its own names."""
        self.spec = self.spec.renamed(hf_to_vllm_mapper.map_name)

    def _sub_layer_names(self, prefix: str) -> list[str]:
        parent, _, leaf = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(leaf)
        if not subs:
            return [prefix]
        return [f"{parent}.{sub}" if parent else sub for sub in subs]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            from vllm_aser.moe_method import ASERMoEMethod

            return ASERMoEMethod(self.spec, prefix, layer.moe_config)
        if isinstance(layer, ParallelLMHead):
            # a head quantized by `aser-quantize --quantize-head` is in `ranks`; otherwise vLLM keeps it unquantized
            if prefix not in self.spec.ranks or is_layer_skipped(prefix, self.spec.ignore, self.packed_modules_mapping):
                return None
            from vllm_aser.linear_method import ASERLinearMethod

            return ASERLinearMethod(self.spec, [self.spec.rank_of(prefix)], prefix, self.spec.hadamard_of(prefix))
        if not isinstance(layer, LinearBase):
            return None
        if is_layer_skipped(prefix, self.spec.ignore, self.packed_modules_mapping):
            return UnquantizedLinearMethod()
        from vllm_aser.linear_method import ASERLinearMethod

        names = self._sub_layer_names(prefix)
        ranks = [self.spec.rank_of(name) for name in names]
        blocks = {self.spec.hadamard_of(name) for name in names}
        if len(blocks) > 1:
            raise fmt.FormatError(f"{prefix}: the sub-layers {names} that vLLM fuses rotate their input by different "
                                  f"Hadamard blocks {sorted(blocks)}; they read one input and must share it")
        return ASERLinearMethod(self.spec, ranks, prefix, blocks.pop())

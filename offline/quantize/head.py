"""The output head as one more ASER linear (opt-in, `--quantize-head`).

A decode step reads the whole head: on Qwen2.5-1.5B its 152k x 1536 bfloat16 matrix is 467 MB, a third of the
bytes of a step once the blocks are int4. Quantized like a block's linears (smoothing, outliers, GPTQ, a low-rank
branch from the global budget), calibrated on the final norm's output of the quantized model; embeddings stay
unquantized (a lookup reads one row per token).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_aser_offline.quantize.layer_quant import QuantizedLinear, quantize_group
from vllm_aser_offline.model.model_structure import DecoderStack, UnsupportedModelError
from vllm_aser_offline.options import QuantizeOptions
from vllm_aser_offline.transform.rotation import _final_norm
from vllm_aser_offline.quantize.whitening import ActivationStats


def head_modules(model: nn.Module, stack: DecoderStack) -> tuple[str, nn.Linear, str, nn.Module]:
    """(head name, head, final norm name, final norm); refused by name when the head is not a plain linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"--quantize-head: {type(model).__name__}'s output head is a "
                                    f"{type(head).__name__}, not a linear: quantize without --quantize-head")
    name = next(n for n, m in model.named_modules() if m is head)
    norm, norm_name = _final_norm(model, stack)
    return name, head, norm_name, norm


def quantize_head(model: nn.Module, stack: DecoderStack, hidden: list[torch.Tensor],
                  opts: QuantizeOptions) -> QuantizedLinear:
    """The head quantized on the final norm's output of `hidden` (the last block's outputs, quantized stream)."""
    name, head, _, norm = head_modules(model, stack)
    stats = ActivationStats(head.in_features)
    with torch.no_grad():
        for h in hidden:
            stats.update(norm(h.to(next(norm.parameters()).device)).float())
    (result,) = quantize_group({name: head}, stats, opts)
    return result

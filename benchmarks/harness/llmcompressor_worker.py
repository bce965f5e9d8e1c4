"""llm-compressor side of benchmarks/vs_llmcompressor.py: runs in its own venv (.venv-llmcompressor), one scheme per
process, on the calibration windows the driver cut with the project's own code (so both quantizers see the same
tokens).

    python llmcompressor_worker.py JOB.json   # {"model", "windows" (a JSON file of token id lists), "scheme", "out"}

Schemes: w4a8-g128 (GPTQ, int4 group 128 + int8 dynamic per-token activations; group 64 where 128 does not divide
the layers' input sizes), w4a8-channel, w4a16-g128, w8a8 (SmoothQuant, then GPTQ W8A8).
"""

from __future__ import annotations

import json
import sys
import time


def _w4a8(group: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True,
                               strategy="group" if group else "channel", group_size=group)
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}


def _group_for(model) -> int:
    """128 where it divides every quantized layer's input size, else 64 (SmolLM2's 576)."""
    import torch

    sizes = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    return 128 if all(s % 128 == 0 for s in sizes) else 64


def recipe(scheme: str, model) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    group = _group_for(model)
    if scheme == "w4a8-g128":
        return [GPTQModifier(config_groups=_w4a8(group), ignore=["lm_head"])]
    if scheme == "w4a8-channel":
        return [GPTQModifier(config_groups=_w4a8(None), ignore=["lm_head"])]
    if scheme == "w4a16-g128":
        if group == 128:
            return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
        return [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=["lm_head"])]
    if scheme == "w8a8":
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    raise SystemExit(f"unknown scheme {scheme!r}")


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    windows = json.loads(open(job["windows"]).read())
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    steps = recipe(job["scheme"], model)
    oneshot(model=model, dataset=dataset, recipe=steps, max_seq_length=len(windows[0]),
            num_calibration_samples=len(windows), output_dir=None)
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "group": _group_for(model)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

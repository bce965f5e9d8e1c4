"""Perplexity of an llm-compressor checkpoint through compressed-tensors' own fake quantization, in torch.

Runs in the llm-compressor venv (.venv-llmcompressor), for the rows vLLM's CPU build cannot score in reasonable
time (its W4A8 path for compressed-tensors). The driver cuts the evaluation windows with the project's own code
(`eval_windows`) and this script sums the same next-token NLL as `window_nll`, in float32. Before scoring it
checks that the input-activation quantization (where the scheme has one) really runs: the first window's logits with the quantization
switched off must differ, else the score would be a weight-only figure under a W4A8 name.

    python llmcompressor_scorer.py JOB.json   # {"model", "texts": {name: file of [n, window] token ids}}
"""

from __future__ import annotations

import json
import math
import sys
import time


def quantizes_inputs(model) -> bool:
    return any(getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None
               for m in model.modules())


def set_quantization(model, enabled: bool) -> int:
    """Turn compressed-tensors' quantize-dequantize on or off in every quantized module; how many it touched."""
    count = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.quantization_enabled = enabled
            count += 1
    return count


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    result: dict = {}
    with torch.no_grad():
        for name, path in job["texts"].items():
            windows = torch.tensor(json.loads(open(path).read()), dtype=torch.long)
            if "act_quant_logit_change" not in result and quantizes_inputs(model):
                first = windows[:1]
                quantized = model(first).logits
                touched = set_quantization(model, False)
                unquantized = model(first).logits
                set_quantization(model, True)
                change = (quantized - unquantized).abs().max().item()
                if touched == 0 or change < 1e-3:
                    raise SystemExit(f"input-activation quantization did not change the logits (modules: {touched},"
                                     f" max change {change:.2e}): the score would be weight-only")
                result["act_quant_logit_change"] = round(change, 4)
                result["quantized_modules"] = touched
            start, nll = time.perf_counter(), 0.0
            for window in windows.split(1):
                logits = model(window).logits[:, :-1].float()
                nll += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum").double().item()
            tokens = windows.shape[0] * (windows.shape[1] - 1)
            result[name] = {"ppl": round(math.exp(nll / tokens), 4), "tokens": tokens,
                            "seconds": round(time.perf_counter() - start, 1)}
            print(f"{name}: {result[name]}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

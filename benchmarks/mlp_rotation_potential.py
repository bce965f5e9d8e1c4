"""Would rotating the MLP's inner dimension pay (QuaRot's online R4: a Hadamard on down_proj's input at run time)?

A fake-quantization estimate before building it (issue 18's next lever). The residual-stream rotation the
quantizer folds offline (R1 + per-head value rotation) is applied to SmolLM2 in memory; then, with and without a
random Hadamard on every down_proj input, every decoder linear gets W4 per-channel weights (with
the input-weighted clipped scales of `--clip mse`, GPTQ by default (`--base rtn`: round to nearest), from the
full-precision stream of 8 calibration windows; no smoothing, no low-rank branch) and
A8 per-token activations, and perplexity is measured on the held-out texts. The difference between the two rows
is the estimate; neither row is a shippable configuration (the serving kernels have no online rotation).

    python benchmarks/mlp_rotation_potential.py [--windows 16] [--base gptq|rtn]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class InputRotated(nn.Module):
    """y = linear(x R): the weight holds W R (function preserved in full precision)."""

    def __init__(self, linear: nn.Linear, rotation: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("rotation", rotation.float())
        linear.weight.data = (linear.weight.double() @ rotation).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x @ self.rotation)


def inner_matrix(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """`full`: a random Hadamard of order n; `blockB`: random signs times block-diagonal Hadamards of order B
    (what a row-parallel shard of K/tp can apply locally; the signs fold into up_proj's rows for free)."""
    from offline.rotation import hadamard_matrix, random_orthogonal

    if kind == "full":
        return random_orthogonal(n, gen)[0]
    block = int(kind.removeprefix("block"))
    if n % block:
        raise SystemExit(f"--inner {kind}: {n} is not a multiple of {block}")
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    h = torch.block_diag(*[hadamard_matrix(block)] * (n // block)) / block**0.5
    return signs[:, None] * h


def build(model_dir: Path, inner_rotation: str | None, calib: torch.Tensor, base: str):
    from offline.model_structure import find_decoder_stack
    from offline.perplexity import load_torch_model
    from offline.rotation import (check_rotatable, head_dim, random_orthogonal, residual_rotation, rotate_block,
                                  rotate_outside)
    from offline.gptq import quantize_gptq
    from offline.weight_quant import choose_scales, quantize_with_scales
    from vllm_aser.kernels.reference import dequantize_weight, fake_quantize_per_token

    model = load_torch_model(model_dir, torch.float32)
    stack = find_decoder_stack(model)
    check_rotatable(model, stack)
    rotation = residual_rotation(model.get_input_embeddings().weight.shape[1], 0, head_dim(stack.layers[0]))
    rotate_outside(model, stack, rotation)
    gen = torch.Generator().manual_seed(1)
    for index, block in enumerate(stack.layers):
        rotate_block(block, f"{stack.prefix}.{index}", rotation)
        if inner_rotation:
            down = block.mlp.down_proj
            block.mlp.down_proj = InputRotated(down, inner_matrix(down.in_features, inner_rotation, gen))
    linears = {name: m for name, m in stack.layers.named_modules() if isinstance(m, nn.Linear)}
    # Gram matrices of the rotated inputs (full-precision stream: no propagation of quantized outputs)
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name].add_(x.t() @ x)  # returns None: the input is left as it is
        return hook

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
    with torch.no_grad():
        for window in calib.split(1):
            model(window)
    for h in handles:
        h.remove()
    for name, m in linears.items():
        if base == "gptq":
            q, scale = quantize_gptq(m.weight.data, grams[name], 4, -1, clip=True)
        else:
            scale = choose_scales(m.weight.data, 4, -1, grams[name].diagonal())
            q = quantize_with_scales(m.weight.data, scale, 4, -1)
        m.weight.data = dequantize_weight(q, scale, -1).to(m.weight.dtype)
        m.register_forward_pre_hook(lambda mod, args: (fake_quantize_per_token(args[0], 8).to(args[0].dtype),))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=16, help="Wikipedia windows of 2048 tokens (BBC: half as many)")
    p.add_argument("--base", choices=("gptq", "rtn"), default="gptq", help="weight rounding (both with clipped scales)")
    p.add_argument("--inner", default="none,full",
                   help="comma-separated down_proj input rotations: none, full (a Hadamard of order K), blockB "
                        "(block-diagonal Hadamards of order B with random signs)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from offline.calibration import read_texts, token_windows
    from offline.perplexity import eval_windows, window_nll

    assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py", "--eval-text"], cwd=ROOT,
                                       check=True, capture_output=True, text=True).stdout)
    model_dir = Path(assets["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = token_windows(read_texts(assets["calib"]), tokenizer, 8, 512, 0)
    texts = {"wikipedia": eval_windows(assets["eval"]["wikipedia"], tokenizer, 2048, args.windows),
             "bbc": eval_windows(assets["eval"]["bbc"], tokenizer, 2048, max(1, args.windows // 2))}
    print(f"SmolLM2 W4A8 per-channel ({args.base} + clipped scales, no low-rank), rotated; {args.windows} + "
          f"{max(1, args.windows // 2)} windows of 2048 tokens")
    for inner in args.inner.split(","):
        start = time.perf_counter()
        model = build(model_dir, None if inner == "none" else inner, calib, args.base)
        scores = {name: math.exp(window_nll(model, w, progress=False) / (w.numel() - w.shape[0]))
                  for name, w in texts.items()}
        label = f"R1 + R2 + down_proj input R4 ({inner})" if inner != "none" else "R1 + R2 (offline, the shipped rotation)"
        print(f"{label:42s} wikipedia {scores['wikipedia']:.2f}  bbc {scores['bbc']:.2f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

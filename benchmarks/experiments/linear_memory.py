"""Resident bytes of the decoder linears as served on CPU: the ASER artifact as the native kernel holds it
(`cpu_w4a8.pack`: packed int4 in 16 x 8 blocks, float32 scales, low-rank factors in their dtype with ranks padded
to 16, float32 smoothing vector) against an in-tree W8A8 checkpoint as vLLM holds it (int8 weight + float32
per-channel scale; its oneDNN handle repacks the same bytes). Embeddings, norms and lm_head are the same in both
and left out.

    python benchmarks/experiments/linear_memory.py ASER_DIR W8A8_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys() if ".layers." in k})
    return out


def aser_bytes(model_dir: Path) -> int:
    from vllm_aser import format as fmt
    from vllm_aser.kernels import cpu_w4a8
    from vllm_aser.kernels.reference import unpack_int

    cfg = fmt.read_quant_config(model_dir)
    t = tensors(model_dir)
    total = 0
    for module in cfg.ranks:
        out_f, in_f = t[fmt.tensor_name(module, fmt.WEIGHT_SHAPE)].tolist()
        q = unpack_int(t[fmt.tensor_name(module, fmt.WEIGHT_PACKED)], cfg.weight_bits, in_f)
        down = t.get(fmt.tensor_name(module, fmt.LOWRANK_DOWN))
        up = t.get(fmt.tensor_name(module, fmt.LOWRANK_UP))
        packed = cpu_w4a8.pack(q, t[fmt.tensor_name(module, fmt.WEIGHT_SCALE)], cfg.weight_group_size, down, up, None)
        total += packed.nbytes() + in_f * 4  # + the smoothing vector
    return total


def w8a8_bytes(model_dir: Path) -> int:
    return sum(v.numel() * v.element_size() for k, v in tensors(model_dir).items()
               if k.endswith((".weight", ".weight_scale")) and "norm" not in k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("aser_dir", type=Path)
    p.add_argument("w8a8_dir", type=Path)
    args = p.parse_args(argv)
    a, w = aser_bytes(args.aser_dir), w8a8_bytes(args.w8a8_dir)
    print(f"decoder linears, resident: ASER {a / 2**20:.1f} MiB, W8A8 {w / 2**20:.1f} MiB, ratio {a / w:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The online input rotation of a layer: block-diagonal Walsh-Hadamard transforms along the input features.

A layer with `input_hadamard = b` (quantization_config) computes its ASER product on x' = x blockdiag(H_b) / sqrt(b),
H_b the Sylvester Hadamard matrix of order b (a power of two; symmetric, H_b H_b = b I). The quantizer folded the
inverse into the layer's weight, so in full precision the layer is unchanged; what the rotation buys is an int4
weight and an int8 activation with their outliers spread over each block (QuaRot's online R4, on `down_proj`).
Blocks instead of one transform over the whole input: a tensor-parallel rank holds a contiguous slice of the
input features and can rotate its own blocks without talking to the others.
"""

from __future__ import annotations

import functools

import torch


def is_valid_block(block: int) -> bool:
    return block >= 2 and block & (block - 1) == 0


@functools.cache
def sylvester(order: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j), float32, entries exactly +-1."""
    if not is_valid_block(order) and order != 1:
        raise ValueError(f"a Sylvester Hadamard matrix has a power-of-two order, got {order}")
    i = torch.arange(order)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).float()


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x blockdiag(H_b) / sqrt(b) along the last dimension, in float32 (the oracle)."""
    if x.shape[-1] % block:
        raise ValueError(f"{x.shape[-1]} input features are not a multiple of the Hadamard block {block}")
    h = sylvester(block).to(x.device)
    y = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block) @ h
    return (y / block**0.5).reshape(x.shape)


def kronecker_factors(block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_a, H_c) with H_b = H_a (x) H_c, a <= c: two small +-1 GEMMs cost (a + c) multiply-adds per element
    instead of b for one dense block."""
    if not is_valid_block(block):
        raise ValueError(f"the Hadamard block must be a power of two >= 2, got {block}")
    log = block.bit_length() - 1
    a = 1 << (log // 2)
    return sylvester(a), sylvester(block // a)


def block_hadamard_unscaled(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x blockdiag(H_b) (no 1/sqrt(b): a kernel folds it into its smoothing scale) in x's dtype, with
    H_b = left (x) right from `kronecker_factors`; left and right in x's dtype (+-1 is exact in any of them)."""
    a, c = left.shape[0], right.shape[0]
    shape = x.shape
    blocks = x.numel() // (a * c)
    y = x.reshape(blocks * a, c) @ right  # each block viewed as an a x c matrix X: X H_c
    if a > 1:  # (X H_c)^T H_a = (H_a X H_c)^T, H_a symmetric: one GEMM over every block's columns, transposed back
        y = (y.view(blocks, a, c).transpose(1, 2).reshape(blocks * c, a) @ left).view(blocks, c, a).transpose(1, 2)
    return y.reshape(shape)


def native_hadamard_available(device: torch.device) -> bool:
    """The native CPU extension's butterfly (`torch.ops.aser_cpu.hadamard`) for tensors on this device."""
    if device.type != "cpu":
        return False
    from vllm_aser.kernels.cpu_w4a8 import extension_status

    return extension_status()[0] and hasattr(torch.ops.aser_cpu, "hadamard")

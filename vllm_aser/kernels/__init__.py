"""Kernels for the ASER linear: `reference` (plain torch, the oracle), `cpu` (oneDNN int8), `cuda` (Triton)."""

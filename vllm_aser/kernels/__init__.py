"""Kernels for the ASER linear: `reference` (plain torch, the oracle) and `cpu` (oneDNN int8)."""

"""Equivalence transforms applied before quantization: Hadamard rotations and activation smoothing."""

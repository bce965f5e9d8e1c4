"""Quantizing one linear at a time: int4 weights (RTN, GPTQ), whitening SVD, rank allocation, the layer pipeline, experts, the head."""

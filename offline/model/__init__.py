"""The model being quantized: its structure per family, blocks read from disk one at a time, MoE experts, the device."""

"""aser-quantize: turn a Hugging Face causal LM into an ASER W4A8 model directory. Never imports vLLM."""

__version__ = "0.1.0"

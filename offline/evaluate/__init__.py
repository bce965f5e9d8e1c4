"""Checking the results: the torch reference of the served math, perplexity (reference and vLLM), the eval CLI."""

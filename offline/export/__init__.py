"""Writing the results: the ASER artifact, the compressed-tensors baselines, the report."""

"""What the benchmarks share: the machine line, random-weight models, the peers' worker scripts (run in their own venvs)."""

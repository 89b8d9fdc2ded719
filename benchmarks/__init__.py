"""Benchmarks: `python -m benchmarks` (or `make bench`). Figures are printed as
ratios to a baseline measured in the same run, because these machines are noisy."""

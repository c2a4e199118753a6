"""Timing scripts (run from the checkout root as ``python -m benchmarks.<name>``)."""

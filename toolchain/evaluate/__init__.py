"""Evaluation stages: accuracy of every variant on the whole eval split, and latency benchmarks."""

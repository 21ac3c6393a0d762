"""Benchmark scripts (run each as ``python benchmarks/<name>.py``) and the few helpers they share."""

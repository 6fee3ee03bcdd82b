"""Benchmarks (`python -m dist_sae.bench.<name>`), each writing JSON."""

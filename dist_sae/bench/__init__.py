"""Benchmarks: each module has main(argv) that writes JSON (python -m dist_sae.bench.<name>)."""

"""Benchmarks of dist_sae, each a module with main(argv) that writes JSON."""

"""Benchmarks: each module has a main(argv) that prints (and optionally writes) JSON."""

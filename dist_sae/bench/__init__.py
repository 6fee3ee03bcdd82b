"""The performance suite (`dist-sae bench`): dist_sae against its ceilings and a NumPy/SciPy peer.

    suite        run_suite, the targets, the command line (main)
    table        every figure against its target, and the tables behind them (bench.md)
    parts        the benchmark modules below run as child processes of the suite, per --size
    timing       interleaved repetitions, medians, the log line
    child        running a module of this package in a fresh interpreter, its JSON line back
    synthetic    the synthetic datasets, and a whole dataset read into memory
    compute      streamed vs in-memory, two-pass / one-pass vs pass 2, threads (PlainTorch)
    ray_bench    Ray with W workers vs the single-process engine; the scaling model's terms
    exercise     the notes' exercise through `dist-sae train` (private Ray, --address, --local) and the demo vs the peer
    gemm         the streaming 784-1024 float32 evaluation's FLOP/s over torch's GEMM rate
    peer         the NumPy + SciPy peer (`python -m dist_sae.bench.peer`)
    ray_startup  Ray start-up alone (`python -m dist_sae.bench.ray_startup`)
    rss          the suite's memory ratios: peak RSS from outside the process tree at 1x, 16x, 64x rows
    rss_tree     its /proc sampler of `dist-sae evaluate` on a local Ray (`scripts/bench_memory.py`)

Kept free of imports here: the child processes import this package, and the peer's must not load torch.
"""

"""GEMM fraction: the streaming 784-1024-784 float32 exact evaluation against the machine's GEMM rate.

    gemm_fraction_784          FLOP/s of the engine's two-pass evaluation / the float32 GEMM rate
    gemm_fraction_784_onepass  the same for the one-pass evaluation (sparsity.passes=1)

The evaluation is the single-process engine streaming HDF5 (data.cache_mb=0) in float32. Its FLOPs
are those of the GEMMs it does, per block of B rows, with n = 784 visible and h = 1024 hidden units:

    forward     X W1ᵀ (B×n · n×h) and A1 W2ᵀ (B×h · h×n)                      2 · 2Bnh
    backward    ∇W2 = δ2ᵀ A1, δ1 = δ2 W2, ∇W1 = δ1ᵀ X                          3 · 2Bnh
    two-pass    pass 1 (layer 1's forward, for ρ̂) + pass 2 (forward + backward)  12 Bnh
    one-pass    forward + backward, and S_W = f′(Z1)ᵀ X stacked with ∇W1 (the KL
                gradient's data term, needed before ρ̂ is known: one more 2Bnh)   12 Bnh

(biases, element-wise work and the float64 sums are not counted: they are what the fraction
leaves out). The rate is the same GEMMs timed alone with torch.matmul on float32 tensors of those
shapes, at the evaluation's unit rows and the same torch thread count, interleaved with the
evaluations round by round so load falls on both alike.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from dist_sae.bench.compute import bench_config
from dist_sae.bench.timing import interleaved, med, summary
from dist_sae.session import initial_theta
from dist_sae.train.problem import PassProblem, local_problem
from dist_sae.train.units import TORCH_DEFAULT_THREADS


def gemm_shapes(rows: int, n: int, h: int, onepass: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of every GEMM of one evaluation's block of `rows` rows, as the module docstring counts them."""
    forward = [(rows, n, h), (rows, h, n)]
    backward = [(n, rows, h), (rows, n, h)]  # ∇W2 (n×B · B×h), δ1 (B×n · n×h)
    if onepass:
        return forward + backward + [(2 * h, rows, n)]  # [δ1 | f′(Z1)]ᵀ X: ∇W1 and S_W in one matmul
    return [(rows, n, h)] + forward + backward + [(h, rows, n)]  # pass 1's X W1ᵀ, then pass 2 (∇W1 = δ1ᵀ X)


def flops(shapes: list[tuple[int, int, int]]) -> float:
    return float(sum(2 * m * k * n for m, k, n in shapes))


class Gemms:
    """The GEMMs of one evaluation (every unit's shapes), on float32 tensors made once: call to run them all."""

    def __init__(self, unit_rows: list[int], n: int, h: int, onepass: bool, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ops, self.flops = [], 0.0
        for rows, count in Counter(unit_rows).items():
            shapes = gemm_shapes(rows, n, h, onepass)
            self.flops += count * flops(shapes)
            for m, k, nn in shapes:
                a = torch.rand(m, k, generator=gen, dtype=torch.float32)
                b = torch.rand(k, nn, generator=gen, dtype=torch.float32)
                self.ops += [(a, b, torch.empty(m, nn, dtype=torch.float32))] * count

    def __call__(self) -> None:
        for a, b, out in self.ops:
            torch.matmul(a, b, out=out)


def bench_gemm_fraction(path: Path, hidden: int, reps: int, threads: int | None = None) -> dict:
    """The two-pass and one-pass streaming float32 evaluations and their GEMMs alone, interleaved."""
    threads = threads or TORCH_DEFAULT_THREADS
    ds, cfg = bench_config(path, hidden, **{"compute.dtype": "float32", "data.cache_mb": 0, "compute.threads": threads,
                                            "sparsity.passes": 2})
    stream = local_problem(cfg, ds)
    onepass = PassProblem(stream.evaluator, cfg.with_overrides({"sparsity.passes": 1}))
    theta = initial_theta(cfg, None)
    unit_rows = [u.rows for u in stream.units]
    gemms = {"twopass": Gemms(unit_rows, ds.dim, hidden, onepass=False), "onepass": Gemms(unit_rows, ds.dim, hidden, onepass=True)}
    assert torch.get_num_threads() == threads  # the engine set it; the GEMMs run at the same count
    fns = {"eval_twopass": lambda: stream.evaluate(theta), "eval_onepass": lambda: onepass.evaluate(theta),
           "gemm_twopass": gemms["twopass"], "gemm_onepass": gemms["onepass"]}
    try:
        times = interleaved(fns, reps)
    finally:
        stream.evaluator.close()
    m = {k: med(v) for k, v in times.items()}
    out: dict = {"model": f"{ds.dim}-{hidden}-{ds.dim}", "rows": ds.rows, "unit_rows": unit_rows, "dtype": "float32",
                 "torch_threads": threads, "streamed": True, "times": summary(times), "ratios": {}}
    for kind, suffix in (("twopass", ""), ("onepass", "_onepass")):
        rate = gemms[kind].flops / m[f"eval_{kind}"]
        peak = gemms[kind].flops / m[f"gemm_{kind}"]
        out[kind] = {"gflop": gemms[kind].flops / 1e9, "evaluation_gflop_per_s": rate / 1e9, "gemm_gflop_per_s": peak / 1e9}
        out["ratios"][f"gemm_fraction_784{suffix}"] = rate / peak
    return out

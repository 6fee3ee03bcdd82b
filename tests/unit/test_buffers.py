"""Streaming memory does not grow with the data (issue 13, defect 10): streamed blocks and the blocks'
(B, h) intermediates live in a few reused buffers, however many work units run.

Counted (buffers made, bytes a block's compute allocates), never timed or read as RSS:
scripts/bench_memory.py measures RSS from outside the process tree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BufferPool
from dist_sae.sae.backward import Workspace
from dist_sae.sae.blocks import onepass_block, pass1_block, pass2_block
from dist_sae.sae.model import SparseAutoencoder
from dist_sae.sae.objective import Objective
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.passes import STREAM_BUFFERS
from dist_sae.train.problem import local_problem

from util import config, make_dataset, random_rows


def test_buffer_pool_lends_views_and_takes_them_back():
    pool = BufferPool(lambda n: np.empty((n, 3)), capacity=10, keep=2, address=lambda a: a.__array_interface__["data"][0])
    a = pool.take(7)
    assert a.shape == (7, 3) and a.base.shape == (10, 3)  # a view of a buffer of `capacity` rows
    assert pool.give(a) and not pool.give(a)  # back once; a second give is not ours any more
    b = pool.take(10)
    assert np.shares_memory(a, b) and pool.made == 1  # the same buffer again
    big = pool.take(12)  # more rows than the capacity: a buffer of its own
    assert big.shape == (12, 3) and pool.made == 2
    assert not pool.give(np.empty((4, 3)))  # never lent: ignored
    for _ in range(100):  # views never given back are forgotten, not kept alive by the pool
        pool.take(5)
    assert len(pool._lent) <= 4 * pool.keep


@pytest.mark.parametrize("lanes", [1, 5])
def test_streaming_reuses_a_bounded_set_of_buffers_however_many_units(tmp_path, lanes):
    """float32 rows, float64 compute, tapered units of uneven rows over 5 shards: the read and the
    converted buffers are taken back after every block, so a handful serve 60+ units, also with
    several lanes computing at once; the result equals the cached evaluation's bit for bit."""
    make_dataset(tmp_path / "d", random_rows(3000, 6, seed=1), shard_rows=650, dtype="float32")
    ds = Dataset.open(tmp_path / "d")
    results = {}
    for cache_mb in (0, 512):
        cfg = bind_dataset(config(tmp_path / "d", model__hidden=[4], data__block_rows=48, data__cache_mb=cache_mb,
                                  compute__lanes=lanes), ds)
        problem = local_problem(cfg, ds)
        theta = initial_theta(cfg, None)
        try:
            results[cache_mb] = [problem.evaluate(theta), problem.evaluate(theta)]
            first = problem.evaluator.buffers_made()
            problem.evaluate(theta), problem.evaluate(theta)
            made = problem.evaluator.buffers_made()
            if lanes == 1:  # one block in flight: no new buffer once the first passes ran
                assert made == first
            # With several lanes, how many blocks are lent at once depends on timing; the bound below holds however many.
        finally:
            problem.evaluator.close()
        if cache_mb == 0:
            units = problem.units
            assert len(units) > 60 and len({u.rows for u in units}) > 2
            keep = cfg.data.prefetch + STREAM_BUFFERS * lanes
            assert 1 <= made["read"] <= keep and 1 <= made["converted"] <= keep, made
            # one per intermediate (7 for one hidden layer) and lane, not per block
            assert 1 <= made["workspace"] <= 8 * lanes, made
    for a, b in zip(results[0], results[512]):
        assert a.loss == b.loss and np.array_equal(a.grad, b.grad)


def _block_model(hidden, kind="kl"):
    cfg = load_config(None, {"model.visible": 16, "model.hidden": hidden, "sparsity.kind": kind})
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(3)
    return model, Objective.from_config(cfg)


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.self_cpu_memory_usage for e in prof.events()] + [0])


def test_block_intermediates_go_into_the_workspace_and_give_the_same_bits():
    """With a warm workspace a block allocates nothing of its size (B x h), only θ-sized sums,
    for blocks of fewer rows than the workspace holds; the sums equal those of fresh tensors."""
    model, obj = _block_model([12])
    g = [torch.full((12,), 0.25, dtype=torch.float64)]
    rng = np.random.default_rng(0)
    ws = Workspace(512)
    blocks = {
        "pass1": lambda x, x_in, w: pass1_block(model, x, w),
        "pass2": lambda x, x_in, w: pass2_block(model, obj, x, g, ws=w),
        "pass2_denoising": lambda x, x_in, w: pass2_block(model, obj, x, g, x_in, ws=w),
        "onepass": lambda x, x_in, w: onepass_block(model, obj, x, ws=w),
    }
    warm = torch.as_tensor(rng.random((512, 16)))
    for run in blocks.values():
        run(warm, warm * 0.5, ws)
    made = ws.made
    for rows in (300, 512, 411):
        x = torch.as_tensor(rng.random((rows, 16)))
        x_in = x * 0.5
        smallest_block_tensor = rows * 12 * 8  # (B, h1) float64
        for name, run in blocks.items():
            fresh, reused = run(x, x_in, None), run(x, x_in, ws)
            assert fresh.keys() == reused.keys()
            for key in fresh:
                assert np.array_equal(fresh[key], reused[key]), (name, key)
            assert _largest_allocation(lambda: run(x, x_in, None)) >= smallest_block_tensor  # the check sees them
            assert _largest_allocation(lambda: run(x, x_in, ws)) < smallest_block_tensor / 2, name
    assert ws.made == made  # no buffer grew or was added after the first block


def test_l1_and_two_layer_blocks_give_the_same_bits_with_a_workspace():
    rng = np.random.default_rng(1)
    for hidden, kind in (([12, 5], "kl"), ([12], "l1"), ([12, 5], "none")):
        model, obj = _block_model(hidden, kind)
        g = [torch.full((12,), 0.1, dtype=torch.float64)] if kind == "kl" else None
        ws = Workspace(64)
        for rows in (64, 33, 64):
            x = torch.as_tensor(rng.random((rows, 16)))
            for fresh, reused in ((pass2_block(model, obj, x, g), pass2_block(model, obj, x, g, ws=ws)),
                                  (pass1_block(model, x), pass1_block(model, x, ws))):
                for key in fresh:
                    assert np.array_equal(fresh[key], reused[key]), (hidden, kind, key)


def test_the_memory_benchmark_samples_the_whole_process_tree_from_outside():
    """rss_tree's sampler sees a grandchild's memory (as a Ray worker's, under the evaluate command)."""
    import sys

    from dist_sae.bench.rss_tree import run_sampled

    child = "import time; x = bytearray(150 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.0)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True); print('done')"
    got = run_sampled([sys.executable, "-c", parent], interval=0.05)
    assert got["stdout"].strip() == "done"
    assert got["largest_peak_mb"] >= 150 and "bytearray" in got["largest_process"]  # the grandchild, not the parent
    assert got["tree_peak_mb"] >= got["largest_peak_mb"] + 1  # the parent counted too

"""The apps and data passes on a local Ray: the tiny demo with encode, and the statistics passes as Ray tasks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dist_sae
from dist_sae.apps import demo
from dist_sae.apps.encode import encode_dataset
from dist_sae.cluster import runtime
from dist_sae.data import build as prep
from dist_sae.data.transforms import StepSpec
from dist_sae.report.report import read_metrics
from dist_sae.sections import WorkersConfig

from util import check_report_links, correlated, numpy_zca, read_all

pytestmark = pytest.mark.ray


@pytest.fixture
def sharded(tmp_path):
    x = correlated()
    np.save(tmp_path / "x.npy", x)
    return x, prep.build_from_npy(tmp_path / "x.npy", tmp_path / "raw", options=prep.WriterOptions(shard_rows=700))  # 5 shards


def test_tiny_demo_and_encode_through_ray(tmp_path, ray_session):
    result = demo.run_demo(tmp_path / "demo", patches=600, steps=6, workers=2, quiet=True)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[-1]["J"] < rows[0]["J"] and rows[-1]["workers"] == 2
    # The README's claim: `--local` gives the same numbers as Ray (same blocks, one torch thread per
    # process): every evaluation is bit-identical (tests/cluster/test_cluster.py); over L-BFGS steps
    # the two agree to float64 rounding.
    local = demo.run_demo(tmp_path / "demo-local", patches=600, steps=6, workers=2, local=True, quiet=True)
    np.testing.assert_allclose([r["J"] for r in read_metrics(local.run_dir / "metrics.jsonl")], [r["J"] for r in rows], rtol=1e-12)
    np.testing.assert_allclose(dist_sae.load(local.run_dir).theta.detach().numpy(), dist_sae.load(result.run_dir).theta.detach().numpy(),
                               rtol=1e-9, atol=1e-12)
    assert result.weights.is_file()
    check_report_links(result.page)
    encode_dataset(result.run_dir, result.data_dir, tmp_path / "codes", overrides=["workers.num=2"])
    x = read_all(result.data_dir)
    np.testing.assert_allclose(read_all(tmp_path / "codes"), dist_sae.load(result.run_dir).encode(x), rtol=1e-6)


def test_ray_statistics_equal_local_bit_for_bit(sharded, tmp_path, ray_session):
    from dist_sae.cluster.stats import ray_sums_fn

    x, ds = sharded
    local = prep.transform_dataset(ds.path, tmp_path / "local", [StepSpec("standardize"), StepSpec("zca", 0.1)], prep.WriterOptions(block_rows=256))
    remote = prep.transform_dataset(ds.path, tmp_path / "ray", [StepSpec("standardize"), StepSpec("zca", 0.1)], prep.WriterOptions(block_rows=256), stats=ray_sums_fn)
    np.testing.assert_array_equal(read_all(local.path), read_all(remote.path))
    assert local.fingerprint == remote.fingerprint
    # Blocks larger than the 700-row shards: each shard is still a block of its own on both paths.
    steps, wide = [StepSpec("standardize"), StepSpec("zca", 0.1)], prep.WriterOptions(block_rows=4096)
    assert prep.transform_dataset(ds.path, tmp_path / "local_wide", steps, wide).fingerprint == prep.transform_dataset(
        ds.path, tmp_path / "ray_wide", steps, wide, stats=ray_sums_fn).fingerprint
    # a build with --ray stages the raw rows, runs the passes on Ray, and leaves no staging folder
    built = prep.build_from_npy(tmp_path / "x.npy", tmp_path / "built", preprocessing=[StepSpec("zca", 0.0)], stats=ray_sums_fn, options=prep.WriterOptions(shard_rows=700))
    np.testing.assert_allclose(read_all(built.path), numpy_zca(x, 0.0), atol=1e-10)
    assert not (tmp_path / "built.staging").exists()


def test_connect_while_hands_back_the_work_and_its_error(ray_session):
    threads = []
    state, value = runtime.connect_while(WorkersConfig(), lambda: threads.append(threading.current_thread().name) or 42)
    assert (state, value) == ("existing", 42)  # this process was connected already: left as it is
    assert threads == ["dist-sae-while-ray-starts"]  # the work ran on its own thread

    def fails():
        raise ValueError("no data here")

    with pytest.raises(ValueError, match="no data here"):
        runtime.connect_while(WorkersConfig(), fails)
    assert ray_session.is_initialized()  # not stopped: it was not started for this call

"""`--from webdataset` / `--from parquet` on Ray: 1, 2 and 3 workers give the single-process rows.

Inputs are made by webdataset's TarWriter and Hugging Face `datasets` (tests/producers.py), on local
disk and on the suite's local S3 server; bad records inside are skipped and listed the same way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_sae.commands.main import main
from dist_sae.data import build as prep
from dist_sae.data.parquet import ParquetSource
from dist_sae.data.patches import patch_source
from dist_sae.data.wds import WebDatasetSource
from producers import encoded_images, write_hf_parquet, write_tars
from util import read_all

WORKERS = (1, 2, 3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    images = encoded_images(50, seed=3, size=(20, 16))
    images[7] = images[7][:150]  # a broken JPEG inside a tar
    write_tars(root / "wds", images, 11)  # 5 tars
    for k, start in enumerate(range(0, 50, 20)):
        write_hf_parquet(root / "hf" / f"train-{k:05d}.parquet", images[start:start + 20])
    return root


def same_on_ray(make_source, tmp_path, options=prep.WriterOptions(block_rows=4)):
    from dist_sae.cluster.build import ray_runner

    here = prep.build(make_source(), tmp_path / "here", None, options)
    for n in WORKERS:
        there = prep.build(make_source(), tmp_path / f"ray{n}", None, options, runner=ray_runner(workers=n))
        assert there.fingerprint == here.fingerprint, n
        np.testing.assert_array_equal(read_all(there.path), read_all(here.path))
        assert json.loads((there.path / "dataset.json").read_text())["skipped"] == json.loads((here.path / "dataset.json").read_text())["skipped"]
    return here


def test_tars_and_parquet_on_ray_equal_the_single_process_build(local_s3, ray_session, inputs, tmp_path):  # S3 first: workers inherit its env
    tars = same_on_ray(lambda: WebDatasetSource(str(inputs / "wds"), size=(8, 8)), tmp_path / "wds")
    assert len(tars.shards) == 5 and tars.rows == 49
    hf = same_on_ray(lambda: ParquetSource(str(inputs / "hf"), size=(8, 8)), tmp_path / "hf", prep.WriterOptions(shard_rows=10))
    assert hf.rows == 49 and len(hf.shards) == 3  # one row group per file here: whole groups of 20, 20, 10
    np.testing.assert_array_equal(read_all(hf.path), read_all(tars.path))
    same_on_ray(lambda: patch_source(str(inputs / "wds"), patch=4, count=200, seed=1), tmp_path / "patches")


def test_object_storage_on_ray_with_the_cli(local_s3, ray_session, inputs, tmp_path, capsys):
    bucket = local_s3.create_bucket("dsae-records-ray")
    s3 = local_s3.client()
    for path in sorted((inputs / "wds").iterdir()) + sorted((inputs / "hf").iterdir()):
        s3.upload_file(str(path), "dsae-records-ray", f"{path.parent.name}/{path.name}")
    local = prep.build(WebDatasetSource(str(inputs / "wds")), tmp_path / "local", None)
    for n in WORKERS:
        rc = main(["data", "build", "--from", "webdataset", f"{bucket}/wds/train-{{000000..000004}}.tar", "--out", str(tmp_path / f"s3-{n}"),
                   "--ray", "--workers", str(n), "-q"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert f"fingerprint {local.fingerprint}" in out and out.strip().splitlines()[-1].startswith("skipped 1 record(s)")
    rc = main(["data", "build", "--from", "parquet", f"{bucket}/hf", "--out", str(tmp_path / "pq"), "--ray", "--workers", "2", "-q"])
    assert rc == 0 and read_all(tmp_path / "pq").shape == (49, 320)
    rc = main(["data", "build", "--from", "parquet", f"{bucket}/hf", "--column", "nope", "--out", str(tmp_path / "no"), "--ray", "-q"])
    assert rc == 2 and "column 'nope' does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_a_ray_build_worker_peak_rss_does_not_grow_with_the_tar_or_parquet_file(tmp_path):
    """The benchmark's RSS case on Ray at a small size: `data build --ray --workers 1` (its own
    private Ray), the worker building the one shard sampled from /proc outside it; one tar /
    Parquet file of 300 records against one of 2,400."""
    from dist_sae.bench.build import make_image_folder
    from dist_sae.bench.sources import rss_case
    from dist_sae.data.images import list_images

    files = list_images(make_image_folder(tmp_path / "jpegs", 60, (96, 96)))
    rss = rss_case(files, tmp_path, 300, (16, 16), engines=("ray",))
    for kind in ("webdataset", "parquet"):
        assert rss[kind]["1x"]["ray_worker_peak_rss_mb"] > 50, rss  # the worker was found (torch, Ray: > 50 MB)
        assert rss[kind]["8x"]["input_mb"] > 7 * rss[kind]["1x"]["input_mb"]
        assert rss[kind]["ray_worker_8x_over_1x"] <= 1.15, rss

"""Datasets on object storage, against a real S3 server (moto's standalone server on 127.0.0.1).

Build to s3://, train on it (bit-identical to the local copy), the node-local cache (GETs the server
saw), a corrupted cached shard, LRU eviction, and the bad inputs (one `error:` line, exit 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dist_sae.api import train
from dist_sae.commands.main import main
from dist_sae.data import storage
from dist_sae.data.build import build_synthetic, WriterOptions
from dist_sae.data.dataset import Dataset
from dist_sae.data.reader import BlockReader
from dist_sae.data.workunit import WorkUnit
from dist_sae.errors import DataError, StorageError

from s3util import free_port
from util import config

pytest.importorskip("obstore")

ROWS, DIM, SHARD_ROWS = 12000, 16, 4000


@pytest.fixture(scope="module")
def bucket(local_s3):
    return local_s3.create_bucket("dsae-test")


@pytest.fixture(scope="module")
def remote(bucket, tmp_path_factory):
    """The same synthetic dataset built to s3:// and to a local folder."""
    url = bucket + "/synth"
    build_synthetic(url, rows=ROWS, dim=DIM, options=WriterOptions(shard_rows=SHARD_ROWS, chunk_rows=500))
    local = tmp_path_factory.mktemp("local") / "synth"
    build_synthetic(local, rows=ROWS, dim=DIM, options=WriterOptions(shard_rows=SHARD_ROWS, chunk_rows=500))
    return url, local


def _train(data, out, cache, **kw):
    cfg = config(data, run__out=str(out), model__hidden=[8], optim__steps=4, data__block_rows=2000, data__local_cache=str(cache), **kw)
    return train(cfg)


def test_build_writes_shards_then_the_manifest_and_matches_the_local_build(local_s3, remote):
    url, local = remote
    objects = storage.listing(url)
    ds, ref = Dataset.open(url), Dataset.open(local)
    assert set(objects) == {"dataset.json", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"}
    assert ds.fingerprint == ref.fingerprint and ds.location == url
    assert [objects[s.file] for s in ds.shards] == [s.size for s in ref.shards]
    # dataset.json went up last: the server logged its PUT after every shard's.
    puts = [line for line in local_s3.log_path.read_text().splitlines() if '"PUT /dsae-test/synth/' in line]
    assert "dataset.json" in puts[-1] and sum("shard-" in p for p in puts) == 3


def test_training_on_s3_is_bit_identical_to_the_local_copy_and_the_cache_serves_later_passes(local_s3, remote, tmp_path):
    url, local = remote
    before = local_s3.gets("/synth/shard-")
    on_s3 = _train(url, tmp_path / "s3run", tmp_path / "cache")
    fetched = local_s3.gets("/synth/shard-") - before
    on_disk = _train(local, tmp_path / "localrun", tmp_path / "unused")
    assert np.array_equal(on_s3.theta, on_disk.theta)
    # 4 L-BFGS steps are many passes over 3 shards, yet each shard was fetched once ...
    assert fetched == 3
    # ... and a new run with the same cache fetches none.
    again = _train(url, tmp_path / "s3run2", tmp_path / "cache")
    assert local_s3.gets("/synth/shard-") - before == 3
    assert np.array_equal(again.theta, on_s3.theta)
    saved = json.loads((tmp_path / "s3run" / "config.json").read_text())
    assert saved["data"]["path"] == url


@pytest.mark.parametrize("verify", ["stamp", "hash"])
def test_a_corrupted_cached_shard_is_fetched_again_never_used(local_s3, remote, tmp_path, verify):
    url, local = remote
    cache = storage.ShardCache(tmp_path / "cache", verify=verify)
    unit = WorkUnit.of(0, 1, 0, SHARD_ROWS)
    with BlockReader(Dataset.open(url, cache=cache)) as reader:
        good = reader.read(unit)
    file = cache.local_path(url + "/shard-00001.h5")
    stat = file.stat()
    with open(file, "r+b") as f:  # flip bytes in the middle of the row data, same size
        f.seek(stat.st_size // 2)
        f.write(b"\xff" * 64)
    if verify == "hash":  # bit rot: content changed, size and mtime as before
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = local_s3.gets("/synth/shard-00001.h5")
    fresh = storage.ShardCache(tmp_path / "cache", verify=verify)  # another process
    with BlockReader(Dataset.open(url, cache=fresh)) as reader:
        again = reader.read(unit)
    assert local_s3.gets("/synth/shard-00001.h5") == before + 1
    assert fresh.downloads == 1 and np.array_equal(again, good)
    assert storage.file_sha256(file) == Dataset.open(local).shards[1].file_sha256


def test_the_cache_evicts_the_least_recently_used_shard(remote, tmp_path):
    url, _ = remote
    ds = Dataset.open(url, cache=storage.ShardCache(tmp_path / "c"))
    size = ds.shards[0].size
    ds.cache = storage.ShardCache(tmp_path / "c", max_bytes=2 * size + size // 2, read_ahead=0)
    for i in (0, 1, 0, 2):  # 0 used again after 1: 1 is the least recently used when 2 arrives
        ds.shard_path(i)
    cached = sorted(p.name for p in (tmp_path / "c").rglob("*.h5"))
    assert cached == ["shard-00000.h5", "shard-00002.h5"]


def test_a_shard_that_stays_unreadable_raises_a_storage_error_naming_it(local_s3, bucket, tmp_path):
    url = bucket + "/vanishing"
    build_synthetic(url, rows=4000, dim=8, options=WriterOptions(shard_rows=2000))
    ds = Dataset.open(url, cache=storage.ShardCache(tmp_path / "c"))
    s3 = local_s3.client()
    s3.put_object(Bucket="dsae-test", Key="vanishing/shard-00000.h5", Body=b"not the shard")  # changed under us
    s3.delete_object(Bucket="dsae-test", Key="vanishing/shard-00001.h5")
    before = local_s3.gets("/vanishing/shard-00000.h5")
    with pytest.raises(StorageError, match=r"shard-00000\.h5: got 13 bytes.*after 3 attempts"):
        ds.shard_path(0)
    assert local_s3.gets("/vanishing/shard-00000.h5") - before == 3  # bounded retries, then it gives up
    with pytest.raises(StorageError, match=r"vanishing/shard-00001\.h5 does not exist"):
        ds.shard_path(1)


def _cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case", ["no_bucket", "no_prefix", "no_manifest"])
def test_bad_urls_exit_2_with_one_error_line_before_training(local_s3, bucket, tmp_path, capsys, case):
    if case == "no_manifest":  # an interrupted build: shards, no dataset.json
        local_s3.client().put_object(Bucket="dsae-test", Key="half/shard-00000.h5", Body=b"x")
    url = {"no_bucket": "s3://no-such-bucket/data", "no_prefix": bucket + "/nothing-here", "no_manifest": bucket + "/half"}[case]
    code, err = _cli(["train", "--data", url, "--out", str(tmp_path / "run"), "--local", "optim.steps=1"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and url in err[0]
    assert {"no_bucket": "bucket 'no-such-bucket' does not exist", "no_prefix": "no objects under this prefix",
            "no_manifest": "has no dataset.json"}[case] in err[0]
    assert not (tmp_path / "run").exists()


def test_an_unreachable_endpoint_exits_2_naming_it(tmp_path):
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.run([sys.executable, "-m", "dist_sae", "data", "info", "s3://dsae-test/synth"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the object store at http://127.0.0.1:" in lines[0] and "s3://dsae-test/synth" in lines[0]


def test_data_check_and_info_read_s3(remote, capsys):
    url, _ = remote
    assert main(["data", "check", url]) == 0
    assert capsys.readouterr().out.strip() == f"{url}: OK"
    assert main(["data", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == url and info["rows"] == ROWS


def test_build_refuses_an_existing_dataset_and_sources_read_from_s3(local_s3, remote, bucket, tmp_path):
    url, _ = remote
    with pytest.raises(DataError, match="already holds a dataset"):
        build_synthetic(url, rows=100, dim=4)
    x = np.random.default_rng(0).uniform(size=(300, 6))
    np.save(tmp_path / "x.npy", x)
    storage.put_file(tmp_path / "x.npy", bucket + "/inputs/x.npy")
    from dist_sae.data.build import build_from_npy

    ds = build_from_npy(bucket + "/inputs/x.npy", bucket + "/fromnpy")
    with BlockReader(ds) as reader:
        assert np.array_equal(reader.read(WorkUnit.of(0, 0, 0, 300)), x)


def test_denied_access_exits_2_naming_the_url_and_the_credentials(tmp_path):
    """A moto server that checks IAM after its first 3 actions (a bucket, a user, the user's key):
    the user has no policy, so reading the bucket is denied."""
    from s3util import LocalS3

    server = LocalS3(tmp_path, server_env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        server.client().create_bucket(Bucket="locked")
        iam = server.client("iam")
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        env = {**os.environ, **server.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        proc = subprocess.run([sys.executable, "-m", "dist_sae", "data", "info", "s3://locked/data"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    # moto answers the denied LIST with SignatureDoesNotMatch (boto3 gets the same), a GET with AccessDenied.
    assert "s3://locked/data: access denied (" in lines[0] and "check the credentials" in lines[0]


def test_a_saved_transform_travels_with_an_s3_dataset(bucket, tmp_path):
    from dist_sae.data.transforms import StepSpec, load_transform

    url = bucket + "/standardized"
    build_synthetic(url, rows=3000, dim=8, preprocessing=[StepSpec("standardize")], options=WriterOptions(shard_rows=1000))
    assert "transform.safetensors" in storage.listing(url)
    transform = load_transform(url)  # read from the mirror Dataset.open keeps of the prefix
    local = build_synthetic(tmp_path / "std", rows=3000, dim=8, preprocessing=[StepSpec("standardize")], options=WriterOptions(shard_rows=1000))
    x = np.random.default_rng(1).uniform(size=(5, 8))
    assert np.array_equal(transform.apply(x, dtype=np.float64), load_transform(local.path).apply(x, dtype=np.float64))

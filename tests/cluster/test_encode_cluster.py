"""Encode on Ray: each worker writes the shards it computes. The output equals --local bit for bit for
1, 2 and 3 workers, to a local folder and to the local S3 server; a worker killed mid-run changes
nothing; a stopped encode resumes computing only the missing shards."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import ray

from dist_sae.api import train
from dist_sae.apps.encode import encode_dataset, reconstruct_dataset
from dist_sae.data import storage
from dist_sae.data.dataset import Dataset
from dist_sae.errors import Interrupted

from util import config, make_dataset, random_rows, read_all

pytestmark = pytest.mark.ray
pytest.importorskip("obstore")


@pytest.fixture(scope="module")
def cluster(local_s3, ray_session):
    """The S3 server first, so the Ray workers inherit its endpoint; a 12-16-12 model and 6,000 rows."""
    local_s3.create_bucket("dsae-codes")
    return local_s3


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("encode-ray")
    make_dataset(root / "data", random_rows(6000, 12, seed=3), shard_rows=1500)
    train(config(root / "data", model__hidden=[16], optim__steps=4, run__out=str(root / "run")))
    reference = encode_dataset(root / "run", root / "data", root / "local", local=True, shard_rows=500).dataset
    return root, reference


def _ray(workers: int) -> list[str]:
    return ["workers.engine=ray", f"workers.num={workers}", "data.block_rows=200"]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ray_encode_equals_local_for_any_worker_count(trained, tmp_path, workers):
    root, reference = trained
    got = encode_dataset(root / "run", root / "data", tmp_path / "codes", shard_rows=500, overrides=_ray(workers)).dataset
    assert got.fingerprint == reference.fingerprint and [s.rows for s in got.shards] == [500] * 12
    np.testing.assert_array_equal(read_all(got.path), read_all(reference.path))


def test_ray_reconstruct_equals_local_on_disk_and_on_s3(trained, tmp_path):
    root, _ = trained
    local = reconstruct_dataset(root / "run", root / "data", tmp_path / "local", local=True).dataset
    remote = reconstruct_dataset(root / "run", root / "data", tmp_path / "ray", overrides=_ray(2)).dataset
    assert remote.fingerprint == local.fingerprint and len(remote.shards) == 4
    on_s3 = reconstruct_dataset(root / "run", root / "data", "s3://dsae-codes/recon", overrides=_ray(1)).dataset
    assert on_s3.url == "s3://dsae-codes/recon" and on_s3.fingerprint == local.fingerprint
    np.testing.assert_array_equal(read_all("s3://dsae-codes/recon"), read_all(local.path))


def test_a_worker_killed_mid_run_leaves_the_output_unchanged(trained, tmp_path, caplog):
    root, reference = trained
    known = {a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}

    def kill_worker_0(k, rows):
        if kill_worker_0.done:
            return
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"] == "dist_sae.worker-0" and a["namespace"] not in known:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)  # its shards in flight are lost
                kill_worker_0.done = True
    kill_worker_0.done = False

    with caplog.at_level(logging.WARNING, logger="dist_sae.cluster"):
        got = encode_dataset(root / "run", root / "data", tmp_path / "codes", shard_rows=500, on_shard=kill_worker_0,
                             overrides=[*_ray(2), "workers.max_restarts=5"]).dataset
    assert kill_worker_0.done
    assert any("worker 0" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert got.fingerprint == reference.fingerprint


def test_encode_to_s3_stops_and_resumes_computing_only_the_rest(trained, cluster):
    root, reference = trained
    url = "s3://dsae-codes/codes"

    def stop_after_three(k, rows):
        stop_after_three.seen += 1
        if stop_after_three.seen == 3:
            raise KeyboardInterrupt
    stop_after_three.seen = 0

    with pytest.raises(Interrupted, match=r"of 12 shards are finished in s3://dsae-codes/codes\.partial; resume with: .* --resume"):
        encode_dataset(root / "run", root / "data", url, shard_rows=500, on_shard=stop_after_three, overrides=_ray(2))
    assert "dataset.json" not in storage.listing(url)  # nothing looks like a dataset yet
    finished = sum(n.endswith(".h5.json") for n in storage.listing(url + ".partial"))
    assert finished >= 3  # shards in flight on the other worker may have finished too
    result = encode_dataset(root / "run", root / "data", url, shard_rows=500, resume=True, overrides=_ray(3))
    # (a worker stopped while uploading may still have added a record after the listing above)
    assert result.kept >= finished and result.kept + result.computed == 12
    ds = Dataset.open(url)
    assert ds.fingerprint == reference.fingerprint
    np.testing.assert_array_equal(read_all(url), read_all(reference.path))
    assert storage.listing(url + ".partial") == {}
    assert sorted(storage.listing(url)) == ["dataset.json"] + [f"shard-{k:05d}.h5" for k in range(12)]

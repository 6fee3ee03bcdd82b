"""Training on Ray from an s3:// dataset (moto's standalone server on 127.0.0.1): each worker fetches
shards into its node's cache (under the Ray temp dir), and θ is bit-identical to the local copy's."""

from __future__ import annotations

import numpy as np
import pytest

from dist_sae.api import train
from dist_sae.data.build import build_synthetic, WriterOptions
from dist_sae.errors import TrainingError

from util import config

pytest.importorskip("obstore")


@pytest.fixture(scope="module")
def s3_ray(local_s3, ray_session):
    """The S3 server first, so the Ray workers inherit its endpoint and credentials; bucket dsae-ray."""
    local_s3.create_bucket("dsae-ray")
    return local_s3, ray_session


@pytest.fixture(scope="module")
def datasets(s3_ray, tmp_path_factory):
    server, _ = s3_ray
    url = "s3://dsae-ray/synth"
    build_synthetic(url, rows=8000, dim=12, options=WriterOptions(shard_rows=2000, chunk_rows=250))
    local = tmp_path_factory.mktemp("local") / "synth"
    build_synthetic(local, rows=8000, dim=12, options=WriterOptions(shard_rows=2000, chunk_rows=250))
    return url, local


def _ray_train(data, out, **kw):
    cfg = config(data, run__out=str(out), workers__engine="ray", workers__num=2, workers__unit_timeout_s=60,
                 model__hidden=[6], optim__steps=3, data__block_rows=1000, **kw)
    return train(cfg)


@pytest.mark.ray
def test_ray_training_on_s3_equals_the_local_copy_bit_for_bit(s3_ray, datasets, tmp_path):
    server, ray = s3_ray
    url, local = datasets
    before = server.gets("/synth/shard-")
    on_s3 = _ray_train(url, tmp_path / "s3")
    fetched = server.gets("/synth/shard-") - before
    on_disk = _ray_train(local, tmp_path / "disk")
    assert np.array_equal(on_s3.theta, on_disk.theta)
    # 4 shards, one node: the workers share its cache (a download is locked per shard), so each
    # shard came down once however many passes and workers read it.
    assert fetched == 4
    temp_dir = ray._private.worker._global_node.get_temp_dir_path()
    cached = sorted(p.name for p in (__import__("pathlib").Path(temp_dir) / "dist_sae_cache").rglob("*.h5"))
    assert cached == [f"shard-0000{i}.h5" for i in range(4)]


@pytest.mark.ray
def test_a_shard_gone_from_the_store_fails_units_like_a_worker_fault(s3_ray, tmp_path):
    server, _ = s3_ray
    url = "s3://dsae-ray/gone"
    build_synthetic(url, rows=4000, dim=8, options=WriterOptions(shard_rows=2000))
    s3 = server.client()  # the object changes under the run: same size (the listing check passes), other bytes
    body = bytearray(s3.get_object(Bucket="dsae-ray", Key="gone/shard-00001.h5")["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket="dsae-ray", Key="gone/shard-00001.h5", Body=bytes(body))
    with pytest.raises(TrainingError, match=r"worker \d failed: work unit \d+: s3://dsae-ray/gone/shard-00001\.h5: got .* \(after 3 attempts\)"):
        _ray_train(url, tmp_path / "run", workers__max_restarts=1, data__local_cache=str(tmp_path / "cache"))

"""Shared fixtures: one local Ray per test module, bound to 127.0.0.1, stopped at the module's end.

`ray.init` takes seconds, so the tests of a module share one session and only make (and kill)
actors. Nothing here starts unless a test asks for `ray_session`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Logical CPUs of the test Ray: bookkeeping only (each worker runs one torch thread), enough for
# the sessions a module keeps open at once.
RAY_CPUS = 16


@pytest.fixture(scope="module")
def ray_session():
    """A private local Ray for the module: loopback only, no dashboard, its own temp dir."""
    ray = pytest.importorskip("ray")
    from dist_sae.cluster import runtime

    if ray.is_initialized():  # never share state across modules
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="dsae-ray-", dir="/tmp")  # short path: Ray puts sockets in it
    runtime.start_local(
        num_cpus=RAY_CPUS,
        dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
        # Idle workers Ray starts ahead import the worker module (torch) before an actor needs one.
        _system_config={"preload_python_modules": ["dist_sae.cluster.worker"]},
    )
    try:
        yield ray
    finally:
        runtime.stop_local()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_s3(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 for the module, its endpoint and credentials in the
    environment (so Ray workers started after it inherit them), a private shard cache; all undone at the end."""
    from s3util import LocalS3

    folder = tmp_path_factory.mktemp("s3")
    server = LocalS3(folder)
    saved = {k: os.environ.get(k) for k in [*server.env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "DIST_SAE_CACHE"]}
    os.environ.update(server.env, DIST_SAE_CACHE=str(folder / "cache"))
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def pytest_collection_modifyitems(config, items):
    """tests/cluster/ is the Ray suite: its tests carry the `ray` marker; tests/unit/ never starts Ray."""
    for item in items:
        parts = item.path.parts
        if "cluster" in parts:
            item.add_marker(pytest.mark.ray)
        elif "unit" in parts and "ray_session" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} uses a Ray session: move it to tests/cluster/")

"""runtime.connect_while starting a private Ray of its own (a module of its own: no shared session)."""

from __future__ import annotations

import os

import pytest

from dist_sae.sections import WorkersConfig

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
from dist_sae.cluster import runtime  # noqa: E402  (after the skip: it imports Ray)


def test_connect_while_starts_ray_during_the_work_and_stops_it_on_an_error():
    assert not ray.is_initialized()
    loopback_before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    workers = WorkersConfig(num=1)
    try:
        state, ray_was_up = runtime.connect_while(workers, ray.is_initialized)
        assert state == "started"
        assert ray_was_up is False  # the work ran while Ray was still starting
        assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) >= 1
    finally:
        runtime.stop_local()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == loopback_before  # restored

    def fails():
        raise ValueError("no data here")

    with pytest.raises(ValueError, match="no data here"):
        runtime.connect_while(workers, fails)
    assert not ray.is_initialized()  # the Ray it started for the failed work is stopped

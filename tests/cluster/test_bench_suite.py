"""The benchmark suite end to end at its tiny size: every ratio and target in the JSON, the table written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_sae.bench.suite import run_suite


@pytest.mark.slow
def test_bench_suite_writes_every_ratio(tmp_path):
    """The whole suite at its tiny size (starts Ray twice): the JSON has every ratio and target."""
    report = run_suite(tmp_path / "out", "tiny")
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    for key in ("stream_vs_memory", "twopass_vs_pass2", "onepass_vs_pass2", "ray2_vs_local", "exercise_vs_numpy_peer",
                "rss_16x_vs_1x"):
        assert key in saved["ratios"] and np.isfinite(saved["ratios"][key]), key
        assert key in saved["targets"]
    assert set(report["compute"]) == {"64-25", "784-1024"}
    assert "ray_startup_s" in saved["exercise"] and "J_peer" in saved["exercise"]
    assert (tmp_path / "out" / "bench.md").read_text().startswith("| ratio |")

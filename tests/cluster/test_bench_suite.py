"""The benchmark suite end to end at its tiny size: every ratio and target in the JSON, the table written.

The heaviest child-process parts (each starts Ray or a loopback cluster of its own) are left to
scripts/wheel_check.sh, which runs `dist-sae bench --size tiny` whole; here the suite runs the
cheap ones, and run_part's skip and failure paths are checked with parts of the test's own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_sae.bench.parts import PARTS, Part, missing, run_part
from dist_sae.bench.suite import run_suite

HEAVY = {"minibatch", "build", "sources", "reduce_scaling", "encode"}


@pytest.mark.slow
def test_bench_suite_writes_every_ratio(tmp_path):
    """The suite at its tiny size (Ray twice, a Ray head, the demo): the JSON has every ratio and target."""
    report = run_suite(tmp_path / "out", "tiny", skip=HEAVY)
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    for key in ("stream_vs_memory", "twopass_vs_pass2", "onepass_vs_pass2", "ray2_vs_local", "exercise_ray_vs_peer",
                "exercise_attached_vs_peer", "exercise_local_vs_peer", "exercise_local32_vs_peer", "exercise_J_vs_peer",
                "demo_wall_s", "gemm_fraction_784", "gemm_fraction_784_onepass", "rss_16x_vs_1x",
                "rss_64x_vs_1x", "rss_tree_16x_vs_1x"):
        assert key in saved["ratios"] and np.isfinite(saved["ratios"][key]), key
        assert saved["targets"][key]["target"] is not None and saved["targets"][key]["met"] in (True, False), key
    assert set(report["compute"]) == {"64-25", "784-1024"}
    e = saved["exercise"]
    assert {"peer_1thread", "peer", "ray", "attached", "local", "local32", "demo"} <= set(e["wall_s"])
    assert "ray_startup_s" in e and set(e["J_rel_diff_vs_peer"]) >= {"ray", "attached", "local", "local32"}
    assert 0 < saved["gemm"]["twopass"]["gflop"] and saved["gemm"]["torch_threads"] >= 1
    parts = saved["parts"]
    assert set(parts) == set(PARTS) and all(parts[name] == {"skipped": "--skip"} for name in HEAVY)
    for name, part in parts.items():
        assert "error" not in part, (name, part.get("error"))
        assert "skipped" in part or part["figures"], name  # storage is skipped where moto/obstore are missing
    for key in ("safety_write_s_history_10", "pools_sim_gpu50_wall_over_ideal_after"):
        assert np.isfinite(saved["ratios"][key]) and saved["targets"][key]["target"] is None
    if "skipped" not in parts["storage"]:
        assert saved["targets"]["storage_warm_over_local"]["met"] in (True, False)
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.startswith("| ratio |") and "`exercise_attached_vs_peer` |" in md and "| safety |" in md and "largest process" in md
    assert "`minibatch_exact_vs_batch_512` | — |" in md  # skipped: listed, no value


def test_run_part_reports_a_missing_extra_and_a_failure(tmp_path):
    """A part whose extra is missing is skipped with the reason; one whose module fails is reported, not raised."""
    assert missing(("json", "no_such_module_dsae")) == ["no_such_module_dsae"]
    absent = Part("dist_sae.bench.safety", {"tiny": []}, lambda r: {}, needs=("no_such_module_dsae",))
    assert run_part("x", absent, "tiny", tmp_path) == {"skipped": "needs no_such_module_dsae (not installed)"}
    broken = Part("dist_sae.bench.safety", {"tiny": ["--sizes", "not-a-size"]}, lambda r: {})
    result = run_part("x", broken, "tiny", tmp_path)
    assert "ValueError" in result["error"] and "figures" not in result
    # The minibatch part without its Ray Train peer keeps its dist_sae systems.
    without = PARTS["minibatch"].optional["peer"][1]
    assert without(["--rows", "5", "--systems", "batch,peer-float64,exact"]) == ["--rows", "5", "--systems", "batch,exact"]
    assert without([]) == ["--systems", "batch,batch-onepass,ema,exact"]

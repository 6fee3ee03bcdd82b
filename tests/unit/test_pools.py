"""Mixed worker pools without Ray: the config shape, placement planning, the tapered unit cut, the
dispatcher's end-of-pass rule (on a simulated clock), the pass meter, and the cross-kind guarantee."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dist_sae.bench.pools import cut, simulate
from dist_sae.cluster.dispatch import Dispatcher
from dist_sae.cluster.launcher import WorkerSpec
from dist_sae.cluster.meter import PassBars, PassMeter
from dist_sae.cluster.placement import demand, plan_pools
from dist_sae.config import describe_keys, load_config
from dist_sae.sections import PoolConfig
from dist_sae.data.dataset import Dataset
from dist_sae.data.workunit import WorkUnit, taper_units
from dist_sae.errors import ConfigError
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.passes import PassRunner

from util import config, make_dataset, smooth_patches

MIXED = "workers.pools=[{kind: gpu, num: 0, gpus: 1, cpus: 4}, {kind: cpu, num: 0, cpus: 1}]"


def test_pools_config_shape_and_validation():
    pools = load_config(None, [MIXED]).workers.pools
    assert [(p.kind, p.num, p.cpus, p.gpu_share, p.gpu_resource) for p in pools] == [("gpu", 0, 4.0, 1.0, "GPU"), ("cpu", 0, 1.0, 0.0, "GPU")]
    assert demand(pools[0]) == {"CPU": 4.0, "GPU": 1.0} and demand(pools[1]) == {"CPU": 1.0}
    assert load_config(None, ["workers.num=3", "workers.gpus_per_worker=0.5"]).workers.pools == []  # the plain keys still work
    assert "workers.pools" in [key for key, _, _ in describe_keys()]
    bad = {
        "a cpu pool reserves no GPUs": ["workers.pools=[{kind: cpu, gpus: 1}]"],
        "a gpu pool needs gpus > 0": ["workers.pools=[{kind: gpu, gpus: 0}]"],
        "not both": ["workers.num=2", "workers.pools=[{kind: cpu}]"],
        "cannot run a cpu pool": ["compute.device=cuda", "workers.pools=[{kind: cpu}]"],
        "unknown key": ["workers.pools=[{kind: cpu, cores: 2}]"],
    }
    for message, overrides in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_plan_packs_gpu_pool_first_and_does_not_count_its_cpus_twice(caplog):
    gpu, cpu = PoolConfig(kind="gpu", cpus=4), PoolConfig(kind="cpu")
    nodes = [{"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}]  # cluster.yaml-like: a CPU node and a 1-GPU node
    assert plan_pools([gpu, cpu], nodes) == [1, 20]  # 8 - 4 CPUs left on the GPU node, + 16
    assert plan_pools([PoolConfig(kind="gpu", gpus=0.5, cpus=2), cpu], nodes) == [2, 20]
    with pytest.raises(ConfigError, match=r"workers.pools\[0\] \(kind gpu, 4 CPU, 1 GPU per worker\) cannot be placed"):
        plan_pools([gpu, cpu], [{"CPU": 16.0}])
    with pytest.raises(ConfigError, match=r"pools\[1\].*cannot be placed.*lower the pool's cpus"):
        plan_pools([cpu, PoolConfig(cpus=32)], nodes)
    with pytest.raises(ConfigError, match=r"pools\[1\].*num 0 gets no worker"):
        plan_pools([PoolConfig(), PoolConfig()], nodes)
    # An explicit num beyond today's room is kept (an autoscaler may add nodes), with a warning.
    with caplog.at_level(logging.WARNING):
        assert plan_pools([PoolConfig(num=30)], nodes) == [30]
    assert "room for 24 now" in caplog.text


def test_worker_spec_of_pool_real_and_custom_gpu_resource():
    real = WorkerSpec.of_pool(PoolConfig(kind="gpu", cpus=4))
    assert (real.num_cpus, real.num_gpus, real.resources, real.kind) == (4.0, 1.0, {}, "gpu")
    fake = WorkerSpec.of_pool(PoolConfig(kind="gpu", gpu_resource="fake_gpu"))
    # Placed by the custom resource, but Ray assigns it no GPU: it computes on the CPU.
    assert (fake.num_gpus, fake.resources, fake.kind) == (0.0, {"fake_gpu": 1.0}, "gpu")
    assert WorkerSpec.of_pool(PoolConfig()).kind == "cpu"


def test_taper_cuts_from_the_data_only(tmp_path):
    units = cut(40 * 16384, 16384)
    tapered = taper_units(units, chunk=64)
    assert [u.id for u in tapered] == list(range(len(tapered)))
    assert all(a.spans[-1].stop == b.spans[0].start for a, b in zip(tapered, tapered[1:]))
    assert tapered[-1].spans[-1].stop == units[-1].spans[-1].stop
    sizes = [u.rows for u in tapered]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) == 4096 and sizes[0] == 16384
    assert sum(s == 16384 for s in sizes) == 20 and sizes.count(8192) == 20  # first half whole, next quarter halved
    assert all(u.spans[0].start % 64 == 0 for u in tapered)
    assert taper_units(units[:3]) == units[:3]  # a pass too small to taper
    assert [u.rows for u in taper_units([WorkUnit.of(0, 0, 0, 5000)] * 4)] == [5000] * 4  # never under MIN_UNIT_ROWS
    make_dataset(tmp_path / "d", np.random.default_rng(1).uniform(size=(40000, 8)), shard_rows=8192)
    ds = Dataset.open(tmp_path / "d")
    assert ds.units(8192, taper=True) == ds.units(8192, taper=True)
    assert len(ds.units(8192, taper=True)) > len(ds.units(8192))
    assert sum(u.rows for u in ds.units(8192, taper=True)) == ds.rows


def test_dispatcher_sends_slow_workers_to_the_small_units_at_the_back():
    units = taper_units(cut(200 * 4096, 16384))
    rows = {u.id: u.rows for u in units}
    rates = {0: 50.0e6, 1: 1.0e6}  # a GPU and a CPU worker
    d = Dispatcher(list(rows), [0, 1], 2, rows=rows, rates=rates)
    sent = d.assign(now=0.0)
    assert [w for w, _ in sent].count(0) == 2
    assert [uid for w, uid in sent if w == 1] == [len(units) - 1, len(units) - 2]  # the CPU takes the smallest, last units
    # Near the end, a unit the GPU would get through sooner is left to it: the CPU waits.
    few = {0: 16384, 1: 16384, 2: 16384}
    d = Dispatcher(list(few), [0, 1], 2, rows=few, rates=rates)
    assert [w for w, _ in d.assign(now=0.0)] == [0, 0]
    d.complete(0, 0)
    assert d.assign() == [(0, 2)]
    # Without rates (the first pass) the policy is plain on demand: lowest ids, round robin.
    plain = Dispatcher(list(rows), [0, 1], 2, rows=rows, rates={})
    assert plain.assign(now=0.0) == [(0, 0), (1, 1), (0, 2), (1, 3)]


def test_dispatcher_rule_never_loses_a_unit_and_cuts_the_mixed_pool_tail():
    speeds = [3.0e6] + [60e3] * 16  # 1 GPU at 50 one-core workers' speed + 16 CPU workers
    before = simulate(speeds, cut(1_000_000, 16384), balance=False)
    after = simulate(speeds, taper_units(cut(1_000_000, 16384)), balance=True)
    assert after["wall"] < 0.7 * before["wall"] and after["tail"] < 0.5 * before["tail"]
    homogeneous = [60e3] * 16
    assert simulate(homogeneous, taper_units(cut(1_000_000, 16384)), balance=True)["wall"] <= 1.01 * simulate(
        homogeneous, cut(1_000_000, 16384), balance=False)["wall"]
    # Every unit exactly once, with a worker dying mid-pass under the rule.
    units = taper_units(cut(300_000, 16384))
    rows = {u.id: u.rows for u in units}
    d = Dispatcher(list(rows), [0, 1, 2], 2, rows=rows, rates={0: 1e6, 1: 1e5, 2: 1e5})
    done, step = [], 0
    while not d.done:
        for w in list(d.workers):
            if step == 3 and w == 0:
                d.worker_failed(0)
            status = d.workers[w]
            if status.alive and status.in_flight:
                uid = min(status.in_flight)
                d.complete(w, uid)
                done.append(uid)
        d.assign()
        step += 1
        assert step < 1000
    assert sorted(done) == sorted(rows)


def test_pass_meter_and_bars():
    meter = PassMeter()
    meter.start("pass2", 300, workers=2)
    meter.busy(2, 2)
    meter.done("gpu", 200)
    meter.busy(1, 2, queued=3)  # a worker waits while units are queued: not yet the tail
    assert meter._first_idle is None
    meter.busy(1, 2)  # a worker idle, nothing left to hand out: the tail starts
    meter.done("cpu", 100)
    snap = meter.snapshot()
    assert (snap["seq"], snap["kind"], snap["done"], snap["busy"], snap["running"]) == (1, "pass2", 300, 1, True)
    stats = meter.finish()
    assert set(stats) == {"tail_s", "rows_per_s_cpu", "rows_per_s_gpu"} and stats["rows_per_s_gpu"] == 2 * stats["rows_per_s_cpu"]
    assert stats["tail_s"] >= 0 and not meter.snapshot()["running"]

    class Bar:
        def __init__(self, kind, rows):
            self.kind, self.rows, self.n, self.postfix, self.closed = kind, rows, 0, "", False
            made.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def close(self):
            self.closed = True

    made: list[Bar] = []
    bars = PassBars(lambda: {}, Bar)
    bars.show({"seq": 7, "kind": "pass2", "rows": 10, "done": 10, "busy": 0, "workers": 3, "running": False})  # the last step's
    bars.show({"seq": 8, "kind": "pass1", "rows": 10, "done": 4, "busy": 2, "workers": 3, "running": True})
    bars.show({"seq": 8, "kind": "pass1", "rows": 10, "done": 10, "busy": 1, "workers": 3, "running": False})
    bars.show({"seq": 9, "kind": "pass2", "rows": 10, "done": 5, "busy": 3, "workers": 3, "running": True})
    bars.__exit__(None, None, None)
    assert [(b.kind, b.n, b.closed) for b in made] == [("pass1", 10, True), ("pass2", 5, True)]
    assert made[0].postfix == "1/3 workers busy"
    with PassBars(lambda: {}, None) as quiet:  # no bars (off a terminal): no thread, no polls
        assert quiet._thread is None


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "d"
    make_dataset(path, smooth_patches(600, seed=4), shard_rows=200)
    ds = Dataset.open(path)
    cfgs = {dt: bind_dataset(config(path, model__hidden=[7], compute__dtype=dt), ds) for dt in ("float64", "float32")}
    return ds, cfgs


def _unit_sums(cfg, ds, device="cpu"):
    runner = PassRunner(cfg, ds, device, threads=1)
    runner.set_theta(initial_theta(cfg, None))
    return [runner.run_unit("pass1", u) for u in ds.units(100)]


def test_unit_sums_same_kind_bit_identical_and_float32_within_its_rounding(runners):
    ds, cfgs = runners
    a, b = _unit_sums(cfgs["float64"], ds), _unit_sums(cfgs["float64"], ds)
    assert all(np.array_equal(x["act"], y["act"]) for x, y in zip(a, b))  # two workers of one kind: same bits
    # Any float32 computation of a unit (a CPU's or a GPU's) lies within float32 rounding of its exact
    # sums; so a unit's sums from two kinds differ by at most twice that, and the pass's float64 sum
    # (added in unit order) by at most the sum over units.
    f32 = _unit_sums(cfgs["float32"], ds)
    for x, y in zip(a, f32):
        assert y["act"].dtype == np.float64
        assert np.max(np.abs(x["act"] - y["act"]) / np.maximum(np.abs(x["act"]), 1e-30)) < 100 * np.finfo(np.float32).eps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unit_sums_cpu_vs_cuda(runners):
    ds, cfgs = runners
    for dtype, bound in (("float64", 1e-12), ("float32", 1e-5)):
        cpu, gpu = _unit_sums(cfgs[dtype], ds), _unit_sums(cfgs[dtype], ds, "cuda")
        for x, y in zip(cpu, gpu):
            assert np.max(np.abs(x["act"] - y["act"]) / np.maximum(np.abs(x["act"]), 1e-30)) < bound

"""The Ray layer against the single-process engine (docs/maths.md §4).

Pure parts (dispatch policy, placement rules, the plain Worker class) run without Ray; the rest
shares one local Ray per module (`ray_session`, tests/conftest.py), bound to 127.0.0.1.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

from dist_sae.session import LocalSession, initial_theta
from dist_sae.api import train
from dist_sae.data.dataset import DATASET_KEY, Dataset
from dist_sae.data.workunit import WorkUnit
from dist_sae.train.codes import CodeJob
from dist_sae.train.passes import PassRunner
from dist_sae.train.problem import LocalEvaluator, PassProblem, local_problem
from dist_sae.train.inputs import bind_dataset
from dist_sae.errors import ConfigError, DataError
from dist_sae.cluster.dispatch import Dispatcher, UnitState
from dist_sae.cluster.ray_session import ClusterSession, check_placement, worker_count
from dist_sae.cluster.launcher import WorkerSpec
from dist_sae.cluster.worker import Worker
from dist_sae.sae.sums import OrderedReducer

from util import config, make_dataset, random_rows, smooth_patches

RTOL = 1e-12


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """1,000 rows of 8×8 patches in shards of 333, 333, 333 and 1 rows: units of uneven size."""
    path = tmp_path_factory.mktemp("cluster") / "d"
    make_dataset(path, smooth_patches(1000, seed=5), shard_rows=333)
    return path


def ray_config(path, **overrides):
    items = {"model__hidden": [6], "data__block_rows": 40, "workers__engine": "ray", "sparsity__beta": 3.0,
             "workers__unit_timeout_s": 60}
    items.update(overrides)
    cfg = config(path, **items)
    return bind_dataset(cfg, Dataset.open(path))


# ---- pure policy: no Ray -----------------------------------------------------------------


def test_dispatcher_is_on_demand_and_keeps_depth_in_flight():
    d = Dispatcher(list(range(10)), [0, 1], depth=2)
    first = d.assign()
    assert first == [(0, 0), (1, 1), (0, 2), (1, 3)]  # spread over workers, `depth` each
    assert d.assign() == []  # every slot is busy
    d.complete(1, 1)
    assert d.assign() == [(1, 4)]  # the slot that freed gets the next unit
    d.complete(1, 3)
    d.complete(1, 4)
    assert d.assign() == [(1, 5), (1, 6)]  # a fast worker takes more
    assert d.counts() == {0: 0, 1: 3}


def test_dispatcher_requeues_a_dead_workers_units_and_rejects_duplicates():
    d = Dispatcher([3, 7, 9], [0, 1], depth=1)
    assert d.assign() == [(0, 3), (1, 7)]
    assert d.worker_failed(0) == [3]
    assert d.units[3].state is UnitState.QUEUED
    assert d.assign() == []  # worker 1 is busy; worker 0 is dead
    d.complete(1, 7)
    assert d.assign() == [(1, 3)]  # the lost unit goes first
    with pytest.raises(RuntimeError):
        d.complete(0, 3)  # a result from the dead worker is not counted
    d.complete(1, 3)
    assert d.assign() == [(1, 9)]
    d.complete(1, 9)
    assert d.done and d.units[3].attempts == 2
    with pytest.raises(RuntimeError):
        d.complete(1, 9)  # counted once


def test_dispatcher_prefers_the_worker_that_cached_a_unit_and_still_balances():
    affinity = {0: 1, 1: 0, 2: 1, 3: 0, 4: 1, 5: 0}
    d = Dispatcher(list(range(6)), [0, 1], depth=1, affinity=affinity)
    assert d.assign() == [(0, 1), (1, 0)]  # each its own lowest unit
    d.complete(1, 0)
    assert d.assign() == [(1, 2)]
    d.complete(1, 2)
    assert d.assign() == [(1, 4)]
    d.complete(1, 4)
    assert d.assign() == [(1, 3)]  # worker 1 ran out of its own units: it helps worker 0
    d.worker_failed(0)  # worker 0's units (in flight and cached) become anyone's
    assert d.units[1].state is UnitState.QUEUED
    d.complete(1, 3)
    assert d.assign() == [(1, 1)]


def test_dispatcher_stalls_without_live_workers():
    d = Dispatcher([0], [0])
    d.assign()
    d.worker_failed(0)
    assert d.stalled() and d.assign() == []


def test_worker_count_and_gpu_placement_rules(data):
    cfg = ray_config(data)
    assert worker_count(cfg.workers, {"CPU": 8.0}) == 8
    assert worker_count(cfg.with_overrides({"workers.cpus_per_worker": 2}).workers, {"CPU": 8.0}) == 4
    assert worker_count(cfg.with_overrides({"workers.num": 3}).workers, {"CPU": 8.0}) == 3
    assert worker_count(cfg.with_overrides({"workers.gpus_per_worker": 1}).workers, {"CPU": 8.0, "GPU": 2.0}) == 2
    with pytest.raises(ConfigError, match="gpus_per_worker=1 but the Ray cluster has 0 GPU"):
        check_placement(cfg.with_overrides({"workers.gpus_per_worker": 1}), {"CPU": 8.0})
    with pytest.raises(ConfigError, match="compute.device=cuda"):
        check_placement(cfg.with_overrides({"compute.device": "cuda"}), {"CPU": 8.0})


def test_plain_worker_matches_the_pass_runner_without_ray(data, tmp_path):
    cfg = ray_config(data)
    ds = Dataset.open(data)
    theta = initial_theta(cfg, None)
    worker = Worker(cfg.model_dump(), str(data), index=0, gpus=0.0)
    assert worker.info()["device"] == "cpu"  # no GPU assigned: CPU
    runner = PassRunner(cfg, ds)
    runner.set_theta(theta)
    unit = ds.units(cfg.data.block_rows)[3]
    uid, sums, stats = worker.run("pass1", unit.flat(), "k", theta)
    expected = runner.run_unit("pass1", unit)
    assert uid == unit.id and set(stats) >= {"read_s", "compute_s"}
    for key in expected:
        np.testing.assert_array_equal(sums[key], expected[key])
    # Encode: the worker stores the unit's codes as output shard 0 of a partial folder.
    folder = tmp_path / "codes.partial"
    folder.mkdir()
    job = CodeJob("encode", 1, 6, "float64", str(folder))
    info = worker.write_codes(job, 0, [unit.flat()], "k", theta)
    assert (info["file"], info["rows"]) == ("shard-00000.h5", unit.rows)
    with h5py.File(folder / info["file"], "r") as f:
        np.testing.assert_array_equal(f[DATASET_KEY][:], runner.transform("encode", runner.load(unit), 1))
    worker.close()
    runner.close()


@pytest.mark.ray
def test_ray_training_equals_local_bit_for_bit_on_blocks_where_gemms_thread(ray_session, tmp_path):
    """Blocks of 1,000 rows: products large enough that MKL threads them where a thread allows it.
    The worker's Ray pool threads once kept the process's starting thread count (every core),
    so θ changed in the last bit from run to run; each call now sets its own thread's count."""
    make_dataset(tmp_path / "d", random_rows(8000, 12, seed=4), shard_rows=2000, dtype="float32")
    thetas = []
    for i, (engine, workers) in enumerate([("local", 1), ("ray", 1), ("ray", 2), ("ray", 2)]):
        cfg = config(tmp_path / "d", run__out=str(tmp_path / f"run{i}"), workers__engine=engine, workers__num=workers,
                     workers__unit_timeout_s=60, model__hidden=[6], optim__steps=3, data__block_rows=1000)
        thetas.append(train(cfg).theta)
    assert all(np.array_equal(theta, thetas[0]) for theta in thetas[1:]), [float(np.abs(t - thetas[0]).max()) for t in thetas]


def test_plain_worker_on_two_threads_reuses_a_few_buffers_and_sums_as_the_runner(tmp_path):
    """As a Ray actor with max_concurrency=2 runs it (one call reads while the other computes): every
    block's buffers are taken back, so a few serve all the units, and no reuse corrupts a block."""
    make_dataset(tmp_path / "d", random_rows(2000, 6, seed=2), shard_rows=450, dtype="float32")
    ds = Dataset.open(tmp_path / "d")
    cfg = bind_dataset(config(tmp_path / "d", model__hidden=[4], data__block_rows=40, data__cache_mb=0), ds)
    theta = initial_theta(cfg, None)
    units = ds.units(cfg.data.block_rows, taper=True)
    worker = Worker(cfg.model_dump(), str(tmp_path / "d"))
    local = LocalEvaluator(PassRunner(cfg, ds))
    try:
        with ThreadPoolExecutor(2) as pool:
            got = dict(r[:2] for r in pool.map(lambda u: worker.run("pass1", u.flat(), "k", theta), units))
        want, _ = local.run("pass1", theta, units)
        reducer = OrderedReducer([u.id for u in units])
        for uid, sums in got.items():
            reducer.add(uid, sums)
        for key in want:
            np.testing.assert_array_equal(reducer.total[key], want[key])
        made = worker.info()["buffers"]
        assert len(units) > 50 and made["read"] <= 4 and made["converted"] <= 4, made
    finally:
        worker.close()
        local.close()


# ---- on Ray --------------------------------------------------------------------------------
# Starting a worker costs a process that imports torch (~2 s here), so tests share sessions by
# (workers, worker specs); a session's PassProblem is rebuilt when a test needs another config
# with the same worker-side maths (e.g. sparsity.passes).


@pytest.fixture(scope="module")
def sessions(ray_session, data):
    """get(num_workers, specs=None, **config overrides) -> a ClusterSession, cached for the module."""
    cache: dict[str, ClusterSession] = {}
    ds = Dataset.open(data)

    def get(num: int, specs: tuple[WorkerSpec, ...] | None = None, **overrides) -> ClusterSession:
        cfg = ray_config(data, workers__num=num, **overrides)
        key = json.dumps([cfg.model_dump(), repr(specs)], sort_keys=True)
        if key not in cache:
            cache[key] = ClusterSession(cfg, ds, worker_specs=list(specs) if specs else None)
        return cache[key]

    yield get
    for session in cache.values():
        session.close()


@pytest.fixture(scope="module")
def lbfgs_reference(data):
    """θ after 5 single-process L-BFGS steps (and the J of each step), computed once."""
    cfg = ray_config(data).with_overrides({"workers.engine": "local"})
    local = LocalSession(cfg, Dataset.open(data))
    try:
        trainer = local.stepper(initial_theta(cfg, None))
        losses = [trainer.step()["J"] for _ in range(5)]
        return trainer.state_dict()["theta"].numpy(), losses
    finally:
        local.close()


@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ray_equals_single_process(sessions, data, lbfgs_reference, workers):
    session = sessions(workers)
    cfg, ds = session.cfg, Dataset.open(data)
    theta0 = initial_theta(cfg, None)
    ref = local_problem(cfg, ds).evaluate(theta0)
    assert session.num_workers == workers
    ev = session.problem.evaluate(theta0)
    assert abs(ev.loss - ref.loss) <= RTOL * abs(ref.loss)
    assert rel(ev.grad, ref.grad) <= RTOL
    assert ev.rows == ds.rows
    for a, b in zip(ev.layer_means, ref.layer_means):
        assert rel(a, b) <= RTOL

    theta_ref, losses_ref = lbfgs_reference
    remote = session.stepper(theta0)  # L-BFGS on the ParameterServer actor
    for step in range(5):
        metrics = remote.step()
        assert abs(metrics["J"] - losses_ref[step]) <= 1e-12 * abs(losses_ref[step])
    assert metrics["workers"] == workers
    theta = remote.state_dict()["theta"].numpy()
    assert np.max(np.abs(theta - theta_ref)) <= 1e-10
    assert not np.array_equal(theta, theta0)  # it moved


@pytest.mark.ray
def test_actors_are_named_and_the_server_sits_on_the_driver_node(ray_session, sessions):
    session = sessions(2)
    session.stepper(initial_theta(session.cfg, None))
    names = {a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True) if a["namespace"] == session.namespace}
    assert names == {"dist_sae.ParameterServer", "dist_sae.worker-0", "dist_sae.worker-1"}
    assert session.namespace.startswith("dist_sae-")  # unique per run: two runs do not clash
    # Pinned to the driver's node, so what the server hands back (checkpoints) lands there.
    assert ray_session.get(session.server.node_id.remote()) == ray_session.get_runtime_context().get_node_id()


@pytest.mark.ray
def test_onepass_equals_twopass_on_ray(sessions, data):
    session = sessions(2)
    one, two = (session.cfg.with_overrides({"sparsity.passes": n}) for n in (1, 2))
    two_pass, one_pass = PassProblem(session.problem.evaluator, two), PassProblem(session.problem.evaluator, one)
    theta = initial_theta(one, None)
    ref = local_problem(one, Dataset.open(data)).evaluate(theta)
    ev1, ev2 = one_pass.evaluate(theta), two_pass.evaluate(theta)
    assert "pass1_s" not in ev1.stats and "pass1_s" in ev2.stats  # one-pass read the data once
    assert rel(ev1.grad, ev2.grad) <= RTOL and rel(ev1.grad, ref.grad) <= RTOL
    assert abs(ev1.loss - ev2.loss) <= RTOL * abs(ev2.loss)


@pytest.mark.ray
def test_small_units_travel_together_and_the_sum_is_unchanged(ray_session, data):
    cfg = ray_config(data, workers__num=2, data__block_rows=10)  # 103 units of up to 10 rows (MIN_UNIT_ROWS is 4,096)
    session = ClusterSession(cfg, Dataset.open(data))
    try:
        evaluator = session.problem.evaluator

        def cut(rows: list[int]) -> tuple[list[list[int]], list[int]]:
            """(unit ids per call, the first ids of the calls a worker folds)"""
            calls, folds = evaluator.calls([WorkUnit.of(i, 0, 0, r) for i, r in enumerate(rows)])
            return [[u.id for u in call] for call in calls], sorted(folds)

        # A whole reduction group (⌈√U⌉ units) within block_rows=10 rows is one folded call.
        assert cut([2] * 12) == ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], [0, 4, 8])
        # Groups past block_rows (7 units, 14 rows): up to 10 rows a call, unfolded; the last group (5 units) is folded
        assert cut([2] * 40) == ([list(range(i, i + 5)) for i in range(0, 40, 5)], [35])
        assert cut([10] * 4) == ([[0], [1], [2], [3]], [])
        # Fewer groups than workers (a minibatch's parts): one unit per call, so both workers compute.
        assert cut([2] * 2) == ([[0], [1]], [])
        assert len(evaluator.calls(evaluator.units)[0]) == 102  # the last shard's 3-row tail travels with the 1-row shard
        theta = initial_theta(cfg, None)
        ref = local_problem(cfg, Dataset.open(data)).evaluate(theta)
        ev = session.problem.evaluate(theta)
        assert sum(evaluator.last_counts.values()) == len(evaluator.units)  # units, not calls, are counted
        assert ev.loss == ref.loss and np.array_equal(ev.grad, ref.grad)
        # Units of MIN_UNIT_ROWS or more (full blocks, tapered pieces) stay one per call, whatever the cap.
        evaluator.cfg = cfg.with_overrides({"data.block_rows": 16384})
        try:
            assert cut([16384] * 4 + [8192] * 4 + [4096] * 8) == ([[i] for i in range(16)], [])
            assert cut([1024] * 10) == ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], [0, 4, 8])  # 1,024-row units (block_rows=1024)
            # Now every group of the 103 units (11 units, up to 110 rows) is folded by a worker: still the same sum.
            calls, folds = evaluator.calls(evaluator.units)
            assert len(calls) == len(folds) == 10
            folded = session.problem.evaluate(theta)
            assert sum(evaluator.last_counts.values()) == len(evaluator.units)
            assert folded.loss == ref.loss and np.array_equal(folded.grad, ref.grad)
            assert [m.tolist() for m in session.problem.layer_means(theta)] == [m.tolist() for m in ev.layer_means]
        finally:
            evaluator.cfg = cfg
    finally:
        session.close()


SLOW = (WorkerSpec(delay_s=0.05), WorkerSpec())


@pytest.mark.ray
def test_slow_worker_does_fewer_units_and_the_result_is_unchanged(sessions, data):
    session = sessions(2, SLOW, data__block_rows=16)  # 63 units
    ds = Dataset.open(data)
    theta = initial_theta(session.cfg, None)
    ref = local_problem(session.cfg, ds).evaluate(theta)
    ev = session.problem.evaluate(theta)
    counts = session.problem.evaluator.last_counts
    assert sum(counts.values()) == len(ds.units(16))
    assert counts[0] < counts[1] / 2, counts
    assert abs(ev.loss - ref.loss) <= RTOL * abs(ref.loss) and rel(ev.grad, ref.grad) <= RTOL


@pytest.mark.ray
@pytest.mark.parametrize("refresh_every", [3, 0])  # a fixed schedule; the automatic policy
def test_minibatch_adam_on_ray_equals_single_process(sessions, data, refresh_every):
    session = sessions(2, optim__method="adam", optim__lr=0.01, optim__batch_size=100, optim__batch_parts=3,
                       sparsity__refresh_every=refresh_every)
    theta0 = initial_theta(session.cfg, None)
    local = LocalSession(session.cfg.with_overrides({"workers.engine": "local"}), Dataset.open(data))
    try:
        ref, remote = local.stepper(theta0), session.stepper(theta0)
        for _ in range(7):  # crosses two refreshes of the exact ρ̂ (distributed pass 1)
            m_ref, m = ref.step(), remote.step()
            assert abs(m["J"] - m_ref["J"]) <= 1e-12 * abs(m_ref["J"])
            assert m["rho_hat_staleness"] == m_ref["rho_hat_staleness"]
            assert m["refreshes"] == m_ref["refreshes"] and m["refresh_interval"] == m_ref["refresh_interval"]
            if "rho_hat_error" in m_ref:  # the same schedule, the same ρ̂ error measured
                assert m["rho_hat_error"] == pytest.approx(m_ref["rho_hat_error"], rel=1e-9)
        theta_ref = ref.state_dict()["theta"].numpy()
        assert np.max(np.abs(remote.state_dict()["theta"].numpy() - theta_ref)) <= 1e-10
    finally:
        local.close()


@pytest.mark.ray
def test_device_selection_on_ray(ray_session, sessions, data):
    session = sessions(1)
    assert [i["device"] for i in session.worker_info] == ["cpu"]  # no GPU assigned: CPU
    assert session.worker_info[0]["threads"] == 1  # its CPU share, not every core
    before = {a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True)}
    with pytest.raises(ConfigError, match="workers.gpus_per_worker=1 but the Ray cluster has 0 GPU"):
        ClusterSession(ray_config(data, workers__gpus_per_worker=1), Dataset.open(data))
    after = {a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True)}
    assert after == before  # it failed before starting any worker


@pytest.mark.ray
def test_worker_errors_come_back_as_library_errors(ray_session, tmp_path):
    x = random_rows(100, 4, seed=1)
    x[57, 2] = np.nan
    make_dataset(tmp_path / "bad", x, shard_rows=50)
    cfg = ray_config(tmp_path / "bad", workers__num=1, model__hidden=[3])
    session = ClusterSession(cfg, Dataset.open(tmp_path / "bad"))
    try:
        with pytest.raises(DataError, match="non-finite values"):
            session.problem.evaluate(initial_theta(cfg, None))
    finally:
        session.close()


@pytest.mark.ray
def test_train_api_on_the_shared_ray_and_resume(ray_session, data, tmp_path):
    cfg = ray_config(data, workers__num=1, optim__steps=3, run__out=str(tmp_path / "run"), run__checkpoint_every=2)
    result = train(cfg)
    assert result.steps == 3
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "run.json"):
        assert (tmp_path / "run" / name).exists(), name
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[0]["workers"] == 1
    ref = train(cfg.with_overrides({"workers.engine": "local", "run.out": str(tmp_path / "local"), "optim.steps": 4}))
    resumed = train(cfg.with_overrides({"optim.steps": 4}), resume=True)  # L-BFGS state from the checkpoint
    assert resumed.steps == 4
    assert np.max(np.abs(resumed.theta - ref.theta)) <= 1e-10
    assert ray_session.is_initialized()  # sessions that did not start Ray leave it running


@pytest.mark.ray
def test_ray_listens_on_loopback_only(ray_session):
    psutil = pytest.importorskip("psutil")
    node = ray_session._private.worker._global_node
    assert node.node_ip_address == "127.0.0.1"
    session_dir = node.get_session_dir_path()
    ours = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if node.session_name in cmd or session_dir in cmd:
            ours.add(proc.info["pid"])
            try:
                ours.update(child.pid for child in proc.children(recursive=True))  # workers: "ray::Worker"
            except psutil.NoSuchProcess:  # it exited meanwhile (e.g. an actor of the test before, being killed)
                pass
    assert ours, "found none of the test Ray's processes"
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening
    bad = [(c.pid, c.laddr) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not bad, bad

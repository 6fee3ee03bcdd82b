"""Lanes: a single process computing several work units at once gives one lane's sums bit for bit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from dist_sae.data.dataset import Dataset
from dist_sae.data.workunit import WorkUnit
from dist_sae.session import initial_theta
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.lanes import Lanes
from dist_sae.train.problem import local_problem
from dist_sae.train.units import TORCH_DEFAULT_THREADS, local_lanes, pass_units

from util import config, make_dataset, random_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lanes") / "d"
    make_dataset(path, random_rows(1300, 6, seed=3), shard_rows=150)  # 9 shards, the last of 100 rows
    return path


@pytest.mark.parametrize("overrides", [
    {"sparsity__passes": "auto"},  # one-pass, hand-written backward
    {"sparsity__passes": 2, "noise__kind": "gaussian", "noise__sigma": 0.1},  # two passes, seeded noise per row
    {"model__tied": True, "model__hidden": [5, 3]},  # autograd pass 2, two encoder layers
])
def test_lanes_give_the_sums_of_one_lane_bit_for_bit(data, overrides):
    ds = Dataset.open(data)
    overrides = {"model__hidden": [4], "data__block_rows": 64, **overrides}  # 64-row units: more units than lanes
    results = {}
    for lanes in (1, 3):
        cfg = bind_dataset(config(data, compute__lanes=lanes, **overrides), ds)
        problem = local_problem(cfg, ds)
        try:
            assert (problem.evaluator.lanes.count if problem.evaluator.lanes else 1) == lanes
            theta = initial_theta(cfg, None)
            ev = problem.evaluate(theta)
            means = problem.layer_means(theta + 0.01)
            results[lanes] = (ev.loss, ev.grad.copy(), means, ev.rows, len(problem.units))
        finally:
            problem.evaluator.close()
    (loss1, grad1, means1, rows1, units1), (loss3, grad3, means3, rows3, _) = results[1], results[3]
    assert rows1 == rows3 == 1300 and units1 > 9
    assert loss1 == loss3
    assert np.array_equal(grad1, grad3)
    assert all(np.array_equal(a, b) for a, b in zip(means1, means3))


def test_a_failing_unit_stops_the_lanes_and_is_raised():
    units = [WorkUnit.of(i, 0, 10 * i, 10 * i + 10) for i in range(40)]
    started: list[int] = []
    lock = threading.Lock()

    def work(unit, ws):
        with lock:
            started.append(unit.id)
        time.sleep(0.02)  # the other two lanes need ~0.35 s to start all 40: unit 5 raises long before
        if unit.id == 5:
            raise ValueError("bad unit 5")
        return unit.id * 2

    lanes = Lanes(3, 1, 16)
    try:
        got = []
        with pytest.raises(ValueError, match="bad unit 5"):
            for unit, result in lanes.map(work, units):
                got.append((unit.id, result))
        after = len(started)
        time.sleep(0.05)
        assert len(started) == after < len(units)  # the lanes stopped: nothing runs once map has raised
        assert all(result == uid * 2 for uid, result in got) and 5 not in dict(got)
        # The lanes are free for the next pass, which sees every unit once.
        again = sorted(uid for (unit, uid) in ((u, r // 2) for u, r in lanes.map(lambda u, ws: 2 * u.id, units)))
        assert again == list(range(40))
    finally:
        lanes.close()


def test_each_lane_has_its_own_workspace_and_torch_threads():
    lanes = Lanes(2, 1, 8)
    try:
        seen = {}
        barrier = threading.Barrier(2)

        def work(unit, ws):
            barrier.wait(timeout=10)  # both lanes hold a unit at once
            seen[unit.id] = (id(ws), torch.get_num_threads())
            return unit.id

        list(lanes.map(work, [WorkUnit.of(i, 0, i, i + 1) for i in range(2)]))
        assert len({ws for ws, _ in seen.values()}) == 2
        assert {threads for _, threads in seen.values()} == {1}
    finally:
        lanes.close()
    with pytest.raises(ValueError):
        Lanes(1, 1, 8)


def test_local_lanes_one_per_core_for_small_units_on_the_cpu(data):
    ds = Dataset.open(data)
    cpu = torch.device("cpu")

    def lanes(threads=1, device=cpu, **overrides):
        cfg = bind_dataset(config(data, data__block_rows=160, **overrides), ds)  # a unit per shard (150 rows, 16-row chunks)
        return local_lanes(cfg, pass_units(cfg, ds), threads, device)

    assert lanes() == min(TORCH_DEFAULT_THREADS, 9)
    assert lanes(threads=2) == 1  # large units: the cores work inside each product
    assert lanes(device=torch.device("cuda")) == 1
    assert lanes(compute__lanes=4) == 4  # the setting wins
    assert lanes(compute__lanes=50) == 9  # never more than the pass's units

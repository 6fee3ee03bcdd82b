"""The optimizer's Problem composed from passes, and the single-process engine that runs them.

    LocalEvaluator  runs a pass over many units in this process (read-ahead or lanes, ordered
                    reduction): the reference the Ray cluster must equal
    PassProblem     exact J/∇J, ρ̂ and minibatch evaluations composed from passes, for any
                    evaluator with `run(kind, theta, units, g)` (this one, or the Ray one)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from dist_sae.config import Config
from dist_sae.data.dataset import Dataset, ShardInfo
from dist_sae.data.reader import prefetch
from dist_sae.data.workunit import WorkUnit
from dist_sae.errors import TrainingError
from dist_sae.sae.backward import Workspace
from dist_sae.sae.model import SparseAutoencoder
from dist_sae.sae.objective import Evaluation, Objective, SparsityState, finalize, sparsity_state, split_layers, weight_decay_vector
from dist_sae.sae.sums import OrderedReducer, Sums
from dist_sae.train.codes import CodeJob, write_code_shard
from dist_sae.train.inputs import resolve_device
from dist_sae.train.lanes import Lanes
from dist_sae.train.passes import PassRunner
from dist_sae.train.units import local_lanes, local_threads, pass_units

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    rows: int
    units: list[WorkUnit]

    def run(self, kind: str, theta: np.ndarray, units: list[WorkUnit], g: list[np.ndarray] | None = None) -> tuple[Sums, dict[str, float]]:
        """The ordered float64 sum of a pass over `units`, and timings."""

    def write_shards(self, job: CodeJob, shards: dict[int, tuple[WorkUnit, ...]], theta: np.ndarray) -> Iterator[tuple[int, ShardInfo]]:
        """Compute and store output shards (train/codes.py) at θ; yield (index, ShardInfo) as each is stored."""


class LocalEvaluator:
    """Runs passes in this process: blocks are read ahead in a thread (or computed on `lanes`) and reduced in unit order."""

    def __init__(self, runner: PassRunner, prefetch_depth: int = 2, units: list[WorkUnit] | None = None,
                 lanes: Lanes | None = None) -> None:
        self.runner = runner
        self.lanes = lanes
        self.prefetch_depth = prefetch_depth
        self.units = units if units is not None else pass_units(runner.cfg, runner.dataset)  # (its caller's, when cut already)
        self.rows = runner.dataset.rows
        self._version = 0
        # One thread for all passes; it converts blocks (data.transform) with the runner's torch
        # thread count, not its own default (every core, beside the compute threads).
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="dist-sae-prefetch", initializer=torch.set_num_threads,
                                         initargs=(torch.get_num_threads(),))
        self.progress = None  # optional (kind, rows) -> progress bar with update(n) and close()

    def run(self, kind: str, theta: np.ndarray, units: list[WorkUnit], g: list[np.ndarray] | None = None) -> tuple[Sums, dict[str, float]]:
        self._version += 1
        self.runner.set_theta(theta, ("local", self._version))
        self.runner.set_g(g)
        reducer = OrderedReducer([u.id for u in units])
        io_s = compute_s = 0.0
        bar = self.progress(kind, sum(u.rows for u in units)) if self.progress else None
        t0 = time.perf_counter()
        for unit, sums, load_s, unit_s in self._sums(kind, units):
            reducer.add(unit.id, sums)
            io_s += load_s
            compute_s += unit_s
            if bar is not None:
                bar.update(unit.rows)
        if bar is not None:
            bar.close()
        return reducer.total, {"io_s": io_s, "compute_s": compute_s, "wall_s": time.perf_counter() - t0}

    def _sums(self, kind: str, units: list[WorkUnit]) -> Iterator[tuple[WorkUnit, Sums, float, float]]:
        """(unit, its sums, seconds waiting for its block, seconds computing) for every unit: on the
        lanes as they finish (lane-seconds, as a Ray pass sums worker-seconds), or here in unit
        order with the next blocks read ahead (io_s: the read-ahead not keeping up)."""
        if self.lanes is not None and len(units) > 1:  # (a minibatch of one unit: no thread hand-off)
            for unit, (sums, load_s, unit_s) in self.lanes.map(lambda unit, ws: self._unit(kind, unit, ws), units):
                yield unit, sums, load_s, unit_s
            return
        mark = time.perf_counter()
        for unit, block in prefetch(self.runner.load, units, self.prefetch_depth, self._reads):
            got = time.perf_counter()
            sums = self.runner.compute(kind, unit, block)
            self.runner.release(block)
            yield unit, sums, got - mark, time.perf_counter() - got
            mark = time.perf_counter()

    def _unit(self, kind: str, unit: WorkUnit, ws: Workspace) -> tuple[Sums, float, float]:
        """One unit on a lane: loaded, computed into the lane's workspace, its block handed back;
        (sums, seconds loading, seconds computing)."""
        t0 = time.perf_counter()
        block = self.runner.load(unit)
        t1 = time.perf_counter()
        try:
            return self.runner.compute(kind, unit, block, ws), t1 - t0, time.perf_counter() - t1
        finally:
            self.runner.release(block)

    def buffers_made(self) -> dict[str, int]:
        """PassRunner.buffers_made, the lanes' workspaces included."""
        made = self.runner.buffers_made()
        if self.lanes is not None:
            made["workspace"] += self.lanes.buffers_made()
        return made

    def write_shards(self, job: CodeJob, shards: dict[int, tuple[WorkUnit, ...]], theta: np.ndarray) -> Iterator[tuple[int, ShardInfo]]:
        """Compute and store each output shard here, in index order (the next block read ahead); yield (index, ShardInfo)."""
        self._version += 1
        self.runner.set_theta(theta, ("local", self._version))
        for k in sorted(shards):
            yield k, write_code_shard(self.runner, job, k, shards[k], reads=self._reads)

    def close(self) -> None:
        self._reads.shutdown(wait=True)
        if self.lanes is not None:
            self.lanes.close()
        self.runner.close()


class PassProblem:
    """The optimizer's Problem (exact J/∇J, ρ̂, minibatch evaluations) built from passes.

    Args:
        evaluator: runs passes (LocalEvaluator, or the Ray cluster's).
        cfg: the run's config.
    """

    def __init__(self, evaluator: Evaluator, cfg: Config) -> None:
        self.evaluator = evaluator
        self.cfg = cfg
        self.obj = Objective.from_config(cfg)
        self.layout = SparseAutoencoder.from_config(cfg)  # float64 on cpu: only for names and offsets
        self.decay = weight_decay_vector(self.layout, self.obj)
        self.rows = evaluator.rows
        self.units = evaluator.units
        self.one_pass = cfg.sparsity.one_pass

    def _run(self, kind: str, theta: np.ndarray, units: list[WorkUnit], g=None) -> tuple[Sums, dict[str, float]]:
        sums, timing = self.evaluator.run(kind, theta, units, g)
        expected = sum(u.rows for u in units)
        if sums is None or int(sums["rows"]) != expected:
            got = 0 if sums is None else int(sums["rows"])
            raise TrainingError(f"{kind} counted {got} rows but its units hold {expected}: a unit was lost or counted twice")
        return sums, timing

    def layer_means(self, theta: np.ndarray, units: list[WorkUnit] | None = None) -> list[np.ndarray]:
        return self.layer_stats(theta, units)[0]

    def layer_stats(self, theta: np.ndarray, units: list[WorkUnit] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self._pass1(theta, units or self.units)

    def _pass1(self, theta: np.ndarray, units: list[WorkUnit]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(mean activation, rows where active) per encoder layer over `units`."""
        sums, _ = self._run("pass1", theta, units)
        hidden = self.layout.hidden
        return split_layers(sums["act"] / sums["rows"], hidden), split_layers(sums["fired"], hidden)

    def evaluate(self, theta: np.ndarray, units: list[WorkUnit] | None = None, state: SparsityState | None = None) -> Evaluation:
        units = units or self.units
        stats: dict[str, float] = {}
        pass1_timing: dict[str, float] = {}
        if state is None and self.obj.uses_rho_hat and self.one_pass:
            sums, timing = self._run("onepass", theta, units)
            state = sparsity_state(self.obj, split_layers(sums["act"] / sums["rows"], self.layout.hidden))
            stats["pass2_s"] = timing["wall_s"]
        else:
            if state is None and (self.obj.uses_rho_hat or self.obj.auxk):
                t0 = time.perf_counter()
                sums1, pass1_timing = self._run("pass1", theta, units)
                hidden = self.layout.hidden
                state = sparsity_state(self.obj, split_layers(sums1["act"] / sums1["rows"], hidden))
                if self.obj.auxk:  # AuxK's dead units: fired on no row of this pass 1
                    state.dead = split_layers(sums1["fired"], hidden)[0] == 0
                stats["pass1_s"] = time.perf_counter() - t0
            elif state is None:
                state = sparsity_state(self.obj, [])
            sums, timing = self._run("pass2", theta, units, state.constants())
            stats["pass2_s"] = timing["wall_s"]
        ev = finalize(self.obj, self.layout, theta, sums, state, self.decay)
        ev.stats.update(stats)
        ev.stats.update({k: v for k, v in timing.items() if k != "wall_s"})
        for key in ("io_s", "compute_s", "tail_s"):  # I/O, compute and tail time of both passes of this evaluation
            if key in pass1_timing and key in ev.stats:
                ev.stats[key] += pass1_timing[key]
        return ev


def local_problem(cfg: Config, dataset: Dataset, backward: str = "auto") -> PassProblem:
    """A PassProblem over a LocalEvaluator in this process (`backward`: see PassRunner)."""
    units = pass_units(cfg, dataset)
    threads = local_threads(cfg, units)
    device = resolve_device(cfg.compute.device)
    count = local_lanes(cfg, units, threads, device)
    runner = PassRunner(cfg, dataset, device, threads, backward, lanes=count)
    log.info("single-process engine: %d lane(s) of %d torch thread(s) (compute.lanes=%d, compute.threads=%d)",
             count, threads, cfg.compute.lanes, cfg.compute.threads)
    lanes = Lanes(count, threads, runner.workspace.rows) if count > 1 else None
    return PassProblem(LocalEvaluator(runner, cfg.data.prefetch, units, lanes), cfg)

"""Grouped and tree reductions: the canonical sum of a pass (sae/sums.py), formed near the data.

With workers.reduce=grouped or tree, a worker's per-unit sums stay in the object store of its
node (Worker.run_kept); only (unit id, timings, node) go to the evaluator. Once every unit of a
group (consecutive unit ids, sums.unit_groups) is done, the reducer of the node where most of
them ran folds them in unit order, reading its own node's results without a copy and pulling
any other (a group split by stealing or by a failure is completed where its units ran).
  grouped  the evaluator gets the G group sums and adds them in the canonical tree itself
  tree     the tree's inner nodes are reducer calls too, each on its left child's node; the
           evaluator gets one vector: the root
Both use the same fold, TreeSum and add_pair as the server reduction, so all modes give the same
bits. Pass 1's sums are O(hidden), not O(P): they always take the server reduction.

A reducer is one small actor per node (Reducers), placed by a soft NodeAffinity and kept across
passes, rather than a stateless Ray task: Ray stops idle task processes beyond its per-node limit,
so a task may start a new process (and import this module) inside a pass; an actor pays that once.

A unit's result is released from the store once its group's fold has run, so the store holds
about one group per worker rather than the whole pass.

Faults: a reducer whose process dies is restarted and its call retried by Ray (a node that is
gone: restarted on another, the affinity being soft); a unit result lost
with its node (ObjectLostError on a task's argument) makes `finish` raise LostResults naming the
units to rerun: those on a node that is gone and those already released (the groups and the tree
are rebuilt from scratch, so a node lost mid-reduction may cost a whole pass; it gives the same
bits). The evaluator reruns them and calls `finish` again.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dist_sae.sae.sums import OrderedReducer, Sums, TreeSum, add_pair, fold, unit_groups

REDUCE_MODES = ("server", "grouped", "tree")

# Errors saying a reduction input or task is gone with its process or node (cf. evaluator.WORKER_LOST).
LOST = (ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.OwnerDiedError)


def resolve_mode(mode: str, kind: str, units: int) -> str:
    """workers.reduce as run for a pass: pass 1 (O(hidden) sums, not O(P)) and single-unit passes
    take the server reduction whatever the setting."""
    return "server" if kind == "pass1" or units <= 1 else mode


class LostResults(Exception):
    """Unit results lost with their node: rerun these units, then call finish again."""

    def __init__(self, units: list[int], why: str) -> None:
        super().__init__(why)
        self.units = units


def _maybe_crash(fault: str | None) -> None:
    """Test-only: the first task that finds the file `fault` deletes it and kills its own process."""
    if fault and os.path.exists(fault):
        try:
            os.remove(fault)
        except FileNotFoundError:  # another task took it
            return
        os._exit(1)


class Reducer:
    """Folds groups and adds tree nodes in its own process (made a per-node actor by Reducers)."""

    def fold(self, fault: str | None, *parts: Sums) -> Sums:
        _maybe_crash(fault)
        return fold(parts)  # copies the first (read-only in the store), adds the rest in unit order

    def pair(self, fault: str | None, a: Sums, b: Sums) -> Sums:
        _maybe_crash(fault)
        return add_pair(a, b)


class Reducers:
    """One Reducer actor per node that ran units, started on first use, kept across passes."""

    def __init__(self) -> None:
        self._by_node: dict[str | None, Any] = {}

    def on(self, node: str | None) -> Any:
        actor = self._by_node.get(node)
        if actor is None:
            actor = ray.remote(Reducer).options(
                num_cpus=0,  # the workers hold the CPU slots; it only adds arrays (P·a seconds per input)
                max_concurrency=4,  # numpy's adds release the GIL: several groups fold at once
                max_restarts=-1, max_task_retries=-1,  # a crashed call is rerun (the inputs are still there)
                **_near(node),
            ).remote()
            self._by_node[node] = actor
        return actor

    def close(self) -> None:
        for actor in self._by_node.values():
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self._by_node.clear()


def nbytes(sums: Sums) -> int:
    return sum(v.nbytes for v in sums.values())


def _near(node: str | None) -> dict[str, Any]:
    return {} if node is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}


class RemoteReduction:
    """The grouped or tree reduction of one pass, fed unit results (ObjectRefs) as they finish.

    Args:
        unit_ids: the pass's units.
        mode: grouped or tree.
        reducers: the evaluator's per-node Reducers.
        fault: test-only file path for _maybe_crash (a reducer call that crashes once).
    """

    def __init__(self, unit_ids: list[int], mode: str, reducers: Reducers, fault: str | None = None) -> None:
        if mode not in ("grouped", "tree"):
            raise ValueError(f"unknown remote reduction {mode!r}")
        self.mode, self.reducers, self.fault, self.unit_ids = mode, reducers, fault, list(unit_ids)
        self.groups = unit_groups(unit_ids)
        self._group_of = {uid: j for j, group in enumerate(self.groups) for uid in group}
        self._units: dict[int, tuple[Any, str | None]] = {}  # unit id -> (sums ref, node it is on), until its group is folded
        self._folding: dict[Any, int] = {}  # group fold ref -> group index, while its units are held
        self.received_bytes = 0  # what the evaluator got from the reduction
        self.busy_s = 0.0  # the evaluator's time getting and adding those (not waiting for them)
        self._reset()

    def _reset(self) -> None:
        self._group_refs: dict[int, tuple[Any, str | None]] = {}  # submitted group folds
        self._next_group = 0  # groups below it are in the tree (tree) or being fetched (grouped)
        self._tree: TreeSum[tuple[Any, str | None]] = TreeSum(self._pair)
        self._fetch: dict[Any, int] = {}  # grouped: group sum ref -> group index, not yet fetched
        self.reducer = OrderedReducer(self.unit_ids)  # grouped: the tree over group sums, here

    def _pair(self, a: tuple[Any, str | None], b: tuple[Any, str | None]) -> tuple[Any, str | None]:
        return self.reducers.on(a[1]).pair.remote(self.fault, a[0], b[0]), a[1]

    def unit_done(self, unit_id: int, sums_ref: Any, node: str | None) -> None:
        """A unit's sums are in the store on `node`: fold its group once the group is complete."""
        self._units[unit_id] = (sums_ref, node)
        if self._submit_group(self._group_of[unit_id]):
            self._release()
        if self.mode == "grouped":
            self._collect(block=False)

    def _submit_group(self, j: int) -> bool:
        """Fold group j if all its units are in and it is not folded yet; True if it was submitted now."""
        group = self.groups[j]
        if j in self._group_refs or any(uid not in self._units for uid in group):
            return False
        nodes = Counter(self._units[uid][1] for uid in group)
        node = max(nodes, key=lambda n: (nodes[n], n == self._units[group[0]][1]))  # most of its units
        ref = self.reducers.on(node).fold.remote(self.fault, *(self._units[uid][0] for uid in group))
        self._group_refs[j] = (ref, node)
        self._folding[ref] = j
        while self._next_group in self._group_refs:  # in group order, as the tree's shape needs
            if self.mode == "tree":
                self._tree.push(self._group_refs[self._next_group])
            else:
                self._fetch[self._group_refs[self._next_group][0]] = self._next_group
            self._next_group += 1
        return True

    def _release(self) -> None:
        """Drop the unit results of groups whose fold has run (the store may free them)."""
        if not self._folding:
            return
        ready, _ = ray.wait(list(self._folding), num_returns=len(self._folding), timeout=0, fetch_local=False)
        for ref in ready:
            for uid in self.groups[self._folding.pop(ref)]:
                self._units.pop(uid, None)

    def _get(self, ref: Any) -> Sums:
        t0 = time.perf_counter()
        sums = ray.get(ref)
        self.busy_s += time.perf_counter() - t0
        self.received_bytes += nbytes(sums)
        return sums

    def _collect(self, block: bool) -> None:
        """grouped: add the group sums that are ready (block: all of them) to the tree here."""
        while self._fetch:
            ready, _ = ray.wait(list(self._fetch), num_returns=len(self._fetch) if block else 1, timeout=None if block else 0)
            if not ready:
                return
            for ref in ready:
                sums = self._get(ref)
                t0 = time.perf_counter()
                self.reducer.add_group(self._fetch.pop(ref), sums)
                self.busy_s += time.perf_counter() - t0

    def finish(self) -> Sums:
        """The canonical sum, once every unit is done.

        Raises:
            LostResults: unit results on a node that is gone; rerun them (unit_done), call again.
        """
        try:
            if self.mode == "tree":
                root = self._tree.result()
                ray.wait([root[0]], fetch_local=False)
                return self._get(root[0])
            self._collect(block=True)
            return self.reducer.total
        except LOST as exc:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            held = {uid for uid, (_, node) in self._units.items() if node is None or node in alive}
            lost = [uid for uid in self.unit_ids if uid not in held] or list(self.unit_ids)
            for uid in lost:
                self._units.pop(uid, None)
            self._folding.clear()
            self._reset()
            for j in range(len(self.groups)):
                self._submit_group(j)
            raise LostResults(lost, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from None

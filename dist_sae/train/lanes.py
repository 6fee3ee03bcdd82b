"""Lanes: the work units of a pass computed on a few threads of one process at once.

Why: the single-process engine computes small units on one torch thread (train/units.py says why
intra-op threads lose there), which leaves the other cores idle. Torch releases the GIL inside
each operation, so two threads that each run whole units keep two cores busy: on the notes'
exercise (64-25-64, float64, then cut into 10 units of 1,024 rows) an exact evaluation took 11.2 ms on two
lanes against 15.4 ms on one, on a 2-core machine (the units' compute alone: 8.2-9.0 against
13.2-14.2 ms); float32 gains little (7.3-9.3 against 8.6-10.1 ms), its units being short enough
for the Python between operations to dominate.

Each unit's sums are the same whichever lane computes it (one torch thread, its own buffers), and
the caller reduces them in unit order (sae/sums.py), so the pass's float64 sum is bit-identical
to one lane's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from dist_sae.data.workunit import WorkUnit
from dist_sae.sae.backward import Workspace

R = TypeVar("R")
_END = object()  # a lane has no unit left


class Lanes:
    """`count` threads, each with `threads` torch threads and its own Workspace, sharing a pass's units.

    Args:
        count: lanes (threads), at least 2 (a single lane is LocalEvaluator's plain loop, without Lanes).
        threads: torch intra-op threads of each lane (OpenMP's count is set per thread).
        rows: rows each lane's workspace is made for (Workspace).
    """

    def __init__(self, count: int, threads: int, rows: int) -> None:
        if count < 2:
            raise ValueError(f"lanes need count >= 2, got {count}")
        self.count = count
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="dist-sae-lane", initializer=torch.set_num_threads,
                                        initargs=(threads,))
        self.workspaces = [Workspace(rows) for _ in range(count)]

    def map(self, work: Callable[[WorkUnit, Workspace], R], units: list[WorkUnit]) -> Iterator[tuple[WorkUnit, R]]:
        """work(unit, workspace) for every unit, each lane taking the next unit when it is free.

        Yields (unit, result) as they finish, in any order. An exception in a lane stops the
        others after their current unit and is raised here; the generator returns (or raises) only
        once every lane has stopped, so nothing runs on the caller's objects afterwards.
        """
        todo = iter(units)
        take = threading.Lock()
        done: queue.SimpleQueue = queue.SimpleQueue()  # (unit, result) | (None, exception) | _END
        stop = threading.Event()

        def lane(ws: Workspace) -> None:
            try:
                while not stop.is_set():
                    with take:
                        unit = next(todo, None)
                    if unit is None:
                        break
                    done.put((unit, work(unit, ws)))
            except BaseException as exc:  # handed to the caller, which raises it
                stop.set()
                done.put((None, exc))
            finally:
                done.put(_END)

        futures = [self._pool.submit(lane, ws) for ws in self.workspaces]
        running = len(futures)
        try:
            while running:
                item = done.get()
                if item is _END:
                    running -= 1
                    continue
                unit, result = item
                if unit is None:
                    raise result
                yield unit, result
        finally:
            stop.set()
            wait(futures)

    def buffers_made(self) -> int:
        return sum(ws.made for ws in self.workspaces)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

"""Reading work units from a dataset's shards: a bounded set of open files, read-ahead on one thread,
and a small pool of reused block buffers.

Memory is one block per unit in flight, never a shard or the dataset.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import h5py
import numpy as np

from dist_sae.errors import DataError
from dist_sae.data.dataset import Dataset, stored_rows
from dist_sae.data.workunit import Span, WorkUnit


class BlockReader:
    """Reads work units from the shards of a dataset, keeping a few files open.

    Only the rows of the unit are read (h5py reads the needed chunks), so memory is one block.
    Non-finite values are an error that names the shard and rows.
    """

    def __init__(self, dataset: Dataset, max_open: int = 8, check_finite: bool = True) -> None:
        self.dataset = dataset
        self.max_open = max_open
        self.check_finite = check_finite
        self._files: OrderedDict[int, h5py.File] = OrderedDict()
        self._lock = threading.Lock()  # h5py is not re-entrant across our prefetch thread and caller

    def _file(self, shard: int) -> h5py.File:
        f = self._files.get(shard)
        if f is None:
            try:
                f = h5py.File(self.dataset.shard_path(shard), "r")
            except Exception as exc:
                raise DataError(f"cannot open shard {self.dataset.shard_path(shard)}: {exc}") from None
            self._files[shard] = f
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def _rows(self, span: Span, into: np.ndarray | None = None) -> np.ndarray:
        """The span's rows: a new array, or read into `into` (C-contiguous, its rows and dtype)."""
        try:
            x = stored_rows(self._file(span.shard))
            if into is None:
                return x[span.start : span.stop]
            x.read_direct(into, np.s_[span.start : span.stop])
            return into
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"shard {self.dataset.shard_path(span.shard)}: rows {span.start}:{span.stop} cannot be read "
                f"({type(exc).__name__}: {exc}); the file is corrupt or truncated"
            ) from None

    def read(self, unit: WorkUnit, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of the unit, (unit.rows, dim), in the stored dtype, its spans one after another.

        out: a C-contiguous (>= unit.rows, dim) array of the stored dtype to read into (h5py's
        read_direct: no new multi-MB array per block, which lets the heap fragment and RSS creep
        up with the data size); the rows are then out[:unit.rows]. Any other `out` is not used.
        """
        rows, dtype = unit.rows, np.dtype(self.dataset.dtype)
        usable = out is not None and out.dtype == dtype and out.shape[0] >= rows and out.shape[1:] == (self.dataset.dim,)
        with self._lock:
            if len(unit.spans) == 1 and not usable:
                block = self._rows(unit.spans[0])
            else:
                block = out[:rows] if usable else np.empty((rows, self.dataset.dim), dtype)
                for span, at in unit.parts():
                    self._rows(span, block[at : at + span.rows])
        # A float64 sum is finite when every value is (it cannot overflow for float32 rows), and needs
        # no (B, n) temporary; only a non-finite sum (or a float64 overflow) takes the element check.
        if self.check_finite and not np.isfinite(block.sum(dtype=np.float64)) and not np.isfinite(block).all():
            for span, at in unit.parts():  # names the first span with bad rows
                bad = np.flatnonzero(~np.isfinite(block[at : at + span.rows]).all(axis=1))
                if bad.size:
                    raise DataError(
                        f"shard {self.dataset.shard_path(span.shard)}: non-finite values (NaN/Inf) in rows "
                        f"{span.start + int(bad[0])}..{span.start + int(bad[-1])} ({bad.size} rows); clean the data first"
                    )
        return block

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


B = TypeVar("B")  # a buffer: a numpy array or a torch tensor, rows first


class BufferPool(Generic[B]):
    """A few reusable block buffers of `capacity` rows, lent out as views of their first rows.

    Why: a fresh multi-MB array per block makes RSS grow with the number of blocks under glibc's
    default allocator. After the first such block is freed, glibc's dynamic mmap threshold rises
    above the block size, so later blocks come from the heap (or a thread's arena, on the two
    threads of a Ray worker); blocks of varying rows (tapered units, shard ends) leave holes that
    are not reused (measured: a Ray worker 423 -> 630 MB at 64x the rows; the same loop in a
    plain process got all its growth back from malloc_trim(0): free memory, not live data). A
    pool of fixed-capacity buffers allocates a handful once.

    Args:
        make: rows -> a new buffer with that many rows (np.empty / torch.empty of the right shape).
        capacity: rows of a new buffer (at least the rows asked for): the largest unit's.
        keep: free buffers kept for reuse; more given back are dropped.
        address: a buffer or view -> the address of its first element (a view of the first rows
            has its buffer's address, which is how `give` finds the buffer again).
    """

    def __init__(self, make: Callable[[int], B], capacity: int, keep: int, address: Callable[[B], int]) -> None:
        self.make, self.capacity, self.keep, self.address = make, capacity, keep, address
        self._free: list[B] = []
        self._lent: OrderedDict[int, B] = OrderedDict()  # address of a lent view -> its buffer
        self._lock = threading.Lock()
        self.made = 0  # buffers allocated so far (tests check it stays bounded)

    def take(self, rows: int) -> B:
        """A (rows, ...) view of a free buffer with room for `rows`, or of a new one."""
        with self._lock:
            buf = next((b for b in self._free if len(b) >= rows), None)
            if buf is not None:
                self._free.remove(buf)
        if buf is None:
            buf = self.make(max(rows, self.capacity))
            with self._lock:  # several lanes (train/lanes.py) take buffers at once
                self.made += 1
        view = buf[:rows]
        with self._lock:
            self._lent[self.address(view)] = buf
            while len(self._lent) > 4 * self.keep:  # views never given back: forget them (they keep their memory)
                self._lent.popitem(last=False)
        return view

    def give(self, view: B) -> bool:
        """Take back a view from `take` (its data no longer needed); False when it is not one of ours."""
        with self._lock:
            buf = self._lent.pop(self.address(view), None)
            if buf is not None and len(self._free) < self.keep:
                self._free.append(buf)
        return buf is not None

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._lent.clear()


def prefetch(
    source: BlockReader | Callable[[WorkUnit], Any],
    units: Iterable[WorkUnit],
    depth: int = 2,
    executor: ThreadPoolExecutor | None = None,
) -> Iterator[tuple[WorkUnit, Any]]:
    """Yield (unit, block) in order, loading up to `depth` units ahead on a background thread.

    source: a BlockReader, or any `load(unit)` (e.g. one that also converts and caches blocks).
    The compute of one block (torch releases the GIL) overlaps the load of the next. Memory is
    bounded by depth + 1 blocks. A load error is raised in the caller, in unit order. Pass a
    long-lived single-thread `executor` to avoid starting a thread per pass.
    """
    load = source.read if isinstance(source, BlockReader) else source
    units = list(units)
    if depth <= 0:
        for unit in units:
            yield unit, load(unit)
        return
    pool = executor or ThreadPoolExecutor(1, thread_name_prefix="dist-sae-prefetch")
    ahead: deque = deque()
    todo = iter(units)
    try:
        for unit in itertools.islice(todo, depth):
            ahead.append((unit, pool.submit(load, unit)))
        while ahead:
            unit, future = ahead.popleft()
            block = future.result()  # re-raises the load's error here, in order
            following = next(todo, None)
            if following is not None:
                ahead.append((following, pool.submit(load, following)))
            yield unit, block
    finally:
        for _, future in ahead:
            future.cancel()
        if executor is None:
            pool.shutdown(wait=True)

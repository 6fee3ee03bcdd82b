"""How far the passes running on Ray have got: recorded by the evaluator, drawn by the driver.

On Ray, training passes run inside the ParameterServer actor, away from the driver's terminal.
The server's evaluator records each pass in a PassMeter (rows done of rows total, workers busy, rows
per device kind, and the tail: the time from the first worker going idle with no unit left to hand
out, to the pass's end), and
the server answers `progress()` with a snapshot of it. While a step runs, the driver's PassBars
thread polls that snapshot a few times a second and draws one bar per pass; off a terminal no bar
is drawn and nothing polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.25  # driver polls per second: 4 small actor calls; see the README for their measured cost


class PassMeter:
    """One pass at a time: its rows, the workers busy, and what each device kind did (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"seq": 0, "kind": None, "rows": 0, "done": 0, "busy": 0, "workers": 0, "running": False}
        self._by_kind: dict[str, int] = {}
        self._t0 = 0.0
        self._first_idle: float | None = None

    def start(self, kind: str, rows: int, workers: int) -> None:
        with self._lock:
            seq = self._state["seq"] + 1
            self._state = {"seq": seq, "kind": kind, "rows": rows, "done": 0, "busy": 0, "workers": workers, "running": True}
            self._by_kind = {}
            self._t0 = time.perf_counter()
            self._first_idle = None

    def busy(self, busy: int, live: int, queued: int = 0) -> None:
        """Workers with units in flight, of `live`, after a hand-out, and units still queued.

        The tail starts when a worker is idle and no unit is left to hand out: a worker that the
        dispatcher keeps waiting while a faster one takes the queue is not out of work.
        """
        with self._lock:
            self._state["busy"], self._state["workers"] = busy, live
            if busy < live and not queued and self._first_idle is None and self._state["running"]:
                self._first_idle = time.perf_counter()

    def done(self, device_kind: str, rows: int) -> None:
        with self._lock:
            self._state["done"] += rows
            self._by_kind[device_kind] = self._by_kind.get(device_kind, 0) + rows

    def finish(self) -> dict[str, float]:
        """End the pass: {"tail_s", "rows_per_s_<kind>" per device kind that ran units}."""
        with self._lock:
            end = time.perf_counter()
            self._state["running"] = False
            wall = max(end - self._t0, 1e-12)
            tail = end - (self._first_idle if self._first_idle is not None else end)
            return {"tail_s": tail, **{f"rows_per_s_{k}": v / wall for k, v in sorted(self._by_kind.items())}}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)


class PassBars:
    """While a step runs, polls a snapshot function from a thread and draws a bar per pass.

    Args:
        snapshot: () -> PassMeter.snapshot() of the server (one small actor call).
        bars: (kind, rows) -> a progress bar (dist_sae.progress.pass_bars), or None: do nothing.
        interval_s: seconds between polls.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]], bars: Callable[[str, int], Any] | None, interval_s: float = POLL_S) -> None:
        self.snapshot, self.bars, self.interval_s = snapshot, bars, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._seq = 0
        self._shown = 0
        self.polls = 0

    def __enter__(self) -> PassBars:
        if self.bars is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dist-sae-pass-bars", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.show(self.snapshot())
            except Exception as exc:  # progress is cosmetic: a failed poll never fails the step
                log.debug("pass progress poll failed: %s", exc)
            self.polls += 1

    def show(self, snap: dict[str, Any]) -> None:
        """Draw one snapshot: a new pass closes the last bar and opens its own (a pass first seen
        finished, such as the last step's, gets none)."""
        if snap["seq"] != self._seq:
            self._close()
            self._seq = snap["seq"]
            if snap["running"]:
                self._bar = self.bars(snap["kind"], snap["rows"])
        if self._bar is None:
            return
        if snap["done"] > self._shown:
            self._bar.update(snap["done"] - self._shown)
            self._shown = snap["done"]
        self._bar.set_postfix_str(f"{snap['busy']}/{snap['workers']} workers busy", refresh=False)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._shown = None, 0

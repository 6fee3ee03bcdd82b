"""Progress bars: one helper for every bar the package shows (tqdm, quiet off a terminal)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def shown(quiet: bool = False) -> bool:
    """Whether bars are drawn: not when asked to be quiet, and never off a terminal (logs, CI, jobs)."""
    return not quiet and sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "row", quiet: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; a disabled one (same interface, draws nothing) when not `shown`.

    Rows are counted with SI prefixes (12.3k row/s); steps as plain integers.
    """
    kwargs.setdefault("unit_scale", unit == "row")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, disable=not shown(quiet), file=sys.stderr, **kwargs)


def pass_bars(quiet: bool = False):
    """A factory (kind, rows) -> bar of one pass (rows/s, ETA), drawn under the step bar; None when not shown.

    Bars appear only for passes longer than half a second, so quick passes do not flicker.
    """
    if not shown(quiet):
        return None
    return lambda kind, rows: bar(rows, kind, leave=False, position=1, delay=0.5)

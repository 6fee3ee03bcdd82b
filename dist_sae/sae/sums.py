"""Float64 partial sums and their reduction in a fixed order.

A pass's result is the sum of its work units' sums in one fixed association (the canonical sum,
below), whatever order they arrive in, so it does not depend on how many workers ran, who ran what,
or which units were redone.

The canonical sum of a pass over U units (float64 addition is not associative, so the grouping of
the additions is part of the result, and every reduction mode must use this one):
  1. Sort the pass's unit ids; cut them into groups of g = group_size(U) consecutive ids (the last
     group may be shorter). g depends on U only, never on the number of workers.
  2. Each group's sum is a left fold in unit order: ((u0 + u1) + u2) + ...
  3. The pass's sum is a binary tree over the group sums fixed by group index: level 0 adds the
     pairs (0, 1), (2, 3), ...; an odd last one goes up a level unchanged; then pairs of pairs,
     until one is left (TreeSum builds exactly this shape from the group sums pushed in order).
The server reduction (OrderedReducer), the single-process engine (which uses it too) and the
cluster's grouped and tree reductions (cluster/reduce.py, with the same fold and TreeSum) all
compute this, so they agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that take tensors, not here: the grouped and tree
# reductions run this module's adds in Ray task processes (cluster/reduce.py), which then start
# without importing torch (seconds per new process on a busy machine).



Sums = dict[str, np.ndarray]  # named float64 partial sums of one or more blocks; "rows" counts rows



def to64(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.detach().to(device="cpu", dtype=torch.float64).numpy()



# Elements of a block converted to float64 at a time by column_sums64 (2 MB: they stay in cache).
SUM_CHUNK = 2**18


def column_sums64(x: torch.Tensor, squares: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ_i x_i (cols,), and with squares Σ_i ‖x_i‖² (0-d) else None) of a (B, cols) block, in float64 on x's device.

    Why not x.sum(0, dtype=torch.float64): on the CPU torch converts the whole block to float64
    first, a (B, cols) float64 temporary written and read back (4,096 × 1,024 float32 on 2 threads:
    16.5 ms against 1.9 ms here, about 6% of a 784-1024-784 one-pass evaluation). Here rows are
    converted SUM_CHUNK elements at a time into one small buffer and summed there: float64 sums
    of the same float32 values, which agree with the whole-block sums to float64 rounding. A
    float64 block, or one on a GPU (where the conversion runs at memory speed), is summed directly.
    """
    import torch

    if x.dtype == torch.float64 or x.device.type != "cpu":
        flat = x.reshape(-1).to(torch.float64) if squares else None
        return x.sum(0, dtype=torch.float64), (torch.dot(flat, flat) if squares else None)
    rows = max(1, SUM_CHUNK // max(1, x.shape[1]))
    buf = torch.empty((min(rows, x.shape[0]), x.shape[1]), dtype=torch.float64)
    col = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros((), dtype=torch.float64) if squares else None
    for start in range(0, x.shape[0], rows):
        part = buf[: min(rows, x.shape[0] - start)].copy_(x[start : start + rows])
        col += part.sum(0)
        if squares:
            flat = part.view(-1)
            sq += torch.dot(flat, flat)
    return col, sq


def data_block_sums(x: torch.Tensor) -> Sums:
    """Σ_i x_i (n,) and Σ_i ‖x_i‖² of a block, float64: for the FVU; they do not depend on θ."""
    col, sq = column_sums64(x, squares=True)
    return {"sum_x": to64(col), "sum_x2": np.array(float(sq))}



def add_sums(total: Sums | None, part: Sums) -> Sums:
    """total + part, key by key, in float64 (total is updated in place when given)."""
    if total is None:
        return {k: np.array(v, dtype=np.float64, copy=True) for k, v in part.items()}
    for k, v in part.items():
        total[k] += v
    return total



def group_size(n_units: int) -> int:
    """Units per reduction group for a pass of `n_units` units: ⌈√U⌉ (at least 1).

    √U balances the two halves of the reduction: a group's fold adds g vectors where its units ran,
    and the server (grouped) or the tree adds U/g group sums.
    """
    return max(1, math.isqrt(max(n_units - 1, 0)) + 1)


def unit_groups(unit_ids: Iterable[int]) -> list[list[int]]:
    """The pass's unit ids, sorted, in consecutive runs of group_size(U): the canonical groups."""
    order = sorted(unit_ids)
    g = group_size(len(order))
    return [order[i : i + g] for i in range(0, len(order), g)]


def fold(parts: Iterable[Sums]) -> Sums | None:
    """Left fold of `parts` in the order given: a group's sum (the parts are not changed)."""
    total = None
    for part in parts:
        total = add_sums(total, part)
    return total


T = TypeVar("T")


class TreeSum(Generic[T]):
    """The canonical binary tree over items pushed in index order, combined with `combine(a, b)`.

    Kept as a stack of complete subtrees (sizes strictly falling, as a binary counter), so memory
    is O(log n); `result` then joins the stack from the right. This gives the level-by-level
    pairing of the module docstring for any n (an odd last node carried up a level is the stack's
    last subtree). `combine` adds Sums here, or submits a Ray task over ObjectRefs (cluster/reduce.py).
    """

    def __init__(self, combine: Callable[[T, T], T]) -> None:
        self.combine = combine
        self._stack: list[tuple[T, int]] = []  # (subtree value, leaves in it)
        self.count = 0

    def push(self, item: T) -> None:
        self._stack.append((item, 1))
        self.count += 1
        while len(self._stack) >= 2 and self._stack[-1][1] == self._stack[-2][1]:
            (b, nb), (a, na) = self._stack.pop(), self._stack.pop()
            self._stack.append((self.combine(a, b), na + nb))

    def result(self) -> T | None:
        while len(self._stack) >= 2:
            (b, nb), (a, na) = self._stack.pop(), self._stack.pop()
            self._stack.append((self.combine(a, b), na + nb))
        return self._stack[0][0] if self._stack else None


def add_pair(a: Sums, b: Sums) -> Sums:
    """An inner node of the canonical tree: a + b (into a when its arrays are writable, e.g. a
    partial fold of ours; else into a copy, e.g. a read-only view of Ray's object store)."""
    owned = all(v.flags.writeable for v in a.values())
    return add_sums(a if owned else add_sums(None, a), b)


class OrderedReducer:
    """The canonical sum of a pass (module docstring), from per-unit or per-group sums in any order.

    A unit's sums join its group's fold once every lower unit of the group is in; a finished
    group joins the tree once every lower group is in. Early arrivals wait in a buffer, so the
    float64 result is bit-identical however many workers there are and whoever ran which unit.
    """

    def __init__(self, unit_ids: list[int]) -> None:
        self.groups = unit_groups(unit_ids)
        self._group_of = {uid: j for j, group in enumerate(self.groups) for uid in group}
        self._next = [0] * len(self.groups)  # per group: position of the next unit to fold
        self._partial: list[Sums | None] = [None] * len(self.groups)
        self._pending: dict[int, Sums] = {}  # unit id -> sums waiting for a lower unit of its group
        self._finished: dict[int, Sums] = {}  # group index -> sum waiting for a lower group
        self._next_group = 0
        self._tree: TreeSum[Sums] = TreeSum(add_pair)
        self.total: Sums | None = None

    def add(self, unit_id: int, sums: Sums) -> None:
        """One unit's sums (from a worker, or computed here)."""
        j = self._group_of.get(unit_id)
        if j is None:
            raise RuntimeError(f"work unit {unit_id} is not in this pass")
        group = self.groups[j]
        if unit_id in self._pending or unit_id in group[: self._next[j]]:
            raise RuntimeError(f"work unit {unit_id} reduced twice")
        self._pending[unit_id] = sums
        while self._next[j] < len(group) and group[self._next[j]] in self._pending:
            self._partial[j] = add_sums(self._partial[j], self._pending.pop(group[self._next[j]]))
            self._next[j] += 1
        if self._next[j] == len(group):
            self._group_done(j, self._partial[j])
            self._partial[j] = None

    def add_group(self, index: int, sums: Sums) -> None:
        """A whole group's sum (its units folded in unit order elsewhere: cluster/reduce.py)."""
        if self._next[index] == len(self.groups[index]):
            raise RuntimeError(f"reduction group {index} reduced twice")
        self._next[index] = len(self.groups[index])
        self._group_done(index, sums)

    def _group_done(self, index: int, sums: Sums) -> None:
        self._finished[index] = sums
        while self._next_group in self._finished:
            self._tree.push(self._finished.pop(self._next_group))
            self._next_group += 1
        if self._next_group == len(self.groups):
            self.total = self._tree.result()

    @property
    def done(self) -> bool:
        return self._next_group == len(self.groups)


def active(a: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Which units count as active (for L0 and dead units): sigmoid a > ½, tanh a > 0, else a ≠ 0.

    Bool, or 1.0/0.0 written into `out` (any dtype) when given.
    """
    import torch

    if activation == "sigmoid":
        return torch.gt(a, 0.5, out=out)
    if activation == "tanh":
        return torch.gt(a, 0, out=out)
    return torch.ne(a, 0, out=out)



def layer_sums(acts: list[torch.Tensor], activation: str, ws=None) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_i a_i, Σ_i [a_i active]) of every encoder layer, concatenated (Σ h_l,), float64.

    The active counts are summed as 0/1 in float32 for a float32 block of under 2^24 rows (every
    partial sum is then an integer float32 holds exactly), else in float64 (exact below 2^53 rows):
    summing a bool mask casts all of it to int64 first, a (B, h) int64 temporary per block. ws: a
    backward.Workspace to hold the (B, h_l) masks (None: new ones).
    """
    import torch

    sums = torch.cat([column_sums64(a.detach())[0] for a in acts])
    kinds = [torch.float32 if a.dtype == torch.float32 and a.shape[0] < 2**24 else torch.float64 for a in acts]
    masks = [torch.empty(a.shape, dtype=kind, device=a.device) if ws is None
             else ws.get(f"active{i}", a.shape[0], a.shape[1], a, kind) for i, (a, kind) in enumerate(zip(acts, kinds))]
    fired = torch.cat([active(a.detach(), activation, m).sum(0) for a, m in zip(acts, masks)])  # integer counts
    return to64(sums), to64(fired)

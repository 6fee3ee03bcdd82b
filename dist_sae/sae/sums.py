"""Float64 partial sums and their reduction in a fixed order.

A pass's result is the sum of its work units' sums, added in unit-id order whatever order they
arrive in, so it does not depend on how many workers ran, who ran what, or which units were redone.
"""

from __future__ import annotations


import numpy as np
import torch



Sums = dict[str, np.ndarray]  # named float64 partial sums of one or more blocks; "rows" counts rows



def to64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()



def data_block_sums(x: torch.Tensor) -> Sums:
    """Σ_i x_i (n,) and Σ_i ‖x_i‖² of a block, float64: for the FVU; they do not depend on θ."""
    x64 = x.to(torch.float64).reshape(-1)
    return {"sum_x": to64(x.sum(0, dtype=torch.float64)), "sum_x2": np.array(float(torch.dot(x64, x64)))}



def add_sums(total: Sums | None, part: Sums) -> Sums:
    """total + part, key by key, in float64 (total is updated in place when given)."""
    if total is None:
        return {k: np.array(v, dtype=np.float64, copy=True) for k, v in part.items()}
    for k, v in part.items():
        total[k] += v
    return total



class OrderedReducer:
    """Adds per-unit sums in unit-id order, whatever order they arrive in.

    Results that arrive early wait in a buffer until every lower unit id has been added, so the
    float64 result is bit-identical however many workers there are and whoever ran which unit.
    """

    def __init__(self, unit_ids: list[int]) -> None:
        self._order = sorted(unit_ids)
        self._next = 0
        self._pending: dict[int, Sums] = {}
        self.total: Sums | None = None

    def add(self, unit_id: int, sums: Sums) -> None:
        if unit_id in self._pending or unit_id in self._order[: self._next]:
            raise RuntimeError(f"work unit {unit_id} reduced twice")
        self._pending[unit_id] = sums
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            self.total = add_sums(self.total, self._pending.pop(self._order[self._next]))
            self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self._order)


def active(a: torch.Tensor, activation: str) -> torch.Tensor:
    """Which units count as active (for L0 and dead units): sigmoid a > ½, tanh a > 0, else a ≠ 0."""
    if activation == "sigmoid":
        return a > 0.5
    if activation == "tanh":
        return a > 0
    return a != 0



def layer_sums(acts: list[torch.Tensor], activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_i a_i, Σ_i [a_i active]) of every encoder layer, concatenated (Σ h_l,), float64."""
    sums = torch.cat([a.detach().sum(0, dtype=torch.float64) for a in acts])
    fired = torch.cat([active(a.detach(), activation).sum(0).to(torch.float64) for a in acts])  # integer counts
    return to64(sums), to64(fired)

"""L-BFGS on one flat float64 tensor: torch.optim.LBFGS's iteration, without torch.optim.Optimizer.

Why not torch.optim.LBFGS itself (measured at the notes' exercise's size, 64-25-64, P = 3,289,
history 100): constructing any torch.optim.Optimizer imports torch._dynamo, about 1 s of the start
of every process that builds one (the driver with --local, the parameter server on Ray), a tenth
of the whole exercise; and its step's own arithmetic takes 1.44 ms at a full history against this
one's 0.94 ms (the two-loop keeps its scalars as floats: fewer tensor operations).

The algorithm is torch's, step for step: the two-loop recursion (Nocedal & Wright, "Numerical
Optimization", Algorithm 7.4) with the scaled identity H₀ = sᵀy / yᵀy, and the strong-Wolfe line
search with cubic interpolation of minFunc (Schmidt), as torch ports it from torch7's optim
package. Vectors are float64 tensors and the direction is torch's bit for bit; the line search's
scalars are Python floats, each operation rounded once (torch's 0-d tensors round sqrt and
float/tensor division differently in the last bit), so its iterates agree with
torch.optim.LBFGS(max_iter=1)'s to rounding (tests/unit/test_lbfgs.py), and each's state_dict
loads into the other: checkpoints keep torch's format.

One `step` is one iteration (torch's max_iter=1): Trainer logs and checkpoints every iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# closure() -> (J, ∇J) at the current x: a float and a (P,) float64 tensor that the optimizer keeps
# (it never writes into it), so the closure must not change it later either.
Closure = Callable[[], tuple[float, torch.Tensor]]


class LBFGS:
    """L-BFGS steps of the flat parameter vector `x` (P,) float64, updated in place.

    Args:
        x: the parameters; the closure evaluates at x's current values.
        lr: the first trial step of each line search (the step itself without one).
        max_eval: bounds a step's evaluations, as torch's: the line search may make max_eval − 1
            trials after its first, so a step evaluates at most max_eval + 1 times.
        history_size: (s, y) pairs kept.
        tolerance_grad: a step whose gradient's largest |component| is at most this does nothing.
        tolerance_change: a step whose directional derivative is above −tolerance_change does not move.
        line_search_fn: "strong_wolfe" or None (a fixed step of lr along the direction).
    """

    def __init__(self, x: torch.Tensor, lr: float = 1.0, max_eval: int = 26, history_size: int = 100,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, line_search_fn: str | None = None) -> None:
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe', not {line_search_fn!r}")
        self.x = x
        self.group = {"lr": lr, "max_iter": 1, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
                      "tolerance_change": tolerance_change, "history_size": history_size, "line_search_fn": line_search_fn}
        self.state: dict[str, Any] = {"func_evals": 0, "n_iter": 0}

    @torch.no_grad()
    def step(self, closure: Closure) -> float:
        """One iteration from x: direction, line search, x moved. Returns J at the x it started from."""
        group, state, x = self.group, self.state, self.x
        closure = torch.enable_grad()(closure)  # the closure may use autograd; the steps' own arithmetic does not
        loss, flat_grad = closure()
        orig_loss = loss
        current_evals = 1
        state["func_evals"] += 1
        if float(flat_grad.abs().max()) <= group["tolerance_grad"]:
            return orig_loss
        state["n_iter"] += 1
        if state["n_iter"] == 1:
            d = flat_grad.neg()
            old_dirs, old_stps, ro, h_diag = [], [], [], 1.0
        else:
            d, old_dirs, old_stps, ro, h_diag = self._direction(flat_grad)
        prev = state.get("prev_flat_grad")
        if prev is None:
            prev = flat_grad.clone()
        else:
            prev.copy_(flat_grad)
        state.update(d=d, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag, prev_flat_grad=prev, prev_loss=loss)

        # The first step is scaled to a unit ℓ1 gradient (torch's rule); later ones try lr first.
        t = min(1.0, 1.0 / float(flat_grad.abs().sum())) * group["lr"] if state["n_iter"] == 1 else group["lr"]
        state["t"] = t
        gtd = float(flat_grad.dot(d))
        if gtd > -group["tolerance_change"]:
            return orig_loss
        if group["line_search_fn"] is None:
            x.add_(d, alpha=t)
            return orig_loss
        x_init = x.clone()

        def at(x0: torch.Tensor, step: float, direction: torch.Tensor) -> tuple[float, torch.Tensor]:
            x.add_(direction, alpha=step)
            f, g = closure()
            x.copy_(x0)
            return f, g

        # As torch: the line search keeps its own tolerance_change (1e-9), not the optimizer's.
        _, _, t, evals = strong_wolfe(at, x_init, t, d, loss, flat_grad, gtd, max_ls=group["max_eval"] - current_evals)
        state["t"] = t
        state["func_evals"] += evals
        x.add_(d, alpha=t)
        return orig_loss

    def _direction(self, flat_grad: torch.Tensor) -> tuple[torch.Tensor, list, list, list, float]:
        """−H·g by the two-loop recursion over the history, after adding the last step's (s, y)."""
        state, history = self.state, self.group["history_size"]
        old_dirs, old_stps, ro, h_diag = state["old_dirs"], state["old_stps"], state["ro"], float(state["H_diag"])
        y = flat_grad.sub(state["prev_flat_grad"])  # (P,)
        s = state["d"].mul(float(state["t"]))  # (P,)
        ys = float(y.dot(s))
        if ys > 1e-10:  # curvature condition; otherwise the pair would make H indefinite: skip it
            if len(old_dirs) == history:
                old_dirs.pop(0), old_stps.pop(0), ro.pop(0)
            old_dirs.append(y)
            old_stps.append(s)
            ro.append(1.0 / ys)
            h_diag = ys / float(y.dot(y))
        al = [0.0] * len(old_dirs)
        q = flat_grad.neg()
        for i in range(len(old_dirs) - 1, -1, -1):
            al[i] = float(old_stps[i].dot(q)) * ro[i]
            q.add_(old_dirs[i], alpha=-al[i])
        r = torch.mul(q, h_diag)
        for i in range(len(old_dirs)):
            be_i = float(old_dirs[i].dot(r)) * ro[i]
            r.add_(old_stps[i], alpha=al[i] - be_i)
        return r, old_dirs, old_stps, ro, h_diag

    # ---- torch.optim.LBFGS's state_dict format: {"state": {0: ...}, "param_groups": [...]} ----

    def state_dict(self) -> dict[str, Any]:
        """The state, in torch.optim.LBFGS's format (the containers are this optimizer's own: copy
        before the next step if it must not change, as train.checkpoint.snapshot_state does)."""
        return {"state": {0: dict(self.state)}, "param_groups": [{**self.group, "params": [0]}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this optimizer or of torch.optim.LBFGS(max_iter=1) on one tensor."""
        (state,) = state_dict["state"].values() if state_dict["state"] else ({},)
        (group,) = state_dict["param_groups"]
        if group.get("max_iter", 1) != 1:
            raise ValueError(f"an L-BFGS state of max_iter={group['max_iter']}; this optimizer takes one iteration per step")
        self.group.update({k: group[k] for k in self.group if k in group})
        # Copies: the steps append to the lists and write into d and prev_flat_grad, and the
        # caller's dict must not change (train/checkpoint.snapshot_state keeps one to roll back to).
        self.state = {"func_evals": 0, "n_iter": 0, **{k: v for k, v in state.items() if k != "al"}}  # al: torch's scratch
        for key in ("d", "prev_flat_grad"):
            if key in self.state:
                self.state[key] = self.state[key].to(self.x, copy=True)
        for key in ("old_dirs", "old_stps"):
            if key in self.state:
                self.state[key] = [v.to(self.x) for v in self.state[key]]  # entries are never written, only replaced
        if "ro" in self.state:
            self.state["ro"] = [float(r) for r in self.state["ro"]]


def cubic_minimum(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                  bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to `bounds`
    (default: between x1 and x2); the bounds' midpoint where the cubic has no minimum."""
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - _divide(3 * (f1 - f2), x1 - x2)
    d2_square = d1 * d1 - g1 * g2  # torch squares a tensor by one multiplication, as here
    if not d2_square >= 0:  # (NaN too, as torch)
        return (lo + hi) / 2.0
    d2 = math.sqrt(d2_square)
    if x1 <= x2:
        at = x2 - (x2 - x1) * _divide(g2 + d2 - d1, g2 - g1 + 2 * d2)
    else:
        at = x1 - (x1 - x2) * _divide(g1 + d2 - d1, g1 - g2 + 2 * d2)
    return min(max(at, lo), hi)


def _divide(a: float, b: float) -> float:
    """a / b as IEEE 754 divides (torch's 0-d tensors do): ±inf or NaN for b = 0, where Python raises.

    A J linear or concave along d gives a zero denominator; the infinite trial is then clipped to
    the bounds (the line search extrapolates ×10), as in torch.
    """
    if b != 0 or math.isnan(b):
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def strong_wolfe(obj: Callable[[torch.Tensor, float, torch.Tensor], tuple[float, torch.Tensor]], x: torch.Tensor,
                 t: float, d: torch.Tensor, f: float, g: torch.Tensor, gtd: float, c1: float = 1e-4, c2: float = 0.9,
                 tolerance_change: float = 1e-9, max_ls: int = 25) -> tuple[float, torch.Tensor, float, int]:
    """A step t along d from x meeting the strong Wolfe conditions: bracket, then zoom by cubic
    interpolation (Nocedal & Wright, Algorithms 3.5 and 3.6). obj(x, t, d) -> (f, g) at x + t·d.

    Returns (f, g, t, evaluations) at the step found (or the best point of the bracket); the zoom
    stops once the bracket is narrower than `tolerance_change` along d.
    """
    d_norm = float(d.abs().max())
    f_new, g_new = obj(x, t, d)
    evals = 1
    gtd_new = float(g_new.dot(d))
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:  # bracketing
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_g, bracket_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g, bracket_gtd = [t], [f_new], [g_new], [gtd_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_g, bracket_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        t_next = cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f_new, g_new, gtd_new
        t = t_next
        f_new, g_new = obj(x, t, d)
        evals += 1
        gtd_new = float(g_new.dot(d))
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0.0, t], [f, f_new], [g, g_new]

    # Zoom: shrink the bracket around a point meeting the conditions.
    insufficient = False
    low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_minimum(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # A trial too near an end twice running (or outside) moves to a tenth of the bracket inside it.
        top, bottom = max(bracket), min(bracket)
        eps = 0.1 * (top - bottom)
        if min(top - t, t - bottom) < eps:
            if insufficient or t >= top or t <= bottom:
                t = top - eps if abs(t - top) < abs(t - bottom) else bottom + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f_new, g_new = obj(x, t, d)
        evals += 1
        gtd_new = float(g_new.dot(d))
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low]:
            bracket[high], bracket_f[high], bracket_g[high], bracket_gtd[high] = t, f_new, g_new, gtd_new
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], bracket_f[high], bracket_g[high], bracket_gtd[high] = (
                    bracket[low], bracket_f[low], bracket_g[low], bracket_gtd[low])
            bracket[low], bracket_f[low], bracket_g[low], bracket_gtd[low] = t, f_new, g_new, gtd_new
    return bracket_f[low], bracket_g[low], bracket[low], evals

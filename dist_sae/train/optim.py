"""Optimizer drivers over a `Problem`: full-batch L-BFGS / GD, and minibatch Adam / SGD.

The driver owns θ (one flat float64 vector) and the optimizer state; the Problem computes
exact evaluations however it likes (one process, or a Ray cluster). The exactness table of
docs/maths.md §5 is decided here:

| method        | ρ̂ used for the step                                   | gradient            |
| lbfgs, gd     | exact, at the current θ                                | exact ∇J            |
| adam/sgd exact| exact over all data at each refresh (every K steps, or  | unbiased estimate   |
|               | the automatic policy: corrected by the minibatch means  |                     |
|               | between refreshes, staleness bound set by the error     |                     |
|               | measured at each refresh)                              |                     |
| adam/sgd ema  | running average of minibatch means                      | approximate         |
| adam/sgd batch| mean over the current minibatch (the tutorials' way)    | biased baseline     |
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import torch

from dist_sae.config import Config
from dist_sae.data.workunit import WorkUnit
from dist_sae.errors import TrainingError
from dist_sae.train.lbfgs import LBFGS
from dist_sae.sae.objective import Evaluation, Objective, SparsityState, sparsity_state

log = logging.getLogger(__name__)


# The automatic refresh policy's cost model (Trainer._interval_bounds), in pass-1 rows, measured with
# the 64-25-64 model on 2 Ray workers: a pass-1 row costs 1.4-3 µs (encoder forward only), a minibatch
# step 5-9 ms at 512 rows and ~15 ms at 4096 (round trips, Adam, then forward and backward of its rows).
STEP_FIXED_ROWS = 4000
STEP_ROW_COST = 2.0


class Problem(Protocol):
    """What a driver needs from whoever streams the data."""

    rows: int  # m, rows in the whole dataset

    def evaluate(self, theta: np.ndarray, units: list[WorkUnit] | None = None, state: SparsityState | None = None) -> Evaluation:
        """J and ∇J over `units` (None: all data). With state None, ρ̂ is exact over the same units."""

    def layer_means(self, theta: np.ndarray, units: list[WorkUnit] | None = None) -> list[np.ndarray]:
        """Pass 1: mean activation of every encoder layer over `units` (None: all data)."""

    def layer_stats(self, theta: np.ndarray, units: list[WorkUnit] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Pass 1: (mean activation, rows where active) of every encoder layer over `units` (None: all data)."""


def epoch_order(num_batches: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded batch order of an epoch: a function of (seed, epoch) only, so nothing to checkpoint."""
    return np.random.default_rng([seed, epoch]).permutation(num_batches)


class Trainer:
    """Steps θ with the configured optimizer over a Problem.

    Args:
        cfg: the run's config.
        problem: exact evaluations over the data.
        theta0: initial θ (P,) float64.
        batches: minibatch work units, each a list of parts (minibatch methods only).
    """

    def __init__(self, cfg: Config, problem: Problem, theta0: np.ndarray, batches: list[list[WorkUnit]] | None = None) -> None:
        self.cfg, self.problem = cfg, problem
        self.obj = Objective.from_config(cfg)
        self.theta = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
        self.batches = batches or []
        oc = cfg.optim
        if not oc.full_batch and not self.batches:
            raise TrainingError(f"optim.method={oc.method} needs minibatches, but the dataset gave none")
        if oc.method == "lbfgs":
            self.optimizer = LBFGS(
                self.theta.detach(),  # shares θ's storage: the steps move θ in place
                lr=oc.learning_rate,
                # One iteration per step(), so each step can be logged and checkpointed; the line
                # search gets max_ls = max_eval − 1 = 25, torch's _strong_wolfe's default.
                max_eval=1 + 25,
                history_size=oc.history_size,
                tolerance_grad=oc.tolerance_grad,
                tolerance_change=oc.tolerance_change,
                line_search_fn=None if oc.line_search == "none" else oc.line_search,
            )
        elif oc.method in ("gd", "sgd"):
            self.optimizer = torch.optim.SGD([self.theta], lr=oc.learning_rate, momentum=oc.momentum)
        else:
            self.optimizer = torch.optim.Adam([self.theta], lr=oc.learning_rate)
        self.step_count = 0
        self.epoch = 0
        self.position = 0  # next batch index within the epoch's order
        self.evaluations = 0  # full evaluations actually computed (cache misses)
        self.converged = False
        self.rho_state: SparsityState | None = None  # minibatch: the ρ̂ in use
        self.rho_means: list[np.ndarray] | None = None  # the raw layer means rho_state was built from
        self.rho_step = -1  # step at which rho_state was computed
        # Refresh schedule of rho_hat=exact: the staleness bound in steps (the automatic policy
        # adapts it), refreshes so far, their seconds, and the error measured at the last one.
        self.refresh_interval = self._interval_bounds()[0]
        self.refreshes = 0
        self.refresh_s = 0.0
        self.rho_error: dict[str, float] = {}
        self.ema_means: list[np.ndarray] | None = None
        self.dead: np.ndarray | None = None  # minibatch AuxK: (h1,) bool dead-unit mask in use
        self.dead_step = -1  # step at which `dead` was computed
        self.last: Evaluation | None = None
        self._cache: OrderedDict[bytes, Evaluation] = OrderedDict()
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its batch order)

    # ---- full batch ----------------------------------------------------------------------

    def _evaluate_full(self, theta: np.ndarray) -> Evaluation:
        """Exact J, ∇J at θ; L-BFGS re-asks for points its line search already evaluated, so cache by content."""
        key = hashlib.sha1(theta.tobytes()).digest()
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ev = self.problem.evaluate(theta)
        self.evaluations += 1
        if not (math.isfinite(ev.loss) and np.isfinite(ev.grad).all()):
            raise TrainingError(f"J or ∇J became non-finite at step {self.step_count + 1} (J={ev.loss}); lower optim.lr or check the data")
        self._cache[key] = ev
        while len(self._cache) > 8:
            self._cache.popitem(last=False)
        return ev

    def _closure(self) -> tuple[float, torch.Tensor]:
        """(J, ∇J) at the current θ, the gradient a copy that the optimizer keeps."""
        ev = self._evaluate_full(self.theta.detach().numpy())
        self.last = ev
        return ev.loss, torch.from_numpy(ev.grad.copy())

    def _closure_setting_grad(self) -> float:
        """torch.optim's closure: J, with ∇J in θ.grad."""
        loss, self.theta.grad = self._closure()
        return loss

    # ---- minibatch -----------------------------------------------------------------------

    def _next_batch(self) -> list[WorkUnit]:
        if self._order is None or self._order[0] != self.epoch:  # drawn once per epoch, not per step
            self._order = (self.epoch, epoch_order(len(self.batches), self.cfg.run.seed, self.epoch))
        order = self._order[1]
        batch = self.batches[int(order[self.position])]
        self.position += 1
        if self.position == len(self.batches):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def _minibatch_state(self, batch: list[WorkUnit]) -> SparsityState | None:
        """The ρ̂ this step uses, by sparsity.rho_hat (None: the batch's own, computed by the problem)."""
        if not self.obj.uses_rho_hat:
            state = sparsity_state(self.obj, [])
            if self.obj.auxk:
                state.dead = self._dead_units()
            return state
        mode = self.cfg.sparsity.rho_hat
        if mode == "batch":
            return None
        theta = self.theta.detach().numpy()
        if mode == "exact":
            if self.rho_state is None or self._refresh_due(self.rho_step, self.cfg.sparsity.refresh_every or self.refresh_interval):
                self._refresh_rho(theta)
            return self.rho_state
        if self.ema_means is None:  # ema: seed the running average with this batch's pass 1
            self.ema_means = self.problem.layer_means(theta, batch)
            self.rho_step = self.step_count
        self._set_rho(self.ema_means)
        return self.rho_state

    def _refresh_due(self, last_step: int, every: int) -> bool:
        return last_step < 0 or self.step_count - last_step >= every

    def _interval_bounds(self) -> tuple[int, int]:
        """(shortest, longest) staleness bound of the automatic policy, in steps.

        The shortest keeps the refreshes within sparsity.refresh_budget of training by a fixed cost
        model, in units of one row of pass 1: a refresh costs m, a step STEP_FIXED_ROWS + B·STEP_ROW_COST
        (its round trips and optimizer step, then its rows forward and backward), so refreshing every
        S steps spends m / (m + S·step) and S ≥ m·(1−b)/b / step. The longest is an epoch.
        """
        rows = self.problem.rows
        batch = rows / max(1, len(self.batches))  # mean rows per minibatch
        budget = self.cfg.sparsity.refresh_budget
        shortest = max(1, math.ceil(rows * (1 - budget) / budget / (STEP_FIXED_ROWS + batch * STEP_ROW_COST)))
        return shortest, max(shortest, len(self.batches))

    def _refresh_rho(self, theta: np.ndarray) -> None:
        """The exact ρ̂ at θ (pass 1 over all data); first measure the error of the ρ̂ it replaces.

        The automatic policy (refresh_every=0) halves its staleness bound when that error exceeds
        sparsity.refresh_tol and doubles it below a quarter of it, within _interval_bounds(): the
        schedule is a function of the optimisation path only (not of timings), so runs stay
        bit-identical across worker counts.
        """
        t0 = time.perf_counter()
        exact = self.problem.layer_means(theta)
        if self.rho_means is not None:
            self.rho_error = self._rho_error(self.rho_means, exact)
            if not self.cfg.sparsity.refresh_every:
                shortest, longest = self._interval_bounds()
                tol = self.cfg.sparsity.refresh_tol
                if self.rho_error["rho_hat_error"] > tol:
                    self.refresh_interval = max(shortest, self.refresh_interval // 2)
                elif self.rho_error["rho_hat_error"] < tol / 4:
                    self.refresh_interval = min(longest, self.refresh_interval * 2)
        self._set_rho(exact)
        self.rho_step = self.step_count
        self.refreshes += 1
        self.refresh_s += time.perf_counter() - t0

    def _rho_error(self, used: list[np.ndarray], exact: list[np.ndarray]) -> dict[str, float]:
        """|ρ̂_used − ρ̂_exact| over the penalised units: mean and max, absolute and relative to ρ."""
        absolute, relative = [], []
        for layer, rho in zip(self.obj.layers, self.obj.rho):
            diff = np.abs(self.obj.q_of_mean(used[layer - 1]) - self.obj.q_of_mean(exact[layer - 1]))
            absolute.append(diff)
            relative.append(diff / rho)
        absolute, relative = np.concatenate(absolute), np.concatenate(relative)
        return {"rho_hat_error": float(relative.mean()), "rho_hat_error_max": float(relative.max()),
                "rho_hat_error_abs": float(absolute.mean())}

    def _dead_units(self) -> np.ndarray:
        """AuxK's dead units (fired on no row of the whole dataset), refreshed every refresh_every steps, else once per epoch."""
        if self.dead is None or self._refresh_due(self.dead_step, self.cfg.sparsity.refresh_every or len(self.batches)):
            _, fired = self.problem.layer_stats(self.theta.detach().numpy())
            self.dead, self.dead_step = fired[0] == 0, self.step_count
        return self.dead

    def _set_rho(self, layer_means: list[np.ndarray]) -> None:
        self.rho_means = layer_means
        self.rho_state = sparsity_state(self.obj, layer_means)

    def _minibatch_step(self) -> Evaluation:
        batch = self._next_batch()
        ev = self.problem.evaluate(self.theta.detach().numpy(), batch, self._minibatch_state(batch))
        if not (math.isfinite(ev.loss) and np.isfinite(ev.grad).all()):
            raise TrainingError(f"J or ∇J became non-finite at step {self.step_count + 1} (J={ev.loss}); lower optim.lr or check the data")
        if self.cfg.sparsity.rho_hat == "ema" and self.ema_means is not None:
            decay = self.cfg.sparsity.ema_decay
            self.ema_means = [decay * old + (1 - decay) * new for old, new in zip(self.ema_means, ev.layer_means)]
            self.rho_step = self.step_count  # updated every step: the next step's ρ̂ is one step old
        elif self._corrects():
            # Between exact refreshes, move ρ̂ with what the minibatches see at the current θ: an
            # average anchored at the exact ρ̂ of the last refresh. ev.layer_means: this batch's means.
            decay = self.cfg.sparsity.refresh_decay
            self._set_rho([decay * old + (1 - decay) * new for old, new in zip(self.rho_means, ev.layer_means)])
        self.theta.grad = torch.from_numpy(ev.grad.copy())
        self.optimizer.step()
        self.evaluations += 1
        return ev

    def _corrects(self) -> bool:
        sp = self.cfg.sparsity
        return sp.rho_hat == "exact" and not sp.refresh_every and self.obj.uses_rho_hat and self.rho_means is not None

    # ---- stepping ------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics."""
        t0 = time.perf_counter()
        evals_before = self.evaluations
        if self.cfg.optim.full_batch:
            before = self.theta.detach().clone()
            self.optimizer.step(self._closure if self.cfg.optim.method == "lbfgs" else self._closure_setting_grad)
            ev = self.last  # GD: at the θ the step started from
            if self.cfg.optim.method == "lbfgs":
                # Log J at the new θ: the line search's last point (a cache hit), or without a line
                # search a fresh evaluation that the next step's first closure call reuses.
                ev = self._evaluate_full(self.theta.detach().numpy())
            if torch.equal(before, self.theta.detach()):
                self.converged = True  # L-BFGS met its tolerance: θ no longer moves
        else:
            ev = self._minibatch_step()
        self.step_count += 1
        return self.metrics(ev, time.perf_counter() - t0, self.evaluations - evals_before)

    def metrics(self, ev: Evaluation, seconds: float, evaluations: int) -> dict[str, Any]:
        """One metrics.jsonl line from `ev`: for L-BFGS the exact evaluation at the step's new θ; for GD
        at the θ the step started from; for Adam/SGD the minibatch evaluation the update used."""
        sp = self.cfg.sparsity
        full = self.cfg.optim.full_batch
        out: dict[str, Any] = {
            "step": self.step_count,
            "epoch": self.epoch,
            "J": ev.loss,
            **{f"J_{k}": v for k, v in ev.terms.items()},
            "fvu": ev.stats.get("fvu"),
            "grad_norm": float(np.sqrt(np.sum(ev.grad * ev.grad))),  # not BLAS's threaded norm (objective.finalize)
            "evaluations": evaluations,
            "rows": ev.rows,
            "step_s": seconds,
            "examples_per_s": ev.rows * max(evaluations, 1) / seconds if seconds > 0 else None,
            "rho_hat_mode": "exact" if full else sp.rho_hat,
            "rho_hat_staleness": 0 if (full or sp.rho_hat == "batch") else self.step_count - 1 - self.rho_step,
            "clamped_units": ev.stats.get("clamped", 0),
        }
        if not full and sp.rho_hat == "exact" and self.obj.uses_rho_hat:
            # The exact refreshes so far, their cost, and the ρ̂ error accepted (at the last refresh).
            out.update({"refreshes": self.refreshes, "refresh_s": self.refresh_s, "refresh_interval": self.refresh_interval,
                        **self.rho_error})
        for key in ("io_s", "compute_s", "pass1_s", "pass2_s", "workers"):
            if key in ev.stats:
                out[key] = ev.stats[key]
        # Ray: the passes' tail (first worker idle -> pass end) and the last pass's rows/s per device kind.
        out.update({k: v for k, v in ev.stats.items() if k == "tail_s" or k.startswith("rows_per_s_")})
        out.setdefault("workers", 1)  # workers alive: evaluators that have several report stats["workers"]
        rho_target = dict(zip(sp.layers, sp.per_layer("rho"))) if sp.kind == "kl" else {}
        for layer, means in enumerate(ev.layer_means, start=1):
            q = self.obj.q_of_mean(means) if sp.kind == "kl" else means
            out[f"rho_hat{layer}_mean"] = float(q.mean())
            out[f"rho_hat{layer}_min"] = float(q.min())
            out[f"rho_hat{layer}_max"] = float(q.max())
            target = rho_target.get(layer)
            if target is not None:
                out[f"dead{layer}"] = int((q < target / 10).sum())
                out[f"saturated{layer}"] = int((q > 1 - target / 10).sum())
        return out

    # ---- checkpoint state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: θ, optimizer state, data position, ρ̂ state."""
        def tensors(arrays):
            return None if arrays is None else [torch.from_numpy(np.array(a)) for a in arrays]

        return {
            "theta": self.theta.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "meta": {
                "step": self.step_count,
                "epoch": self.epoch,
                "position": self.position,
                "evaluations": self.evaluations,
                "converged": self.converged,
                "rho_step": self.rho_step,
                "dead_step": self.dead_step,
                "refresh_interval": self.refresh_interval,
                "refreshes": self.refreshes,
                "refresh_s": self.refresh_s,
                "rho_error": dict(self.rho_error),
            },
            "rho_means": tensors(self.rho_means),
            "ema_means": tensors(self.ema_means),
            "dead_units": None if self.dead is None else torch.from_numpy(self.dead.astype(np.uint8)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(state["optimizer"])
        meta = state["meta"]
        self.step_count, self.epoch, self.position = meta["step"], meta["epoch"], meta["position"]
        self.evaluations, self.converged, self.rho_step = meta["evaluations"], meta["converged"], meta["rho_step"]
        if state.get("ema_means") is not None:
            self.ema_means = [t.numpy().copy() for t in state["ema_means"]]
        self.dead_step = meta.get("dead_step", -1)
        self.refresh_interval = meta.get("refresh_interval", self._interval_bounds()[0])
        self.refreshes, self.refresh_s = meta.get("refreshes", 0), meta.get("refresh_s", 0.0)
        self.rho_error = dict(meta.get("rho_error", {}))
        if state.get("dead_units") is not None:
            self.dead = state["dead_units"].numpy().astype(bool)
        if state.get("rho_means") is not None:
            self._set_rho([t.numpy().copy() for t in state["rho_means"]])
        self._cache.clear()

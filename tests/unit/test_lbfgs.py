"""train.lbfgs.LBFGS against torch.optim.LBFGS(max_iter=1): the same iterates, each's state loading
into the other, and a training process that never imports torch._dynamo."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from dist_sae.train.lbfgs import LBFGS, cubic_minimum

from util import make_dataset, random_rows

P = 40


def problem(seed: int = 0, kind: str = "robust", size: int = P):
    """A nonconvex f: R^size -> R and x0, f and ∇f in float64. robust: robust regression + cosines;
    rosenbrock: the chained Rosenbrock valley; quartic: a quartic with ripples."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, dtype=torch.float64, generator=gen) / size**0.5
    b = torch.randn(size, dtype=torch.float64, generator=gen)

    def fg(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        r = a @ x - b
        if kind == "robust":
            f = torch.log1p(r * r).sum() + 0.05 * (x * x).sum() + torch.cos(3 * x).sum()
            return float(f), a.T @ (2 * r / (1 + r * r)) + 0.1 * x - 3 * torch.sin(3 * x)
        if kind == "rosenbrock":
            u, v = x[:-1], x[1:]
            f = ((1 - u) ** 2).sum() + 100 * ((v - u * u) ** 2).sum()
            g = torch.zeros_like(x)
            g[:-1] += -2 * (1 - u) - 400 * u * (v - u * u)
            g[1:] += 200 * (v - u * u)
            return float(f), g
        f = (r**4).sum() + torch.sin(5 * x).sum()
        return float(f), a.T @ (4 * r**3) + 5 * torch.cos(5 * x)

    return fg, torch.randn(size, dtype=torch.float64, generator=gen)


def torch_pair(fg, x0, **kw):
    """torch.optim.LBFGS on a copy of x0 and its closure (setting .grad, returning J)."""
    p = torch.nn.Parameter(x0.clone())
    opt = torch.optim.LBFGS([p], **{"max_iter": 1, "max_eval": 26, **kw})

    def closure():
        f, g = fg(p.detach())
        p.grad = g
        return f

    return p, opt, closure


@pytest.mark.parametrize("line_search", ["strong_wolfe", None])
def test_iterates_equal_torch(line_search):
    """60 steps with a history of 5 (so old pairs are dropped). The direction (two-loop) is torch's
    bit for bit, so with a fixed step every θ is identical; the line search's scalars are rounded
    once per operation (torch's 0-d tensors round its sqrt and float/tensor division differently
    in the last bit), so there θ agrees to rounding, amplified over the steps, and the line search
    takes the same evaluations."""
    fg, x0 = problem()
    kw = {"lr": 1.0 if line_search else 0.3, "history_size": 5, "line_search_fn": line_search}
    p, ref, ref_closure = torch_pair(fg, x0, **kw)
    x = x0.clone()
    mine = LBFGS(x, max_eval=26, **kw)
    for step in range(60):
        assert mine.step(lambda: fg(x)) == pytest.approx(ref.step(ref_closure), rel=1e-9)
        if line_search:
            torch.testing.assert_close(x, p.detach(), rtol=0, atol=1e-8, msg=f"step {step}")
        else:
            assert torch.equal(x, p.detach()), f"step {step}"
    assert mine.state["func_evals"] == ref.state[p]["func_evals"] > (60 if line_search else 59)
    assert len(mine.state["old_dirs"]) == 5
    assert fg(x)[0] < fg(x0)[0] - 1


# (seed, objective, lr, max_eval, history): regimes that drive the line search through its rare
# branches, each checked to fail when that branch is altered: bracketing past max_ls (quartic,
# max_eval 2), moves away from the bracket's ends (lr 30; lr 0.05), the zoom's Armijo failure
# (quartic, max_eval 4), low/high swaps (lr 30).
REGIMES = [(0, "quartic", 1.0, 2, 3), (4, "quartic", 1.0, 2, 3), (2, "quartic", 1.0, 4, 3), (4, "robust", 30.0, 4, 3),
           (0, "quartic", 0.05, 26, 100), (0, "rosenbrock", 30.0, 4, 3), (0, "robust", 30.0, 26, 3), (1, "robust", 1.0, 26, 3)]


@pytest.mark.parametrize(("seed", "kind", "lr", "max_eval", "history"), REGIMES)
def test_line_search_takes_torchs_evaluations_in_every_regime(seed, kind, lr, max_eval, history):
    """Steep valleys, long first trials and tight evaluation budgets: every step takes torch's
    evaluations, and θ agrees to rounding."""
    fg, x0 = problem(seed=seed, kind=kind, size=12)
    kw = {"lr": lr, "history_size": history, "line_search_fn": "strong_wolfe"}
    p, ref, ref_closure = torch_pair(fg, x0, **{**kw, "max_eval": max_eval})
    x = x0.clone()
    mine = LBFGS(x, max_eval=max_eval, **kw)
    for step in range(40):
        mine.step(lambda: fg(x))
        ref.step(ref_closure)
        assert mine.state["func_evals"] == ref.state[p]["func_evals"], f"step {step}"
        torch.testing.assert_close(x, p.detach(), rtol=1e-6, atol=1e-8, msg=f"step {step}")


@pytest.mark.parametrize("direction", ["torch_to_mine", "mine_to_torch"])
def test_a_state_dict_continues_in_the_other_optimizer(direction):
    """Checkpoints keep torch's state format: 10 steps in one, then 10 in the other, equal to 20 in one."""
    fg, x0 = problem(seed=1)
    kw = {"lr": 1.0, "history_size": 4, "line_search_fn": "strong_wolfe"}
    p, ref, ref_closure = torch_pair(fg, x0, **kw)
    for _ in range(20):
        ref.step(ref_closure)
    x = x0.clone()
    mine = LBFGS(x, max_eval=26, **kw)
    if direction == "torch_to_mine":
        q, first, first_closure = torch_pair(fg, x0, **kw)
        for _ in range(10):
            first.step(first_closure)
        x.copy_(q.detach())
        mine.load_state_dict(first.state_dict())
        for _ in range(10):
            mine.step(lambda: fg(x))
        torch.testing.assert_close(x, p.detach(), rtol=0, atol=1e-8)
    else:
        for _ in range(10):
            mine.step(lambda: fg(x))
        q, second, second_closure = torch_pair(fg, x, **kw)
        second.load_state_dict(mine.state_dict())
        for _ in range(10):
            second.step(second_closure)
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-8)


def test_the_closure_may_use_autograd():
    """The step's arithmetic runs without autograd, the closure with it (the tied and autograd
    backward modes differentiate J by torch.autograd)."""
    x = torch.tensor([3.0, -2.0], dtype=torch.float64)
    opt = LBFGS(x, line_search_fn="strong_wolfe")

    def closure():
        v = x.clone().requires_grad_(True)
        f = ((v - 1) ** 2).sum()
        (g,) = torch.autograd.grad(f, v)
        return float(f.detach()), g

    for _ in range(5):
        opt.step(closure)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64))
    assert not x.requires_grad


def test_loading_a_state_dict_leaves_it_unchanged():
    """The optimizer copies what it loads: stepping on must not change the dict (a roll-back keeps one)."""
    fg, x0 = problem(seed=2)
    x = x0.clone()
    first = LBFGS(x, history_size=3, line_search_fn="strong_wolfe")
    for _ in range(5):
        first.step(lambda: fg(x))
    saved = first.state_dict()
    kept = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v)
            for k, v in saved["state"][0].items()}
    second = LBFGS(x, history_size=3, line_search_fn="strong_wolfe")
    second.load_state_dict(saved)
    for _ in range(5):
        second.step(lambda: fg(x))
    for key, value in kept.items():
        now = saved["state"][0][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(now, value), key
        elif isinstance(value, list):
            assert len(now) == len(value) and all(a is b for a, b in zip(now, value)), key
        else:
            assert now == value, key


def test_linear_and_concave_directions_extrapolate_as_torch():
    """J linear (or concave) along d: the cubic's denominator is 0. torch's 0-d tensors divide to
    ±inf, clipped to the bracket's ×10; so must ours (Python floats would raise ZeroDivisionError)."""
    for curvature in (0.0, -0.01, -0.25):
        def fg(v):
            return float(-v.sum() + curvature * (v * v).sum()), -torch.ones_like(v) + 2 * curvature * v

        p, ref, ref_closure = torch_pair(fg, torch.zeros(2, dtype=torch.float64), lr=1.0, line_search_fn="strong_wolfe")
        x = torch.zeros(2, dtype=torch.float64)
        mine = LBFGS(x, line_search_fn="strong_wolfe")
        mine.step(lambda: fg(x))
        ref.step(ref_closure)
        assert mine.state["func_evals"] == ref.state[p]["func_evals"] == 27  # ×10 per trial, to max_eval
        assert float(x[0]) > 1e14 and float(p.detach()[0]) > 1e14
        if curvature == 0:  # (concave: J ~ −1e28 by then, its rounding differs between the two)
            torch.testing.assert_close(x, p.detach(), rtol=1e-12, atol=0)


def test_at_a_stationary_point_a_step_does_nothing():
    x = torch.zeros(3, dtype=torch.float64)
    opt = LBFGS(x, tolerance_grad=1e-7, line_search_fn="strong_wolfe")
    assert opt.step(lambda: (2.0, torch.full((3,), 1e-9, dtype=torch.float64))) == 2.0
    assert torch.equal(x, torch.zeros(3, dtype=torch.float64))
    assert (opt.state["n_iter"], opt.state["func_evals"]) == (0, 1)


def test_cubic_minimum_of_a_cubic_and_its_fallbacks():
    """f(x) = x³ − 3x has its local minimum at x = 1; f' = 3x² − 3."""
    f, g = (lambda v: v**3 - 3 * v), (lambda v: 3 * v * v - 3)
    assert cubic_minimum(0.0, f(0.0), g(0.0), 2.0, f(2.0), g(2.0)) == pytest.approx(1.0, abs=1e-12)
    assert cubic_minimum(2.0, f(2.0), g(2.0), 0.0, f(0.0), g(0.0)) == pytest.approx(1.0, abs=1e-12)
    assert cubic_minimum(0.0, f(0.0), g(0.0), 2.0, f(2.0), g(2.0), bounds=(1.5, 3.0)) == 1.5  # clipped
    # f' = 1 at both ends with f rising 2/3 between: the cubic through them has no turning point,
    # so the middle of the bounds.
    assert cubic_minimum(0.0, 0.0, 1.0, 1.0, 2 / 3, 1.0) == 0.5
    assert cubic_minimum(0.0, 0.0, 1.0, 1.0, 2 / 3, 1.0, bounds=(0.2, 0.4)) == pytest.approx(0.3)
    # A NaN discriminant: the middle, as torch (whose `if d2_square >= 0` is False for NaN).
    assert cubic_minimum(0.0, 0.0, math.nan, 1.0, 0.0, 1.0, bounds=(1.0, 10.0)) == 5.5
    # A zero denominator: the clipped infinity, the bound (torch: tensor division by 0 is inf).
    assert cubic_minimum(0.0, 0.0, -1.0, 1.0, -1.0, -1.0, bounds=(1.01, 10.0)) == 10.0


def test_bad_arguments_are_refused():
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="line_search_fn"):
        LBFGS(x, line_search_fn="backtracking")
    p = torch.nn.Parameter(x.clone())
    with pytest.raises(ValueError, match="max_iter=20"):
        LBFGS(x).load_state_dict(torch.optim.LBFGS([p]).state_dict())


def test_training_never_imports_torch_dynamo(tmp_path):
    """torch.optim.Optimizer's constructor imports torch._dynamo (about a second): an L-BFGS run
    (train, its checkpoint and its resume) must not."""
    make_dataset(tmp_path / "d", random_rows(60, 5, seed=2), shard_rows=30)
    code = (
        "import sys; from dist_sae.commands.main import main\n"
        f"args = ['--local', '--quiet', '--data', {str(tmp_path / 'd')!r}, 'model.hidden=[3]', 'run.report=false', 'run.checkpoint_every=2']\n"
        f"assert main(['train', '--out', {str(tmp_path / 'run')!r}, 'optim.steps=4', *args], fast_exit=False) == 0\n"
        f"assert main(['train', '--resume', {str(tmp_path / 'run')!r}, 'optim.steps=6', '--quiet'], fast_exit=False) == 0\n"
        "print('torch' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["True", "False"]

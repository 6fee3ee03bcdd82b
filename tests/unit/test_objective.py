"""J and ∇J of the streamed engine against an independent NumPy implementation of the notes."""

from __future__ import annotations

import numpy as np
import pytest

from dist_sae.api import gradcheck
from dist_sae.data.dataset import Dataset
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import local_problem
from dist_sae.sae.model import SparseAutoencoder

from reference import sparse_ae_cost
from util import config, make_dataset, random_rows


def evaluate_engine(cfg, path, seed=3):
    ds = Dataset.open(path)
    cfg = bind_dataset(cfg, ds)
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(seed)
    theta = model.theta.detach().numpy().copy()
    problem = local_problem(cfg, ds)
    try:
        return problem.evaluate(theta), model, cfg
    finally:
        problem.evaluator.close()


def reference_of(model, cfg, x):
    named = {k: v.detach().numpy() for k, v in model.named_tensors().items()}
    L = model.num_layers
    sp = cfg.sparsity
    kl = dict(zip(sp.layers, zip(sp.per_layer("rho"), sp.per_layer("beta")))) if sp.kind == "kl" else None
    l1 = {layer: sp.l1 for layer in sp.layers} if sp.kind == "l1" else None
    J, dW, db = sparse_ae_cost(
        [named[f"W{l}"] for l in range(1, L + 1)],
        [named[f"b{l}"] for l in range(1, L + 1)],
        x,
        cfg.model.activation,
        cfg.model.output,
        kl=kl,
        lam=cfg.loss.weight_decay,
        l1=l1,
    )
    return J, {**{f"W{l}": dW[l - 1] for l in range(1, L + 1)}, **{f"b{l}": db[l - 1] for l in range(1, L + 1)}}


def assert_grad_matches(ev, model, ref_grad, rtol):
    import torch

    grads = model.named_tensors(torch.from_numpy(ev.grad))
    for name, value in ref_grad.items():
        np.testing.assert_allclose(grads[name].numpy(), value, rtol=rtol, atol=1e-14, err_msg=name)


CASES = [
    dict(model__hidden=[5]),
    dict(model__hidden=[6, 3], sparsity__layers=[1, 2], sparsity__rho=[0.05, 0.1], sparsity__beta=[3.0, 0.5]),
    dict(model__hidden=[5], model__activation="tanh", model__output="linear", sparsity__rho=0.2),
    dict(model__hidden=[4], sparsity__kind="none"),
    dict(model__hidden=[5], model__activation="relu", model__output="linear", sparsity__kind="l1", sparsity__l1=0.01),
]


@pytest.mark.parametrize("overrides", CASES, ids=["kl-1layer", "kl-stacked", "tanh", "plain", "l1-relu"])
def test_engine_matches_numpy_reference(tmp_path, overrides):
    x = random_rows(103, 7, seed=1)
    # Uneven shards (40, 40, 23) and a block size (16 after chunk alignment) that divides none of them.
    make_dataset(tmp_path / "d", x, shard_rows=40)
    cfg = config(tmp_path / "d", data__block_rows=17, loss__weight_decay=1e-3, **overrides)
    ev, model, cfg = evaluate_engine(cfg, tmp_path / "d")
    J, ref = reference_of(model, cfg, x)
    assert ev.rows == 103
    assert ev.loss == pytest.approx(J, rel=1e-12)
    assert_grad_matches(ev, model, ref, rtol=1e-10)


def test_float32_compute_close_to_float64_reference(tmp_path):
    x = random_rows(64, 6, seed=2)
    make_dataset(tmp_path / "d", x, shard_rows=30)
    cfg = config(tmp_path / "d", model__hidden=[4], compute__dtype="float32")
    ev, model, cfg = evaluate_engine(cfg, tmp_path / "d")
    J, ref = reference_of(model, cfg, x)
    assert ev.loss == pytest.approx(J, rel=1e-5)
    assert ev.grad.dtype == np.float64  # accumulated in float64 whatever the compute dtype
    assert_grad_matches(ev, model, ref, rtol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [dict(model__hidden=[5]), dict(model__hidden=[6, 3], sparsity__layers=[1, 2])],
    ids=["one-layer", "stacked"],
)
def test_gradient_check_below_1e9(tmp_path, overrides):
    make_dataset(tmp_path / "d", random_rows(60, 6, seed=4), shard_rows=25)
    result = gradcheck(config(tmp_path / "d", **overrides))
    assert result["coords"] == result["params"]
    assert result["relative_error"] < 1e-9


def test_results_independent_of_block_size_and_shard_split(tmp_path):
    x = random_rows(211, 9, seed=5)
    results = []
    # (37, 100) and (13, 1000): units of several small shards (74 rows of two shards; all 211 rows of 17)
    for shard_rows, block_rows in [(211, 1000), (100, 16), (37, 7), (13, 5), (37, 100), (13, 1000)]:
        path = tmp_path / f"d{shard_rows}-{block_rows}"
        make_dataset(path, x, shard_rows=shard_rows, chunk_rows=4)
        ev, _, _ = evaluate_engine(config(path, model__hidden=[6], data__block_rows=block_rows), path)
        results.append(ev)
    for ev in results[1:]:
        assert ev.loss == pytest.approx(results[0].loss, rel=1e-12)
        np.testing.assert_allclose(ev.grad, results[0].grad, rtol=1e-12, atol=1e-16)


def test_one_pass_equals_two_pass(tmp_path):
    make_dataset(tmp_path / "d", random_rows(150, 8, seed=6), shard_rows=60)
    two, _, _ = evaluate_engine(config(tmp_path / "d", model__hidden=[5], data__block_rows=32, sparsity__passes=2), tmp_path / "d")
    one, _, _ = evaluate_engine(config(tmp_path / "d", model__hidden=[5], data__block_rows=32, sparsity__passes=1), tmp_path / "d")
    auto, _, _ = evaluate_engine(config(tmp_path / "d", model__hidden=[5], data__block_rows=32), tmp_path / "d")
    assert auto.loss == one.loss and np.array_equal(auto.grad, one.grad)  # the default takes one pass here
    assert one.loss == pytest.approx(two.loss, rel=1e-12)
    np.testing.assert_allclose(one.grad, two.grad, rtol=1e-12, atol=1e-15)
    assert "pass1_s" in two.stats and "pass1_s" not in one.stats  # one-pass really skipped pass 1


def test_kl_clamps_and_counts_units(tmp_path):
    make_dataset(tmp_path / "d", random_rows(50, 4, seed=7), shard_rows=50)
    cfg = config(tmp_path / "d", model__hidden=[3])
    ds = Dataset.open(tmp_path / "d")
    cfg = bind_dataset(cfg, ds)
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(0)
    with np.errstate(all="ignore"):
        model.param("b1").data[:] = -1e3  # every unit dead: ρ̂ = 0 exactly
    problem = local_problem(cfg, ds)
    ev = problem.evaluate(model.theta.detach().numpy().copy())
    problem.evaluator.close()
    assert ev.stats["clamped"] == 3
    assert np.isfinite(ev.loss) and np.isfinite(ev.grad).all()
    assert ev.sparsity.rho_hat[0] == pytest.approx([cfg.sparsity.clamp_eps] * 3)


def test_block_cache_serves_later_passes_within_its_budget(tmp_path):
    from dist_sae.train.passes import PassRunner

    make_dataset(tmp_path / "d", random_rows(100, 4), shard_rows=100)
    ds = Dataset.open(tmp_path / "d")
    cfg = bind_dataset(config(tmp_path / "d", model__hidden=[3]), ds)
    runner = PassRunner(cfg, ds)
    units = ds.units(16)
    first = [runner.load(u) for u in units]
    assert all(runner.load(u) is x for u, x in zip(units, first))  # cached: the same tensors
    tiny = PassRunner(bind_dataset(config(tmp_path / "d", model__hidden=[3], data__cache_mb=0), ds), ds)
    assert tiny.load(units[0]) is not tiny.load(units[0])  # cache_mb=0 always streams
    runner.close(), tiny.close()
    ev_cached, _, _ = evaluate_engine(config(tmp_path / "d", model__hidden=[3]), tmp_path / "d")
    ev_stream, _, _ = evaluate_engine(config(tmp_path / "d", model__hidden=[3], data__cache_mb=0), tmp_path / "d")
    assert ev_cached.loss == ev_stream.loss and (ev_cached.grad == ev_stream.grad).all()

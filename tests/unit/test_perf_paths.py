"""The fast paths of issue #8 against their references, and the benchmark suite's output shape.

The hand-written forward/backward must equal autograd's surrogate-loss gradient to 1e-12 in
float64; the one-pass sums must equal the autograd one-pass; the min_units cut must keep every row
exactly once; the cached per-unit data sums must equal fresh ones. No timing is asserted anywhere.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from dist_sae.config import load_config
from dist_sae.data.dataset import Dataset
from dist_sae.data.workunit import MIN_UNIT_ROWS
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import local_problem
from dist_sae.sae.model import SparseAutoencoder
from dist_sae.sae.objective import Objective
from dist_sae.sae.backward import handwritten_supported
from dist_sae.sae.blocks import onepass_block, pass1_block, pass2_block
from dist_sae.bench.compute import PlainTorch
from dist_sae.bench.peer import numpy_cost, run_peer

from util import config, global_rows, make_dataset, random_rows


def _setup(hidden, activation="sigmoid", output="sigmoid", kind="kl", layers=(1,), seed=0, rows=37, visible=9):
    cfg = load_config(None, {"model.visible": visible, "model.hidden": list(hidden), "model.activation": activation,
                             "model.output": output, "sparsity.kind": kind, "sparsity.layers": list(layers)})
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(seed)
    with torch.no_grad():  # non-zero biases, so their gradients are tested too
        model.theta.add_(0.1 * torch.randn(model.num_params, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64))
    x = torch.rand(rows, visible, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return model, Objective.from_config(cfg), x


def _both(fn):
    """fn(backward) with the hand-written path, then with autograd."""
    return fn("handwritten"), fn("autograd")


def _assert_sums_equal(fast, slow):
    assert fast.keys() == slow.keys()
    for key in slow:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-12, atol=1e-12, err_msg=key)


CASES = [
    ([5], "sigmoid", "sigmoid", "kl", (1,)),
    ([5], "tanh", "linear", "kl", (1,)),
    ([6, 3], "sigmoid", "linear", "kl", (1, 2)),
    ([6, 4, 2], "tanh", "sigmoid", "kl", (2,)),
    ([5], "relu", "linear", "l1", (1,)),
    ([6, 3], "linear", "linear", "l1", (1, 2)),
    ([5], "sigmoid", "sigmoid", "none", (1,)),
    ([4, 3], "relu", "sigmoid", "none", (1,)),
]


@pytest.mark.parametrize("hidden,activation,output,kind,layers", CASES)
@pytest.mark.parametrize("noisy", [False, True])
def test_handwritten_pass2_equals_autograd(hidden, activation, output, kind, layers, noisy):
    model, obj, x = _setup(hidden, activation, output, kind, layers)
    assert handwritten_supported(model, obj)
    x_in = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if noisy else None
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(hidden[layer - 1], generator=gen, dtype=torch.float64) for layer in layers] if kind == "kl" else None
    fast, slow = _both(lambda b: pass2_block(model, obj, x, g, x_in, backward=b))
    _assert_sums_equal(fast, slow)


@pytest.mark.parametrize("hidden,activation,output", [([7], "sigmoid", "sigmoid"), ([7], "tanh", "linear"), ([6, 3], "sigmoid", "linear")])
def test_handwritten_onepass_equals_autograd(hidden, activation, output):
    model, obj, x = _setup(hidden, activation, output, "kl", (1,))
    fast, slow = _both(lambda b: onepass_block(model, obj, x, backward=b))
    assert {"S_W", "S_b"} <= fast.keys()
    _assert_sums_equal(fast, slow)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "satlin"])
def test_pass1_fast_forward_equals_encoder(activation):
    model, _, x = _setup([6, 3], activation, "linear", "none")
    sums = pass1_block(model, x)
    acts = model.encode_layers(x)
    np.testing.assert_array_equal(sums["act"], torch.cat([a.detach().sum(0) for a in acts]).numpy())


def test_unsupported_shapes_take_autograd():
    cfg = load_config(None, {"model.visible": 6, "model.hidden": [4], "model.tied": True})
    assert not handwritten_supported(SparseAutoencoder.from_config(cfg), Objective.from_config(cfg))
    cfg = load_config(None, {"model.visible": 6, "model.hidden": [4], "model.activation": "relu", "model.output": "linear",
                             "sparsity.kind": "topk", "sparsity.k": 2})
    assert not handwritten_supported(SparseAutoencoder.from_config(cfg), Objective.from_config(cfg))


def test_float32_handwritten_close_to_float64():
    model, obj, x = _setup([5], "sigmoid", "sigmoid", "kl", (1,), rows=200)
    g = [torch.full((5,), 0.3, dtype=torch.float64)]
    ref = pass2_block(model, obj, x, g)
    model32 = SparseAutoencoder(9, [5]).to(torch.float32)
    with torch.no_grad():
        model32.theta.copy_(model.theta)
    got = pass2_block(model32, obj, x.float(), [g[0].float()])
    assert got["grad"].dtype == np.float64
    np.testing.assert_allclose(got["grad"], ref["grad"], rtol=1e-4, atol=1e-4)


def test_min_units_cut_counts_every_row_once(tmp_path):
    rows = 4 * MIN_UNIT_ROWS + 13
    ds = make_dataset(tmp_path / "d", random_rows(rows, 3), shard_rows=7000, chunk_rows=256)
    units = ds.units(16384, min_units=4)
    assert len(units) >= 4
    covered = np.zeros(rows, dtype=int)
    for u in units:
        covered[global_rows(u, [s.rows for s in ds.shards])] += 1
    assert (covered == 1).all()
    assert [u.id for u in units] == list(range(len(units)))
    # Without min_units, the usual cut: shards of 7000, 7000 and 2397 rows, the first two packed into one unit.
    assert [u.rows for u in ds.units(16384)] == [14000, 2397]
    tiny = make_dataset(tmp_path / "t", random_rows(70, 3), shard_rows=30)
    assert [u.rows for u in tiny.units(16384, min_units=4)] == [70]  # never units under MIN_UNIT_ROWS rows


def test_cached_data_sums_and_results_repeat_exactly(tmp_path):
    data = tmp_path / "d"
    make_dataset(data, random_rows(300, 6, seed=2), shard_rows=100)
    cfg = config(data, model__hidden=[4], data__block_rows=64)
    ds = Dataset.open(data)
    cfg = bind_dataset(cfg, ds)
    problem = local_problem(cfg, ds)
    theta = SparseAutoencoder.from_config(cfg)
    theta.reset_parameters(0)
    theta = theta.theta.detach().numpy().copy()
    first = problem.evaluate(theta)
    second = problem.evaluate(theta)  # blocks and their Σx, Σ‖x‖² now come from the cache
    assert first.loss == second.loss and np.array_equal(first.grad, second.grad)
    assert first.stats["fvu"] == second.stats["fvu"]
    streamed = local_problem(cfg.with_overrides({"data.cache_mb": 0}), ds).evaluate(theta)
    assert streamed.loss == first.loss and np.array_equal(streamed.grad, first.grad)
    problem.evaluator.close()


def _peer_case(tmp_path, rows: int, shard_rows: int, seed: int, init_seed: int):
    """(rows x, dataset folder, bound 64-25-64 config, seeded θ) for the NumPy peer checks."""
    data = tmp_path / "d"
    x = random_rows(rows, 64, seed=seed)
    make_dataset(data, x, shard_rows=shard_rows)
    cfg = bind_dataset(config(data, model__hidden=[25]), Dataset.open(data))
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(init_seed)
    return x, data, cfg, model.theta.detach().numpy().copy()


def test_numpy_peer_cost_matches_the_engine(tmp_path):
    x, data, cfg, theta = _peer_case(tmp_path, 200, 200, seed=4, init_seed=1)
    problem = local_problem(cfg, Dataset.open(data))
    ev = problem.evaluate(theta)
    cost, grad = numpy_cost(theta, x, 64, 25, 1e-4, 3.0, 0.01)
    assert cost == pytest.approx(ev.loss, rel=1e-12)
    np.testing.assert_allclose(grad, ev.grad, rtol=1e-9, atol=1e-12)
    plain = PlainTorch(torch.from_numpy(x), cfg, 64)
    for loss, g in (plain.whole(theta), plain.blocked(theta)):
        assert loss == pytest.approx(ev.loss, rel=1e-12)
        np.testing.assert_allclose(g, ev.grad, rtol=1e-9, atol=1e-12)
    problem.evaluator.close()


def test_numpy_peer_runs_as_its_own_process(tmp_path):
    """`python -m dist_sae.bench.peer`: L-BFGS-B lowers J, reports the J of the θ it saved, and never loads torch."""
    x, data, _, theta0 = _peer_case(tmp_path, 300, 120, seed=5, init_seed=0)
    result = run_peer(data, theta0, 5, tmp_path, (25, 1e-4, 3.0, 0.01), threads=1)
    final = np.load(tmp_path / "peer_theta0.npy.final.npy")
    assert result["J"] == pytest.approx(numpy_cost(final, x, 64, 25, 1e-4, 3.0, 0.01)[0], rel=1e-12)
    assert result["J"] < numpy_cost(theta0, x, 64, 25, 1e-4, 3.0, 0.01)[0]
    assert 1 <= result["iterations"] <= 5 and result["wall_s"] > 0
    assert result["torch_imported"] is False


def test_float64_sums_of_float32_blocks_in_chunks_equal_the_whole_block_sums():
    from dist_sae.sae.sums import SUM_CHUNK, column_sums64, data_block_sums, layer_sums

    x = torch.from_numpy(random_rows(1000, 300, seed=9, low=-1.0, high=3.0)).float()
    assert SUM_CHUNK // 300 < 1000  # more than one chunk
    col, sq = column_sums64(x, squares=True)
    x64 = x.double()
    np.testing.assert_allclose(col.numpy(), x64.sum(0).numpy(), rtol=1e-15, atol=1e-12)
    assert col.dtype == torch.float64 and float(sq) == pytest.approx(float((x64 * x64).sum()), rel=1e-13)  # float64 rounding
    assert torch.equal(column_sums64(x64)[0], x64.sum(0))  # float64 blocks are summed as they are
    assert column_sums64(x[:0], squares=True)[0].tolist() == [0.0] * 300
    sums = data_block_sums(x)
    assert sums["sum_x"].dtype == np.float64 and sums["sum_x2"] == pytest.approx(float(sq), rel=1e-15)
    a = torch.rand(1000, 300, generator=torch.Generator().manual_seed(1))
    act, fired = layer_sums([a], "sigmoid")
    np.testing.assert_allclose(act, a.double().sum(0).numpy(), rtol=1e-15)
    assert np.array_equal(fired, (a > 0.5).sum(0).double().numpy())  # exact counts from a float32 mask

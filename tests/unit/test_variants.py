"""Sparsity variants as configuration of one trainer: KL, L1, top-k (+AuxK), none, denoising."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_sae.api import gradcheck, train
from dist_sae.data.dataset import Dataset
from dist_sae.train.passes import PassRunner
from dist_sae.train.problem import local_problem
from dist_sae.train.inputs import bind_dataset
from dist_sae.errors import ConfigError
from dist_sae.sae.model import SparseAutoencoder, load_model

from util import config, make_dataset, random_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "d"
    make_dataset(path, random_rows(70, 6, seed=11), shard_rows=30)
    return path


GRADCHECK = {
    "kl-two-layers": dict(model__hidden=[6, 4], sparsity__layers=[1, 2], sparsity__rho=[0.05, 0.2], sparsity__beta=[2.0, 1.0]),
    "kl-tanh": dict(model__hidden=[5], model__activation="tanh", model__output="linear", sparsity__rho=0.3),
    "l1-relu": dict(model__hidden=[5], model__activation="relu", model__output="linear", sparsity__kind="l1", sparsity__l1=0.05),
    "topk-relu-tied-decnorm": dict(
        model__hidden=[6], model__activation="relu", model__output="linear", model__tied=True, model__decoder_norm=True,
        sparsity__kind="topk", sparsity__k=2,
    ),
    "none-denoising-gaussian": dict(model__hidden=[4], sparsity__kind="none", noise__kind="gaussian", noise__sigma=0.2),
    "kl-denoising-mask": dict(model__hidden=[4], noise__kind="mask", noise__p=0.3),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradient_check_every_variant(data, name):
    # Top-k is checked on a fixed support: ε = 1e-5 moves no pre-activation across the k-th largest
    # here (at 1e-3 the support flips and the check reads 0.3). Tied/normalised top-k decoders have
    # enough curvature that ε = 1e-4 reads ~5e-9 of pure truncation error (it falls as ε²); so does
    # the plain autoencoder, whose gradient at initialisation is small (1.1e-9 at 1e-4, 7.6e-11 at 1e-5).
    epsilon = 1e-5 if name.startswith(("topk", "none")) else 1e-4
    result = gradcheck(config(data, **GRADCHECK[name]), epsilon=epsilon)
    assert result["relative_error"] < 1e-9, result


def _evaluate(cfg, path, seed=0, theta=None):
    ds = Dataset.open(path)
    cfg = bind_dataset(cfg, ds)
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(seed)
    problem = local_problem(cfg, ds)
    try:
        return problem.evaluate(model.theta.detach().numpy().copy() if theta is None else theta), cfg
    finally:
        problem.evaluator.close()


def test_topk_keeps_exactly_k_active_units(data):
    ev, cfg = _evaluate(config(data, model__hidden=[6], model__activation="linear", model__output="linear", sparsity__kind="topk", sparsity__k=3), data)
    assert ev.stats["l0"] == [3.0]
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(0)
    codes = model.encode(random_rows(50, 6, seed=1))
    assert ((codes != 0).sum(axis=1) == 3).all()


def test_auxk_sees_only_dead_units(data):
    base = dict(model__hidden=[8], model__activation="relu", model__output="linear", sparsity__kind="topk", sparsity__k=2)
    cfg = config(data, **base, sparsity__auxk=2)
    ds = Dataset.open(data)
    cfg = bind_dataset(cfg, ds)
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(0)
    problem = local_problem(cfg, ds)
    means, fired = problem._pass1(model.theta.detach().numpy(), problem.units)
    ev = problem.evaluate(model.theta.detach().numpy().copy())
    problem.evaluator.close()
    dead = fired[0] == 0
    assert ev.sparsity.dead is not None and (ev.sparsity.dead == dead).all()
    assert ev.stats["dead"] == [int(dead.sum())]
    assert ("auxk" in ev.terms) == True and (ev.terms["auxk"] > 0) == bool(dead.any())


def test_auxk_update_matches_whole_batch_autograd(data):
    """AuxK reconstructs a stop-gradient residual, so its update is not ∇ of a function and central
    differences cannot check it; compare with an independent whole-batch autograd formulation."""
    from dist_sae.sae.model import keep_topk

    base = dict(model__hidden=[8], model__activation="linear", model__output="linear", model__decoder_norm=True,
                sparsity__kind="topk", sparsity__k=2)
    with_aux, cfg = _evaluate(config(data, **base, sparsity__auxk=3, sparsity__auxk_coef=0.5, data__block_rows=16), data)
    without, _ = _evaluate(config(data, **base), data)
    assert 0 < with_aux.stats["dead"][0] < 8  # the check is not vacuous
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(0)
    x = torch.from_numpy(_rows(data))
    fwd = model(x)
    dead = torch.from_numpy(with_aux.sparsity.dead)
    z = fwd.pre[0].masked_fill(~dead, float("-inf"))
    code = keep_topk(z, min(3, int(dead.sum())))  # only dead units compete
    residual = (x - fwd.output).detach()
    loss = 0.5 * 0.5 * ((residual - code @ model.weight(2).t()) ** 2).sum() / x.shape[0]
    (grad,) = torch.autograd.grad(loss, model.theta)
    np.testing.assert_allclose(with_aux.grad - without.grad, grad.numpy(), rtol=1e-9, atol=1e-14)
    assert with_aux.terms["auxk"] == pytest.approx(float(loss.detach()), rel=1e-12)


def _rows(path):
    from dist_sae.data.reader import BlockReader

    ds = Dataset.open(path)
    with BlockReader(ds) as reader:
        return np.concatenate([reader.read(u) for u in ds.units(1000)])


def test_denoising_noise_is_seeded_per_work_unit(data):
    cfg = bind_dataset(config(data, model__hidden=[4], noise__kind="gaussian", noise__sigma=0.5), Dataset.open(data))
    a, b = PassRunner(cfg, Dataset.open(data)), PassRunner(cfg, Dataset.open(data))
    units = Dataset.open(data).units(16)
    blocks = {u.id: torch.from_numpy(a.reader.read(u)) for u in units}
    first = {u.id: a.corrupt(blocks[u.id], u) for u in units}
    second = {u.id: b.corrupt(blocks[u.id], u) for u in reversed(units)}  # another "worker", another order
    for u in units:
        assert torch.equal(first[u.id], second[u.id])
        assert not torch.equal(first[u.id], blocks[u.id])
    assert not torch.allclose(first[units[0].id][:5], first[units[1].id][:5])  # units get different noise
    a.close(), b.close()


def test_evaluate_reports_clean_objective_for_denoising(tmp_path, data):
    cfg = config(data, run__out=str(tmp_path / "r"), model__hidden=[4], noise__kind="mask", noise__p=0.5, optim__steps=3)
    train(cfg)
    from dist_sae.api import evaluate

    clean, _ = evaluate(tmp_path / "r", data, ["workers.engine=local"])
    noisy, _ = evaluate(tmp_path / "r", data, ["workers.engine=local", "noise.kind=mask", "noise.p=0.5"])
    assert clean.terms["reconstruction"] < noisy.terms["reconstruction"]


def test_per_layer_weight_decay_excludes_biases(data):
    ev, cfg = _evaluate(config(data, model__hidden=[4], sparsity__kind="none", loss__weight_decay=[0.5, 0.0]), data)
    model = SparseAutoencoder.from_config(cfg)
    model.reset_parameters(0)
    w1 = model.param("W1").detach().numpy()
    assert ev.terms["weight_decay"] == pytest.approx(0.25 * (w1**2).sum(), rel=1e-12)


def test_decoder_norm_keeps_unit_columns_after_save(tmp_path, data):
    cfg = config(data, run__out=str(tmp_path / "r"), model__hidden=[5], model__activation="relu", model__output="linear",
                 model__decoder_norm=True, sparsity__kind="topk", sparsity__k=2, optim__steps=5)
    train(cfg)
    model, _ = load_model(tmp_path / "r")
    np.testing.assert_allclose(np.linalg.norm(model.named_tensors()["W2"].detach().numpy(), axis=0), 1.0, rtol=1e-12)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.activation=relu"], "use sparsity.kind=l1 or sparsity.kind=topk"),
        (["sparsity.kind=topk", "sparsity.k=26", "model.activation=relu"], "exceeds the 25 units"),
        (["sparsity.kind=topk", "model.activation=relu"], "needs sparsity.k >= 1"),
        (["sparsity.kind=topk", "sparsity.k=3"], "needs model.activation=linear or relu, got sigmoid"),
        (["sparsity.auxk=4"], "sparsity.auxk needs sparsity.kind=topk"),
        (["sparsity.kind=topk", "sparsity.k=3", "sparsity.auxk=4", "model.activation=relu"], "model.output=linear"),
        (["loss.weight_decay=[1, 2, 3]"], "2 weight matrices"),
    ],
)
def test_nonsense_configurations_are_rejected_before_training(overrides, needle):
    from dist_sae.config import load_config

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_auxk_works_with_minibatch_optimizers_and_resumes(tmp_path, data):
    """The dead-unit mask comes from an exact pass 1 over all data on ρ̂'s refresh schedule."""
    cfg = config(data, run__out=str(tmp_path / "r"), model__hidden=[8], model__activation="relu", model__output="linear",
                 sparsity__kind="topk", sparsity__k=1, sparsity__auxk=4, optim__method="adam", optim__batch_size=20,
                 optim__steps=6, sparsity__refresh_every=2, run__checkpoint_every=3)
    full = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["J_auxk"] > 0 for line in lines)  # 7 of 8 units are dead at this k: AuxK is live
    part = train(cfg.with_overrides({"run.out": str(tmp_path / "p"), "optim.steps": 3}))
    assert part.steps == 3
    resumed = train(cfg.with_overrides({"run.out": str(tmp_path / "p")}), resume=True)
    np.testing.assert_array_equal(resumed.theta, full.theta)


def test_denoising_noise_does_not_depend_on_how_rows_are_cut(data):
    """The same rows get the same noise as one unit or as several (local vs Ray, any batch_parts)."""
    from dist_sae.data.workunit import WorkUnit

    cfg = bind_dataset(config(data, model__hidden=[4], noise__kind="gaussian", noise__sigma=0.5), Dataset.open(data))
    runner = PassRunner(cfg, Dataset.open(data))
    x = torch.from_numpy(runner.reader.read(WorkUnit.of(0, 1, 0, 30)))
    whole = runner.corrupt(x, WorkUnit.of(0, 1, 0, 30))
    pieces = torch.cat([runner.corrupt(x[a:b], WorkUnit.of(i + 7, 1, a, b)) for i, (a, b) in enumerate([(0, 4), (4, 17), (17, 30)])])
    assert torch.equal(whole, pieces)
    runner.close()

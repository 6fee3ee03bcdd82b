"""Optimizer drivers, ρ̂ modes, training runs, checkpoints and resume (single process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_sae.train import checkpoint
from dist_sae.session import initial_theta
from dist_sae.api import train
from dist_sae.train.checkpoint import latest_checkpoint, list_checkpoints
from dist_sae.data.dataset import Dataset
from dist_sae.train.inputs import bind_dataset
from dist_sae.train.problem import local_problem
from dist_sae.train.units import TORCH_DEFAULT_THREADS, local_threads, minibatches, pass_units
from dist_sae.errors import CheckpointError, DataError
from dist_sae.sae.model import load_model
from dist_sae.train.optim import Trainer

from util import config, global_rows, make_dataset, random_rows, smooth_patches


def sigmoid_means(theta_model, x):
    return theta_model.encode(x, layer=1).mean(axis=0)


@pytest.fixture
def dataset(tmp_path):
    # Rows whose mean differs by block, so a batch's ρ̂ differs clearly from the full-data ρ̂.
    x = np.concatenate([random_rows(64, 6, seed=1, low=0.1, high=0.3), random_rows(64, 6, seed=2, low=0.6, high=0.9)])
    make_dataset(tmp_path / "d", x, shard_rows=64)
    return tmp_path / "d", x


def _trainer(path, **overrides):
    cfg = config(path, model__hidden=[4], optim__method="adam", optim__batch_size=32, **overrides)
    ds = Dataset.open(path)
    cfg = bind_dataset(cfg, ds)
    problem = local_problem(cfg, ds)
    seen = []
    evaluate = problem.evaluate

    def spy(theta, units=None, state=None):
        ev = evaluate(theta, units, state)
        seen.append((units, ev.sparsity.rho_hat[0].copy()))
        return ev

    problem.evaluate = spy
    return Trainer(cfg, problem, initial_theta(cfg, None), minibatches(ds, 32, 1)), seen


def test_minibatch_exact_uses_full_data_rho_hat_and_batch_mode_does_not(dataset):
    from dist_sae.sae.model import SparseAutoencoder

    path, x = dataset
    exact, seen_exact = _trainer(path, sparsity__rho_hat="exact")
    batch, seen_batch = _trainer(path, sparsity__rho_hat="batch")
    model = SparseAutoencoder(6, [4])
    model.reset_parameters(0)
    full = sigmoid_means(model, x)
    exact.step()
    batch.step()
    units, used_exact = seen_exact[0]
    np.testing.assert_allclose(used_exact, full, rtol=1e-12)  # the whole dataset's ρ̂
    units, used_batch = seen_batch[0]
    rows = np.concatenate([x[global_rows(u, [64] * -(-len(x) // 64))] for u in units])
    np.testing.assert_allclose(used_batch, sigmoid_means(model, rows), rtol=1e-12)  # this batch's only
    assert np.abs(used_batch - full).max() > 1e-3
    m_exact = exact.metrics(exact.last or _ev(exact), 1.0, 1)
    assert m_exact["rho_hat_mode"] == "exact"


def _ev(trainer):
    return trainer.problem.evaluate(trainer.theta.detach().numpy())


def test_exact_rho_hat_refreshes_every_k_steps(dataset):
    path, _ = dataset
    trainer, _ = _trainer(path, sparsity__rho_hat="exact", sparsity__refresh_every=3)
    steps = [trainer.step() for _ in range(7)]
    assert [m["rho_hat_staleness"] for m in steps] == [0, 1, 2, 0, 1, 2, 0]
    assert trainer.epoch == 1 and trainer.position == 3  # 4 batches per epoch


def test_lbfgs_on_patches_lowers_j_and_mean_activation_approaches_rho(tmp_path):
    make_dataset(tmp_path / "d", smooth_patches(2000, seed=3), shard_rows=700, chunk_rows=100)
    cfg = config(tmp_path / "d", run__out=str(tmp_path / "run"), optim__steps=60, data__block_rows=500)
    result = train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["J"] < 0.5 * lines[0]["J"]
    first, last = lines[0]["rho_hat1_mean"], lines[-1]["rho_hat1_mean"]
    assert abs(last - 0.01) < 0.25 * abs(first - 0.01)
    assert lines[-1]["rho_hat_mode"] == "exact" and lines[-1]["rows"] == 2000
    model, saved = load_model(tmp_path / "run")
    assert saved.model.visible == 64 and model.num_params == 25 * 64 * 2 + 25 + 64
    assert result.steps == 60


def test_run_dir_is_never_silently_reused(tmp_path):
    make_dataset(tmp_path / "d", random_rows(40, 4), shard_rows=40)
    cfg = config(tmp_path / "d", run__out=str(tmp_path / "run"), model__hidden=[3], optim__steps=3)
    train(cfg)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume .* or --overwrite"):
        train(cfg)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    train(cfg, overwrite=True)


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_resume_reaches_the_same_parameters(tmp_path, method):
    make_dataset(tmp_path / "d", smooth_patches(300, seed=1), shard_rows=128, chunk_rows=16)
    common = dict(model__hidden=[6], optim__method=method, optim__batch_size=50, run__checkpoint_every=4)
    full = train(config(tmp_path / "d", run__out=str(tmp_path / "full"), optim__steps=12, **common))
    train(config(tmp_path / "d", run__out=str(tmp_path / "part"), optim__steps=8, **common))
    resumed = train(config(tmp_path / "d", run__out=str(tmp_path / "part"), optim__steps=12, **common), resume=True)
    np.testing.assert_allclose(resumed.theta, full.theta, rtol=1e-10, atol=1e-13)


def test_resume_refuses_a_changed_seed(tmp_path):
    from dist_sae.train.rundir import config_changes

    base = config(None).model_dump()
    changed = config(None, run__seed=7).model_dump()
    assert config_changes(base, changed) == ["run.seed: 0 -> 7"]
    assert config_changes(base, config(None, run__quiet=False, run__checkpoint_every=9).model_dump()) == []


def test_resume_refuses_other_data_or_changed_maths(tmp_path):
    make_dataset(tmp_path / "d", random_rows(40, 4, seed=1), shard_rows=40)
    make_dataset(tmp_path / "e", random_rows(40, 4, seed=2), shard_rows=40)
    cfg = config(tmp_path / "d", run__out=str(tmp_path / "run"), model__hidden=[3], optim__steps=2)
    train(cfg)
    with pytest.raises(CheckpointError, match="dataset fingerprint"):
        train(cfg.with_overrides({"data.path": str(tmp_path / "e"), "optim.steps": 4}), resume=True)
    with pytest.raises(CheckpointError, match=r"sparsity.beta: 3.0 -> 5.0.*--allow-change"):
        train(cfg.with_overrides({"sparsity.beta": 5.0, "optim.steps": 4}), resume=True)
    assert train(cfg.with_overrides({"sparsity.beta": 5.0, "optim.steps": 4}), resume=True, allow_change=True).steps == 4


def test_kill_between_checkpoint_write_and_rename_keeps_previous(tmp_path, monkeypatch):
    make_dataset(tmp_path / "d", random_rows(40, 4), shard_rows=40)
    cfg = config(tmp_path / "d", run__out=str(tmp_path / "run"), model__hidden=[3], optim__steps=2, optim__tolerance_change=0)
    train(cfg)
    good = latest_checkpoint(tmp_path / "run")

    def die(tmp):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_before_rename_hook", die)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint .*step-00000002 is kept"):
        train(cfg.with_overrides({"optim.steps": 4}), resume=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    again = latest_checkpoint(tmp_path / "run")
    assert torch.equal(again[0]["theta"], good[0]["theta"])
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_dimension_mismatch_between_model_and_data(tmp_path):
    make_dataset(tmp_path / "d", random_rows(20, 4), shard_rows=20)
    with pytest.raises(DataError, match="the model takes 9 inputs .* rows of 4 features"):
        train(config(tmp_path / "d", run__out=str(tmp_path / "r"), model__visible=9))
    assert not (tmp_path / "r").exists()


def test_evaluate_applies_the_training_datas_saved_preprocessing_to_raw_data(tmp_path):
    from dist_sae.api import evaluate
    from dist_sae.data.build import WriterOptions, build_from_npy
    from dist_sae.data.transforms import StepSpec

    x = random_rows(120, 5, seed=4) * np.array([1, 10, 100, 0.1, 3])  # features on very different scales
    np.save(tmp_path / "x.npy", x)
    build_from_npy(tmp_path / "x.npy", tmp_path / "raw", options=WriterOptions(shards=2))
    build_from_npy(tmp_path / "x.npy", tmp_path / "std", preprocessing=[StepSpec("standardize")], options=WriterOptions(shards=3))
    cfg = config(tmp_path / "std", run__out=str(tmp_path / "run"), model__hidden=[3], model__output="linear", optim__steps=3)
    train(cfg)
    on_std, _ = evaluate(tmp_path / "run", tmp_path / "std", ["workers.engine=local"])
    on_raw, raw_cfg = evaluate(tmp_path / "run", tmp_path / "raw", ["workers.engine=local"])
    assert raw_cfg.data.transform == str(tmp_path / "std")
    assert on_raw.loss == pytest.approx(on_std.loss, rel=1e-9)
    as_stored, _ = evaluate(tmp_path / "run", tmp_path / "raw", ["workers.engine=local", "data.transform="])
    assert as_stored.loss > 10 * on_std.loss  # without it, the raw scales wreck the reconstruction


@pytest.mark.parametrize("line_search", ["strong_wolfe", "none"])
def test_lbfgs_metrics_report_j_at_the_new_theta(tmp_path, line_search):
    from dist_sae.api import evaluate

    make_dataset(tmp_path / "d", random_rows(60, 5, seed=3), shard_rows=60)
    cfg = config(tmp_path / "d", run__out=str(tmp_path / "r"), model__hidden=[3], optim__steps=6,
                 optim__line_search=line_search, optim__lr=0.5 if line_search == "none" else 1.0, optim__tolerance_change=0)
    result = train(cfg)
    final, _ = evaluate(tmp_path / "r", tmp_path / "d", ["workers.engine=local"])
    assert result.final["J"] == pytest.approx(final.loss, rel=1e-12)  # the saved model's J


def test_ema_rho_hat_is_never_stale(dataset):
    path, _ = dataset
    trainer, _ = _trainer(path, sparsity__rho_hat="ema")
    assert [trainer.step()["rho_hat_staleness"] for _ in range(4)] == [0, 0, 0, 0]


def _exact_minibatch_run(path, **overrides):
    """One epoch of Adam on 256 minibatches; (trainer, exact mean activation of the final model)."""
    cfg = config(path, model__hidden=[25], optim__method="adam", optim__lr=0.005, optim__batch_size=32, **overrides)
    ds = Dataset.open(path)
    cfg = bind_dataset(cfg, ds)
    problem = local_problem(cfg, ds)
    batches = minibatches(ds, 32, 1)
    trainer = Trainer(cfg, problem, initial_theta(cfg, None), batches)
    lines = [trainer.step() for _ in range(len(batches))]
    return trainer, lines, float(problem.layer_means(trainer.theta.detach().numpy())[0].mean())


def test_default_exact_rho_hat_reaches_the_target_where_once_per_epoch_does_not(tmp_path):
    from dist_sae.data.build import build_synthetic

    build_synthetic(tmp_path / "d", 8192, dim=64, seed=0, atoms=16, active=2)
    # The old default: ρ̂ exact at the initial weights (≈0.5), held for the whole epoch.
    _, _, held = _exact_minibatch_run(tmp_path / "d", sparsity__refresh_every=256)
    trainer, lines, auto = _exact_minibatch_run(tmp_path / "d")
    assert abs(held - 0.01) > 0.5 * 0.01  # the KL gradient kept pushing: far below ρ
    assert abs(auto - 0.01) < 0.2 * 0.01
    # The policy: the shortest staleness bound its cost model affords (here ceil(8192·3 / (4000 + 32·2))
    # = 7 steps), doubled while the error measured at a refresh stays small; each refresh logs that error.
    shortest, longest = trainer._interval_bounds()
    assert (shortest, longest) == (7, 256)
    assert 2 <= trainer.refreshes <= 256 // shortest + 1 and lines[-1]["refreshes"] == trainer.refreshes
    assert shortest <= lines[-1]["refresh_interval"] <= longest
    assert lines[0]["rho_hat_staleness"] == 0 and "rho_hat_error" not in lines[0]
    assert 0 < lines[-1]["rho_hat_error"] < 0.1 and lines[-1]["rho_hat_error_max"] >= lines[-1]["rho_hat_error"]
    assert lines[-1]["refresh_s"] > 0


def test_local_threads_one_for_small_units_all_cores_for_large(tmp_path):
    make_dataset(tmp_path / "d", random_rows(2000, 8, seed=1), shard_rows=1000)  # two units of 1,000 rows
    ds = Dataset.open(tmp_path / "d")

    def threads(**overrides) -> int:
        cfg = bind_dataset(config(tmp_path / "d", compute__threads=0, **overrides), ds)
        return local_threads(cfg, pass_units(cfg, ds))

    assert threads() == 1  # 1,000 rows × 433 parameters
    assert threads(model__hidden=[4096]) == TORCH_DEFAULT_THREADS  # 1,000 × 69,640 >= 2**25
    assert threads(model__hidden=[4096], optim__method="adam", optim__batch_size=16) == 1  # a minibatch is the unit
    assert local_threads(bind_dataset(config(tmp_path / "d", compute__threads=3), ds), []) == 3  # compute.threads wins

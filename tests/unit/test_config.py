"""The config tree: defaults, overrides, validation messages that name the field, round trip."""

from __future__ import annotations

import json

import pytest

from dist_sae.config import Config, describe_keys, load_config
from dist_sae.errors import ConfigError


def test_defaults_are_the_notes_exercise():
    cfg = Config()
    assert (cfg.model.hidden, cfg.sparsity.rho, cfg.sparsity.beta, cfg.loss.weight_decay) == ([25], 0.01, 3.0, 1e-4)
    assert (cfg.optim.method, cfg.optim.steps, cfg.sparsity.passes) == ("lbfgs", 400, "auto")


def test_one_pass_is_the_default_exactly_where_it_applies():
    assert Config().sparsity.one_pass  # KL on layer 1
    assert not Config().with_overrides(["sparsity.passes=2"]).sparsity.one_pass
    deep = Config().with_overrides(["model.hidden=[8,4]", "sparsity.layers=[2]"]).sparsity
    assert deep.passes == "auto" and not deep.one_pass
    assert not Config().with_overrides(["sparsity.kind=l1"]).sparsity.one_pass


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden: [300, 30]\nsparsity:\n  layers: [1, 2]\n  rho: 0.02\n")
    cfg = load_config(path, ["sparsity.beta=7.5e-5", "optim.method=adam", "model.tied=true"])
    assert cfg.model.hidden == [300, 30] and cfg.sparsity.layers == [1, 2]
    assert cfg.sparsity.beta == 7.5e-5 and cfg.optim.method == "adam" and cfg.model.tied is True


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.hidden=[7, 3]", "sparsity.layers=[2]"])
    cfg.save(tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg and json.loads((tmp_path / "config.json").read_text())["model"]["hidden"] == [7, 3]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["sparsity.rho=1.5"], "sparsity.rho must be in (0, 1)"),
        (["sparsity.rho=0"], "sparsity.rho must be in (0, 1)"),
        (["sparsity.beta=-1"], "sparsity.beta must be >= 0"),
        (["sparsity.bogus=1"], "unknown config key 'sparsity.bogus'"),
        (["nothing.here=1"], "unknown config key 'nothing.here'"),
        (["model.activation=relu"], "use sparsity.kind=l1 or sparsity.kind=topk"),
        (["sparsity.kind=topk", "sparsity.k=30", "model.activation=linear"], "sparsity.k=30 exceeds the 25 units"),
        (["sparsity.layers=[2]"], "sparsity.layers [2] out of range"),
        (["sparsity.passes=1", "model.hidden=[4,2]", "sparsity.layers=[2]"], "sparsity.passes=1"),
        (["optim.method=newton"], "optim.method"),
        (["sparsity.rho=[0.1, 0.2]"], "sparsity.rho has 2 values but sparsity.layers has 1"),
        (["sparsity.beta"], "is not key=value"),
    ],
)
def test_invalid_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.momentun: unknown key"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_every_field_is_documented():
    rows = describe_keys()
    assert len(rows) > 40
    missing = [key for key, _, doc in rows if not doc]
    assert missing == []


def test_shipped_example_configs_are_valid():
    from dist_sae.config import example_configs

    files = example_configs()
    assert len(files) >= 5
    for path in files.values():
        load_config(path)  # raises ConfigError naming the file and field if one rots


def test_a_shipped_example_is_found_by_name_and_a_missing_file_lists_them():
    from dist_sae.config import example_configs

    assert load_config("kl.yaml").sparsity.kind == "kl"  # no kl.yaml here: the packaged one
    assert load_config("topk").sparsity.kind == "topk"
    with pytest.raises(ConfigError, match="kl.yaml") as err:
        load_config("no-such-config.yaml")
    assert "does not exist" in str(err.value) and "seed001.yaml" in str(err.value)
    assert set(example_configs()) >= {"kl.yaml", "topk.yaml", "plain.yaml", "seed001.yaml", "notes.yaml", "l1.yaml"}

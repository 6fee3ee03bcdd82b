"""One typed config tree for every run: model, loss, sparsity, optim, data, compute, workers, run.

Each field carries a docstring; those docstrings are the CLI's `--help` text (`dist-sae train
--help` lists every key with its default). The tree is validated before any work starts, loaded from YAML (or JSON) and
overridden by dotted `key=value` arguments, and saved beside every result as `config.json`.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from dist_sae.errors import ConfigError
from dist_sae.sections import (
    BOUNDED_ACTIVATIONS,
    ComputeConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    RunConfig,
    Section,
    SparsityConfig,
    WorkersConfig,
)


class Config(Section):
    """The whole configuration of a run."""

    model: ModelConfig = ModelConfig()
    """The network."""
    loss: LossConfig = LossConfig()
    """Reconstruction and weight decay."""
    sparsity: SparsityConfig = SparsityConfig()
    """The sparsity penalty and how ρ̂ is obtained."""
    noise: NoiseConfig = NoiseConfig()
    """Input corruption (denoising)."""
    optim: OptimConfig = OptimConfig()
    """The optimizer."""
    data: DataConfig = DataConfig()
    """Where the data is and how it is streamed."""
    compute: ComputeConfig = ComputeConfig()
    """Numeric precision and device."""
    workers: WorkersConfig = WorkersConfig()
    """Ray placement."""
    run: RunConfig = RunConfig()
    """Outputs and bookkeeping."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        sp, m = self.sparsity, self.model
        n_enc = len(m.hidden)
        if sp.kind != "none":
            bad = [layer for layer in sp.layers if layer > n_enc]
            if bad:
                raise ValueError(f"sparsity.layers {bad} out of range: the encoder has {n_enc} layer(s) (model.hidden={m.hidden})")
        if sp.kind == "kl" and m.activation not in BOUNDED_ACTIVATIONS:
            raise ValueError(
                f"sparsity.kind=kl needs mean activations in (0, 1), but model.activation={m.activation} is unbounded "
                "(KL is undefined when ρ̂ can exceed 1); use sparsity.kind=l1 or sparsity.kind=topk instead"
            )
        if sp.kind == "topk":
            if sp.k < 1:
                raise ValueError("sparsity.kind=topk needs sparsity.k >= 1")
            if m.activation not in ("linear", "relu"):
                # The unselected units get pre-activation 0, and f(0) is 0 only for linear and relu
                # (sigmoid(0) = 0.5 would make every "inactive" unit half on).
                raise ValueError(f"sparsity.kind=topk needs model.activation=linear or relu, got {m.activation}")
            for layer in sp.layers:
                if sp.k > m.hidden[layer - 1]:
                    raise ValueError(f"sparsity.k={sp.k} exceeds the {m.hidden[layer - 1]} units of encoder layer {layer}")
        if sp.auxk:
            if sp.kind != "topk":
                raise ValueError("sparsity.auxk needs sparsity.kind=topk")
            if n_enc != 1 or m.output != "linear":
                raise ValueError("sparsity.auxk needs one hidden layer (model.hidden=[h]) and model.output=linear")
            if sp.auxk > m.hidden[0]:
                raise ValueError(f"sparsity.auxk={sp.auxk} exceeds the {m.hidden[0]} hidden units")
        if sp.passes == 1 and not (sp.kind == "kl" and sp.layers == [1]):
            raise ValueError("sparsity.passes=1 (one-pass gradient) needs sparsity.kind=kl on layer 1 alone (sparsity.layers=[1])")
        if self.compute.device == "cuda" and any(p.kind == "cpu" for p in self.workers.pools):
            raise ValueError("compute.device=cuda cannot run a cpu pool of workers.pools; use compute.device=auto (cuda on the gpu pools only)")
        if isinstance(self.loss.weight_decay, list) and len(self.loss.weight_decay) != 2 * n_enc:
            raise ValueError(
                f"loss.weight_decay has {len(self.loss.weight_decay)} values but the model has {2 * n_enc} weight matrices"
            )
        return self

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Config:
        """A copy with dotted overrides applied, e.g. ["sparsity.beta=3", "model.hidden=[25]"]."""
        return from_dict(apply_overrides(self.model_dump(), overrides))

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically: a temporary file, fsynced, renamed over `path`."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.model_dump(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are parsed as YAML (3 -> int, [25] -> list, true -> bool)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. sparsity.beta=3)")
        try:
            result[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
    return result


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; an unknown key fails with the keys allowed there."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node, cls = tree, Config
        for i, part in enumerate(parts):
            fields = cls.model_fields
            if part not in fields:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(f"unknown config key {dotted!r}: {where} has {', '.join(fields)}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                annotation = fields[part].annotation
                if not (isinstance(annotation, type) and issubclass(annotation, Section)):
                    raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")
                node = node.setdefault(part, {})
                cls = annotation
    return tree


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] != "value_error":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{loc}: {msg}")
    return f"invalid config{source}: " + "; ".join(lines)


def from_dict(tree: dict[str, Any], source: str = "") -> Config:
    """Validate a nested dict into a Config, raising ConfigError that names each bad field."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def example_configs() -> dict[str, Path]:
    """The example configs shipped inside the package (dist_sae/configs/*.yaml), by file name."""
    folder = Path(str(resources.files("dist_sae") / "configs"))
    return {p.name: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    """`path` itself when it is a file; else a bare name (`kl.yaml` or `kl`) of a shipped example.

    Raises:
        ConfigError: neither exists; the message lists the shipped examples.
    """
    path = Path(path)
    if path.is_file():
        return path
    examples = example_configs()
    if path.parent == Path(".") and (path.name in examples or f"{path.name}.yaml" in examples):
        return examples.get(path.name) or examples[f"{path.name}.yaml"]
    raise ConfigError(f"config file {path} does not exist (shipped examples, usable by name: {', '.join(examples)})")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML/JSON config file (or the defaults) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = ""
    if path is not None:
        path = resolve_config_path(path)
        source = f" in {path}"
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    if overrides:
        tree = apply_overrides(tree, overrides)
    return from_dict(tree, source)


def config_from_args(config: str | Path | None, overrides: list[str], **set_keys: Any) -> Config:
    """Config file + `key=value` overrides + explicit keys (e.g. from CLI flags, dotted names), validated."""
    extra = [f"{k}={json.dumps(v)}" for k, v in set_keys.items() if v is not None]
    return load_config(config, list(overrides) + extra)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field: the CLI's help on config keys."""
    rows = []
    for section_name, section_field in Config.model_fields.items():
        section_cls = section_field.annotation
        for name, field in section_cls.model_fields.items():
            rows.append((f"{section_name}.{name}", json.dumps(field.default), field.description or ""))
    return rows

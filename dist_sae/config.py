"""One typed config tree for every run: model, loss, sparsity, optim, data, compute, workers, run.

Each field carries a docstring; those docstrings are the CLI's `--help` text (`dist-sae train
--help` lists every key with its default). The tree is validated before any work starts, loaded from YAML (or JSON) and
overridden by dotted `key=value` arguments, and saved beside every result as `config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dist_sae.errors import ConfigError

Activation = Literal["sigmoid", "tanh", "satlin", "relu", "linear"]
# Activations whose values lie in [0, 1] (or [-1, 1] mapped by (1 + a) / 2): KL is defined.
BOUNDED_ACTIVATIONS = ("sigmoid", "tanh", "satlin")


class Section(BaseModel):
    """Base of every config section: attribute docstrings become field help; unknown keys fail."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    visible: int | None = Field(default=None, ge=1)
    """Input dimension n. Left empty, it is taken from the dataset's `dim`."""
    hidden: list[int] = [25]
    """Encoder layer sizes from the input side; the decoder mirrors them ([25]: 64-25-64, [300, 30]: 784-300-30-300-784)."""
    activation: Activation = "sigmoid"
    """Hidden-unit activation: sigmoid, tanh, satlin (clamp to [0, 1]), relu or linear."""
    output: Literal["sigmoid", "linear"] = "sigmoid"
    """Output activation: sigmoid for data in [0, 1], linear for unbounded data such as whitened patches."""
    tied: bool = False
    """Tie each decoder weight to the transpose of its mirrored encoder weight."""
    decoder_norm: bool = False
    """Keep the output decoder's columns at unit norm, by reparametrisation W/‖W_col‖ (top-k practice)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"model.hidden must be a non-empty list of positive sizes, got {self.hidden}")
        return self


class LossConfig(Section):
    weight_decay: float | list[float] = 1e-4
    """λ of (λ/2) Σ‖W‖²: one value for all weight matrices, or one per matrix (W1, W2, ...). Biases are never decayed."""

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        values = self.weight_decay if isinstance(self.weight_decay, list) else [self.weight_decay]
        if any(v < 0 for v in values):
            raise ValueError(f"loss.weight_decay must be >= 0, got {self.weight_decay}")
        return self


class SparsityConfig(Section):
    kind: Literal["kl", "l1", "topk", "none"] = "kl"
    """Sparsity method: kl (exact dataset-wide ρ̂), l1 (λ₁·mean Σ|a|), topk (k-sparse), none (plain autoencoder)."""
    layers: list[int] = [1]
    """Encoder layers (1-based, input side first) that carry the penalty."""
    rho: float | list[float] = 0.01
    """Target mean activation ρ of the KL penalty, in (0, 1); one value, or one per entry of `layers`."""
    beta: float | list[float] = 3.0
    """Weight β of the KL penalty, >= 0; one value, or one per entry of `layers`."""
    rho_hat: Literal["exact", "ema", "batch"] = "exact"
    """How minibatch optimizers get ρ̂: exact (pass 1 over all data every `refresh_every` steps), ema (running average), batch (current minibatch only, the tutorials' way). Full-batch methods are always exact."""
    refresh_every: int = Field(default=0, ge=0)
    """With rho_hat=exact and a minibatch optimizer: recompute the exact ρ̂ every K steps; 0 means once per epoch."""
    ema_decay: float = Field(default=0.99, ge=0.0, lt=1.0)
    """Decay of the running ρ̂ average with rho_hat=ema."""
    passes: Literal[1, 2] = 2
    """2: pass 1 (ρ̂) then pass 2 (gradient). 1: one-pass exact gradient, only for KL on encoder layer 1 alone."""
    clamp_eps: float = Field(default=1e-6, gt=0.0, lt=0.5)
    """ρ̂ is clamped to [ε, 1−ε] before KL; clamped units are counted in the metrics."""
    l1: float = Field(default=1e-3, ge=0.0)
    """λ₁ of the L1 penalty λ₁·(1/m) Σ_i Σ_j |a_ij|, with kind=l1."""
    k: int = Field(default=0, ge=0)
    """Active units kept per example with kind=topk."""
    auxk: int = Field(default=0, ge=0)
    """AuxK (top-k only): the k_aux largest dead units' pre-activations reconstruct the residual x − x̂; 0 is off. Dead means fired on no row in the last pass 1."""
    auxk_coef: float = Field(default=1 / 32, ge=0.0)
    """Weight α of the AuxK loss α·(1/m) Σ ½‖(x − x̂) − ê‖²."""

    def per_layer(self, name: str) -> list[float]:
        """`rho` or `beta` expanded to one value per entry of `layers`."""
        value = getattr(self, name)
        return list(value) if isinstance(value, list) else [value] * len(self.layers)

    @model_validator(mode="after")
    def _check(self) -> SparsityConfig:
        for name in ("rho", "beta"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != len(self.layers):
                raise ValueError(
                    f"sparsity.{name} has {len(value)} values but sparsity.layers has {len(self.layers)}; "
                    "give one value, or one per layer"
                )
        for rho in self.per_layer("rho"):
            if not 0.0 < rho < 1.0:
                raise ValueError(f"sparsity.rho must be in (0, 1), got {rho}")
        for beta in self.per_layer("beta"):
            if beta < 0:
                raise ValueError(f"sparsity.beta must be >= 0, got {beta}")
        if len(set(self.layers)) != len(self.layers) or any(layer < 1 for layer in self.layers):
            raise ValueError(f"sparsity.layers must be distinct 1-based layer numbers, got {self.layers}")
        return self


class NoiseConfig(Section):
    kind: Literal["none", "gaussian", "mask"] = "none"
    """Input corruption for a denoising autoencoder, applied in training passes only: gaussian adds σ·N(0, 1), mask zeroes each input with probability p. The target stays the clean input."""
    sigma: float = Field(default=0.1, ge=0.0)
    """Standard deviation of gaussian noise."""
    p: float = Field(default=0.25, ge=0.0, lt=1.0)
    """Probability that mask noise zeroes an input."""


class OptimConfig(Section):
    method: Literal["lbfgs", "gd", "adam", "sgd"] = "lbfgs"
    """lbfgs and gd are full-batch (exact ∇J every step); adam and sgd are minibatch."""
    steps: int = Field(default=400, ge=0)
    """Optimizer steps: L-BFGS/GD iterations, or minibatch updates."""
    lr: float | None = Field(default=None, gt=0.0)
    """Learning rate. Empty: 1.0 for lbfgs, 0.5 for gd, 1e-3 for adam, 0.05 for sgd."""
    batch_size: int = Field(default=256, ge=1)
    """Rows per minibatch (adam, sgd)."""
    batch_parts: int = Field(default=0, ge=0)
    """Work units a minibatch is split into; 0: one per worker. Fix it to make minibatch results independent of the worker count."""
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Momentum for sgd and gd."""
    history_size: int = Field(default=100, ge=1)
    """L-BFGS memory (minFunc's default is 100 corrections)."""
    line_search: Literal["strong_wolfe", "none"] = "strong_wolfe"
    """L-BFGS line search."""
    tolerance_grad: float = Field(default=1e-9, ge=0.0)
    """L-BFGS stops when max |∇J| falls below this."""
    tolerance_change: float = Field(default=1e-12, ge=0.0)
    """L-BFGS stops when J or θ changes by less than this."""

    @property
    def full_batch(self) -> bool:
        return self.method in ("lbfgs", "gd")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"lbfgs": 1.0, "gd": 0.5, "adam": 1e-3, "sgd": 0.05}[self.method]


class DataConfig(Section):
    path: str | None = None
    """Dataset folder (dataset.json + *.h5 shards)."""
    block_rows: int = Field(default=16384, ge=1)
    """Rows per work unit: memory per worker is bounded by this, not by shard or dataset size."""
    prefetch: int = Field(default=2, ge=0)
    """Blocks read ahead in a background thread while the current one is computed, by the single-process engine (--local); 0 reads inline. Ray workers read one unit ahead by having two units in flight."""
    cache_mb: int = Field(default=512, ge=0)
    """Keep blocks a worker has read (converted to the compute dtype, on its device) for later passes, up to this many MB per worker; repeated L-BFGS passes over data that fits then skip HDF5. 0: always stream."""
    transform: str | None = None
    """Dataset folder whose saved preprocessing (transform.safetensors) is applied to every row read, so raw data is seen as the training data was; empty: rows are used as stored. evaluate/encode set it to the training data when new data carries no preprocessing."""


class ComputeConfig(Section):
    dtype: Literal["float32", "float64"] = "float64"
    """Compute dtype of the forward and backward passes; sums are always accumulated in float64."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda where a worker has a GPU assigned, else cpu."""
    threads: int = Field(default=0, ge=0)
    """Torch intra-op threads per worker; 0: the worker's CPU share (all cores for a single process). Set 1 on a machine busy with other processes."""


class WorkersConfig(Section):
    engine: Literal["ray", "local"] = "ray"
    """ray: parameter server and workers on Ray (a local Ray is started if no address). local: one process, no Ray."""
    address: str | None = None
    """Ray address: empty starts a local Ray bound to 127.0.0.1; 'auto' or HOST:PORT joins a running cluster."""
    num: int = Field(default=0, ge=0)
    """Number of workers; 0: one per CPU (per GPU when gpus_per_worker > 0)."""
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    """CPUs reserved by each worker; also its torch thread count unless compute.threads is set."""
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    """GPUs reserved by each worker; > 0 makes the workers compute on cuda."""
    max_restarts: int = Field(default=3, ge=0)
    """Worker failures tolerated per run before it stops with a checkpoint."""
    unit_timeout_s: float = Field(default=600.0, gt=0.0)
    """A work unit not finished after this many seconds marks its worker as hung (treated as dead)."""


class RunConfig(Section):
    out: str | None = None
    """Run directory: model, config.json, metrics.jsonl, checkpoints, report."""
    seed: int = 0
    """Seed of initialisation, data order and noise."""
    checkpoint_every: int = Field(default=50, ge=0)
    """Write a checkpoint every K steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = Field(default=3, ge=1)
    """Checkpoints kept; older ones are deleted."""
    log_every: int = Field(default=1, ge=1)
    """Write a metrics line every K steps."""
    quiet: bool = False
    """No progress bars."""
    tensorboard: bool = False
    """Also log metrics to TensorBoard (needs the tensorboard package)."""
    report: bool = True
    """Write the report (pictures, curves) at the end of training."""


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


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML/JSON config file (or the defaults) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = ""
    if path is not None:
        path = Path(path)
        source = f" in {path}"
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
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

"""The sections of the config tree, one typed class each, with a docstring per field.

dist_sae.config assembles them into Config, checks combinations across sections, and loads,
overrides and saves the tree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Activations whose values lie in [0, 1] (or [-1, 1] mapped by (1 + a) / 2): KL is defined.
Activation = Literal["sigmoid", "tanh", "satlin", "relu", "linear"]
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
    """How minibatch optimizers get ρ̂: exact (pass 1 over all data, refreshed by `refresh_every`), ema (running average), batch (current minibatch only, the tutorials' way). Full-batch methods are always exact."""
    refresh_every: int = Field(default=0, ge=0)
    """With rho_hat=exact and a minibatch optimizer: recompute the exact ρ̂ every K steps and hold it in between (a fixed schedule). 0: the automatic policy: exact ρ̂ at each refresh, moved between refreshes by the running minibatch means (refresh_decay); the staleness bound starts at the shortest that refresh_budget affords, is halved (down to that) when the error measured at a refresh exceeds refresh_tol and doubled (up to an epoch) below a quarter of it."""
    refresh_budget: float = Field(default=0.25, gt=0.0, lt=1.0)
    """Automatic refresh policy: the share of training time the exact refreshes (pass 1 over all data) may take, by a fixed cost model (see the README), so the schedule depends on the data and batch sizes only, never on timings."""
    refresh_tol: float = Field(default=0.1, gt=0.0)
    """Automatic refresh policy: the ρ̂ error accepted, mean over units of |ρ̂_used − ρ̂_exact| / ρ measured at each refresh."""
    refresh_decay: float = Field(default=0.5, ge=0.0, lt=1.0)
    """Automatic refresh policy: decay of the running minibatch means that move ρ̂ between exact refreshes (0.5: about one step of lag; the minibatch noise it lets through is in the error measured at each refresh)."""
    ema_decay: float = Field(default=0.99, ge=0.0, lt=1.0)
    """Decay of the running ρ̂ average with rho_hat=ema."""
    passes: Literal["auto", 1, 2] = "auto"
    """Passes over the data per exact evaluation. 2: pass 1 (ρ̂) then pass 2 (the gradient, ρ̂ fixed). 1: the one-pass exact gradient (the same J and ∇J to float64 rounding, one read of the data and one round trip), only for KL on encoder layer 1 alone. auto: 1 where it applies, else 2."""

    @property
    def one_pass(self) -> bool:
        """Whether exact evaluations take the one-pass gradient (passes=1, or auto where it applies)."""
        applies = self.kind == "kl" and self.layers == [1]
        return self.passes == 1 or (self.passes == "auto" and applies)
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
    taper: bool = True
    """Cut the last three units of a pass into halves, quarters and eighths (of at least 4096 rows, less up to one HDF5 chunk where cut on chunks), so that no worker's last unit holds the pass; the cut depends on the data only, so results stay bit-identical for any workers."""
    prefetch: int = Field(default=2, ge=0)
    """Blocks read ahead in a background thread while the current one is computed, by the single-process engine (--local) on one lane (compute.lanes); 0 reads inline. On several lanes each reads its own unit while the others compute. Ray workers read one unit ahead by having two units in flight."""
    cache_mb: int = Field(default=512, ge=0)
    """Keep blocks a worker has read (converted to the compute dtype, on its device) for later passes, up to this many MB per worker; repeated L-BFGS passes over data that fits then skip HDF5. 0: always stream."""
    local_cache: str | None = None
    """Node-local folder where shards of an object-store dataset (data.path=s3://...) are kept between passes and runs. Empty: on Ray workers <Ray temp dir>/dist_sae_cache (always node-local), elsewhere $DIST_SAE_CACHE or ~/.cache/dist_sae."""
    local_cache_gb: float = Field(default=0.0, ge=0.0)
    """Bound on the shard cache's size in GB (least recently used shards evicted); 0: no bound."""
    read_ahead_shards: int = Field(default=0, ge=0)
    """From object storage: shards after the one being read that download in the background (whole, verified, into data.local_cache) while it is computed; 0: each shard is fetched when first read (measured as fast on a CPU-bound node, see README)."""
    local_cache_verify: Literal["stamp", "hash"] = "stamp"
    """How a cached shard is checked against dataset.json's size and SHA-256 before use: stamp (hashed when it arrived; trusted while its size and mtime are unchanged) or hash (re-hashed once per process)."""
    transform: str | None = None
    """Dataset folder whose saved preprocessing (transform.safetensors) is applied to every row read, so raw data is seen as the training data was; empty: rows are used as stored. evaluate/encode set it to the training data when new data carries no preprocessing."""


class ComputeConfig(Section):
    dtype: Literal["float32", "float64"] = "float64"
    """Compute dtype of the forward and backward passes; sums are always accumulated in float64."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda where a worker has a GPU assigned, else cpu."""
    threads: int = Field(default=0, ge=0)
    """Torch intra-op threads per worker; 0: a Ray worker's CPU share, and for a single process all cores when a work unit is large (rows × parameters >= 2**25), else 1 (small products run faster on one thread). Set 1 on a machine busy with other processes."""
    lanes: int = Field(default=0, ge=0)
    """Work units a single process (--local, `evaluate --local`, `gradcheck`) computes at once, each on a thread of its own; 0: one per core when units are small enough to run on one torch thread each (see threads) on the CPU, else 1. The sums are the same for any count."""


class PoolConfig(Section):
    """One kind of Ray worker in workers.pools."""

    kind: Literal["cpu", "gpu"] = "cpu"
    """cpu: the workers compute on the CPU; gpu: each reserves `gpus` of `gpu_resource` and computes on cuda (with compute.device=auto)."""
    num: int = Field(default=0, ge=0)
    """Workers in this pool; 0: as many as the cluster's nodes can place, after the pools listed before it took their share."""
    cpus: float = Field(default=1.0, gt=0.0)
    """CPUs each worker reserves (also its torch threads unless compute.threads is set); CPUs a GPU pool reserves are not counted again for a later CPU pool."""
    gpus: float | None = Field(default=None, ge=0.0)
    """GPUs each worker of a gpu pool reserves (empty: 1); a cpu pool reserves none."""
    gpu_resource: str = "GPU"
    """The Ray resource a gpu pool counts its GPUs in: GPU (Ray's own, so the worker sees the GPU and computes on cuda) or a custom resource (e.g. fake_gpu on a test cluster: placed and counted as GPU, but computes on the CPU, since Ray assigns it no GPU)."""

    @property
    def gpu_share(self) -> float:
        """GPUs per worker, resolved: `gpus`, or 1 for a gpu pool and 0 for a cpu pool."""
        return self.gpus if self.gpus is not None else (1.0 if self.kind == "gpu" else 0.0)

    @model_validator(mode="after")
    def _check(self) -> PoolConfig:
        if self.kind == "cpu" and self.gpus:
            raise ValueError(f"a cpu pool reserves no GPUs (got gpus={self.gpus:g}); use kind: gpu")
        if self.kind == "gpu" and self.gpu_share <= 0:
            raise ValueError("a gpu pool needs gpus > 0 per worker")
        if not self.gpu_resource or self.gpu_resource == "CPU":
            raise ValueError(f"gpu_resource must name a Ray resource other than CPU, got {self.gpu_resource!r}")
        return self


class WorkersConfig(Section):
    engine: Literal["ray", "local"] = "ray"
    """ray: parameter server and workers on Ray (a local Ray is started if no address). local: one process, no Ray."""
    address: str | None = None
    """Ray address: empty starts a local Ray bound to 127.0.0.1; 'auto' or HOST:PORT joins a running cluster."""
    dashboard: bool = False
    """Start Ray's dashboard (on 127.0.0.1; it also serves `ray list actors`) with the private local Ray of a run without an address. Off by default: it adds about 2.5 s to the start-up of every run."""
    num: int = Field(default=0, ge=0)
    """Number of workers; 0: one per CPU (per GPU when gpus_per_worker > 0)."""
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    """CPUs reserved by each worker; also its torch thread count unless compute.threads is set."""
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    """GPUs reserved by each worker; > 0 makes the workers compute on cuda."""
    pools: list[PoolConfig] = []
    """Mixed workers, one entry per kind, instead of num/cpus_per_worker/gpus_per_worker, e.g. [{kind: gpu, num: 0, gpus: 1, cpus: 4}, {kind: cpu, num: 0, cpus: 1}] (keys: kind, num, cpus, gpus, gpu_resource; num 0: as many as fit). Every pool is checked against the cluster before any work."""
    max_restarts: int = Field(default=3, ge=0)
    """Worker failures tolerated per run before it stops with a checkpoint."""
    unit_timeout_s: float = Field(default=600.0, gt=0.0)
    """A call to a worker (one work unit, or a few small consecutive ones sent together) not finished after this many seconds marks the worker as hung (treated as dead)."""
    reduce: Literal["server", "grouped", "tree"] = "server"
    """Where a pass's float64 sums are added; all three give the same bits (the canonical sum of docs/scaling.md). server: each unit's sums go to the parameter server, which adds them (the reference, and the fastest pass measured up to 32 workers). grouped: a reducer actor on the node where most of a group's ⌈√U⌉ consecutive units ran folds them; the server adds the group sums. tree: the group sums are added in a fixed binary tree of reducer calls too; the server receives one vector per pass (for many workers: docs/scaling.md gives where it pays). Pass 1's small sums always go to the server."""

    @model_validator(mode="after")
    def _check(self) -> WorkersConfig:
        if self.pools and (self.num or self.gpus_per_worker or self.cpus_per_worker != 1.0):
            raise ValueError(
                "give workers.pools or workers.num/cpus_per_worker/gpus_per_worker, not both "
                "(a pool has its own num, cpus and gpus)"
            )
        return self


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

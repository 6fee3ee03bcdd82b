"""Using learned features: hidden codes (or reconstructions) of every row, written as a new dataset.

The workers that compute the rows write them (train/codes.py): output shard k holds input rows
[k·S, (k+1)·S), computed by one worker (a Ray actor, or this process with --local) and stored
straight into `<out>.partial/` (local or object storage) with a record of its size and SHA-256;
the driver only plans and collects those records, so its memory does not grow with the rows. The
output is the same dataset, row for row and bit for bit, for any number of workers, and equal to
--local. dataset.json comes last. A stopped or killed encode run again with resume=True keeps
every finished, verified shard and computes the rest (data/partial.py).

The input is taken as it is stored when it records preprocessing of its own: a dataset built with
preprocessing holds the transformed rows, which is what the model was trained on. New raw data that
records none gets the training data's saved transform as it is read (engine.inherited_transform,
as `evaluate` does). Reconstructions keep the transform of their input, so they can be inverted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_sae.session import open_session
from dist_sae.data.build import DEFAULT_SHARD_BYTES, parse_size
from dist_sae.data.dataset import Dataset
from dist_sae.data.partial import PartialOutput
from dist_sae.data.storage import is_url
from dist_sae.data.writer import manifest
from dist_sae.train.codes import KINDS, CodeJob, plan_shards
from dist_sae.train.inputs import bind_dataset, inherited_transform
from dist_sae.errors import DataError, Interrupted, ModelError, Terminated
from dist_sae.sae.model import load_model
from dist_sae import progress

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32", "float64")
MAX_OBJECT_COPY = 5 * 10**9  # S3's single-request CopyObject limit (5 GB): finishing on object storage copies each shard


@dataclass
class EncodeResult:
    dataset: Dataset  # the dataset written
    rows: int
    seconds: float
    computed: int = 0  # shards computed by this run
    kept: int = 0  # finished shards of an earlier run kept by a resume
    start_s: float = 0.0  # of `seconds`: starting the workers (a private Ray included), before any shard
    encode_s: float = 0.0  # of `seconds`: from the workers' start to the last shard stored


def _transform_source(dataset: Dataset, cfg) -> Path | None:
    """The folder whose saved transform maps the rows the model sees: the session's data.transform
    (inherited from the training data), else the input's own, else None."""
    if cfg.data.transform:
        return Path(cfg.data.transform)
    return Path(dataset.path) if dataset.meta.get("transform") else None


def out_shard_rows(dataset: Dataset, row_bytes: int, shard_rows: int | None, shard_bytes: int | str | None) -> int:
    """Input rows per output shard: given, or from bytes per shard; by default the input's largest
    shard, but no shard over DEFAULT_SHARD_BYTES (codes may be many times wider than the input)."""
    if shard_rows is not None and shard_bytes is not None:
        raise DataError("give only one of --shard-rows, --shard-size")
    if shard_rows is not None:
        if shard_rows < 1:
            raise DataError(f"--shard-rows must be >= 1, got {shard_rows}")
        return shard_rows
    size = parse_size(shard_bytes)
    if size is not None and size < row_bytes:
        raise DataError(f"--shard-size {shard_bytes} holds no row ({row_bytes} bytes each)")
    most = max(1, int(size or DEFAULT_SHARD_BYTES) // row_bytes)
    return most if shard_bytes is not None else min(most, max(s.rows for s in dataset.shards))


@contextmanager
def _stop_on_sigterm():
    """SIGTERM (`ray job stop`, preemption) raises Terminated in the main thread while encoding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def transform_dataset(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    kind: str = "encode",
    layer: int | None = None,
    local: bool = False,
    address: str | None = None,
    overrides: list[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    resume: bool = False,
    top_k: int | None = None,
    shard_rows: int | None = None,
    shard_bytes: int | str | None = None,
    compression: str | None = None,
    chunk_rows: int = 1024,
    on_shard: Callable[[int, int], object] | None = None,
) -> EncodeResult:
    """Write the codes (kind=encode) or reconstructions (kind=reconstruct) of every row of a dataset.

    Args:
        model: run directory or model.safetensors (with config.json beside it).
        data: input dataset folder or URL; its rows must have the model's input dimension.
        out: the dataset to create: a folder, or an object-store URL (s3://bucket/prefix).
        kind: encode or reconstruct.
        layer: encoder layer (1-based) whose codes to write; default the innermost.
        local: run in this process (workers.engine=local) instead of the configured engine.
        address: Ray address to join.
        overrides: config overrides for the session (workers.num=4, data.block_rows=8192, ...).
        dtype: stored dtype of the output (float16, float32, float64); default that of the input.
        overwrite: replace an existing `out`; also start over from an earlier run's `<out>.partial`.
        quiet: no progress bar.
        resume: keep the finished, verified shards in `<out>.partial` and compute only the others.
        top_k: encode only: store each row's K largest codes and their columns (the sparse layout).
        shard_rows, shard_bytes: input rows per output shard, or bytes per output shard ("256MB");
            default: the input's largest shard, at most 256 MB of output.
        compression: HDF5 compression of the output ("gzip", "lzf") or None.
        chunk_rows: HDF5 chunk height of the output.
        on_shard: called with (shard index, rows) in this process as each shard is stored.

    Returns:
        EncodeResult with the written dataset and the shards computed and kept.

    Raises:
        ModelError, DataError, ConfigError naming the file or value at fault; errors.Terminated
        (SIGTERM) or errors.Interrupted (Ctrl-C) saying how to resume.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype is not None and dtype not in DTYPES:
        raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_obj, cfg = load_model(model)
    if layer is not None and not 1 <= layer <= model_obj.num_encoder:
        raise ModelError(f"--layer {layer} is out of range: {model} has {model_obj.num_encoder} encoder layer(s) (model.hidden={model_obj.hidden})")
    dataset = Dataset.open(data)
    if not is_url(out) and Path(out).resolve() == Path(dataset.path).resolve() or str(out).rstrip("/") == dataset.url:
        raise DataError(f"--out {out} is the input dataset; write the output to another folder")
    training_data = cfg.data.path
    # Training noise does not belong in codes; new raw data gets the training data's preprocessing.
    # One pass over the data: caching blocks in the workers would only hold memory.
    session_overrides = ["noise.kind=none", "data.cache_mb=0", *inherited_transform(training_data, dataset), *(overrides or [])]
    if local:
        session_overrides.append("workers.engine=local")
    if address:
        session_overrides.append(f"workers.address={address}")
    cfg = bind_dataset(cfg.with_overrides(session_overrides), dataset)  # checks the model's input width

    code_layer = layer or model_obj.num_encoder
    transform_dir = _transform_source(dataset, cfg)
    info: dict = {}
    side_files: dict[str, Path] = {}
    if kind == "encode":
        dim = model_obj.hidden[code_layer - 1]
        sample_shape = [dim]
        info["preprocessing"] = []  # codes are a new space
    else:
        if top_k is not None:
            raise DataError("--top-k is for codes (encode), not reconstructions")
        # Reconstructions live where the model's inputs did: keep that transform so they can be inverted.
        dim = model_obj.visible
        sample_shape = list(dataset.sample_shape) if dim == dataset.dim else [dim]
        if transform_dir is not None:
            meta = json.loads((transform_dir / "dataset.json").read_text())
            info["transform"] = meta["transform"]
            info["preprocessing"] = list(meta.get("preprocessing", []))
            side_files[meta["transform"]["file"]] = transform_dir / meta["transform"]["file"]
        else:
            info["preprocessing"] = list(dataset.preprocessing)
    if top_k is not None:
        if not 0 < top_k < dim:
            raise DataError(f"--top-k must be between 1 and {dim - 1} (layer {code_layer} has {dim} units), got {top_k}")
        info["layout"] = {"kind": "topk", "k": top_k, "values": "topk_values", "indices": "topk_indices"}
    dtype = dtype or dataset.dtype
    row_bytes = (top_k or dim) * (np.dtype(dtype).itemsize + (4 if top_k else 0))
    rows_per_shard = out_shard_rows(dataset, row_bytes, shard_rows, shard_bytes)
    if is_url(out) and rows_per_shard * row_bytes > MAX_OBJECT_COPY:
        raise DataError(f"shards of {rows_per_shard} rows are over 5 GB, the most object storage copies in one request; "
                        "give a smaller --shard-rows or --shard-size")
    plan = plan_shards([s.rows for s in dataset.shards], rows_per_shard, cfg.data.block_rows)
    theta = model_obj.theta.detach().numpy().copy()
    info["source"] = {
        "kind": kind,
        "model": str(model),
        "model_sha256": hashlib.sha256(theta.tobytes()).hexdigest(),
        "data": dataset.location,
        "data_fingerprint": dataset.fingerprint,
        "layer": code_layer if kind == "encode" else None,
        "model_trained_on": training_data,
        "input_transform": str(cfg.data.transform) if cfg.data.transform else None,
    }
    job_spec = {**info["source"], "dim": dim, "dtype": dtype, "top_k": top_k, "rows_per_shard": rows_per_shard,
                "compression": compression, "chunk_rows": chunk_rows, "block_rows": cfg.data.block_rows,
                "compute_dtype": cfg.compute.dtype, "compute_device": cfg.compute.device}  # a resume must not mix these
    job_spec.pop("model")
    hint = _resume_hint(kind, model, data, out, layer, dtype, top_k, rows_per_shard, compression, chunk_rows, local, address,
                        overwrite, overrides)
    partial = PartialOutput(out, job_spec, resume=resume, overwrite=overwrite)
    done: dict = {}
    t0, start_s, encode_s, todo = time.perf_counter(), 0.0, 0.0, {}
    try:
        with _stop_on_sigterm():
            done.update(partial.start())
            kept = len(done)
            todo = {k: units for k, units in enumerate(plan) if k not in done}
            job = CodeJob(kind, code_layer if kind == "encode" else None, dim, dtype, partial.folder, top_k, chunk_rows, compression)
            if todo:
                start_s, encode_s = _compute(cfg, dataset, job, todo, theta, done, kind, quiet, on_shard)
            shards = [done[k] for k in range(len(plan))]
            rows = sum(s.rows for s in shards)
            if rows != dataset.rows:
                raise DataError(f"{kind} wrote {rows} rows but {dataset.location} holds {dataset.rows}")
            meta = manifest(dim, rows, dtype, sample_shape, max(1, min(chunk_rows, rows_per_shard)), shards, info)
            written = partial.finish(meta, side_files)
    except KeyboardInterrupt as exc:  # Ctrl-C, or Terminated from SIGTERM: say how to go on
        stop = type(exc) if isinstance(exc, Terminated) else Interrupted
        where = f"{len(done)} of {len(plan)} shards are finished in {partial.folder}"
        raise stop(f"{kind} stopped on {'SIGTERM' if stop is Terminated else 'Ctrl-C'}: {where}; resume with: {hint}") from None
    finally:
        partial.close()
    return EncodeResult(written, rows, time.perf_counter() - t0, len(todo), kept, start_s, encode_s)


def _compute(cfg, dataset, job, todo, theta, done, kind, quiet, on_shard) -> tuple[float, float]:
    """Run the session's workers over the shards to do; `done` gains each stored shard's ShardInfo.
    Returns the seconds starting the session, and from then to the last shard stored."""
    t0 = time.perf_counter()
    session = open_session(cfg, dataset)
    start_s = time.perf_counter() - t0
    total = sum(u.rows for units in todo.values() for u in units)
    try:
        with progress.bar(total, kind, quiet=quiet) as bar:  # moves as each shard is stored
            for k, shard in session.problem.evaluator.write_shards(job, todo, theta):
                done[k] = shard
                bar.update(shard.rows)
                if on_shard is not None:
                    on_shard(k, shard.rows)
        encode_s = time.perf_counter() - t0 - start_s
    except BaseException as exc:
        session.close(fast=isinstance(exc, Terminated))  # SIGTERM: within the grace period
        raise
    session.close()
    return start_s, encode_s


def _resume_hint(kind, model, data, out, layer, dtype, top_k, rows_per_shard, compression, chunk_rows, local, address,
                 overwrite, overrides) -> str:
    """The command that continues this encode (the same settings, --resume), quoted for a shell."""
    parts = ["dist-sae", kind, "--model", str(model), "--data", str(data), "--out", str(out)]
    parts += ["--layer", str(layer)] * (layer is not None) + ["--dtype", dtype, "--shard-rows", str(rows_per_shard)]
    parts += ["--top-k", str(top_k)] * (top_k is not None) + ["--compression", str(compression)] * (compression is not None)
    parts += ["--chunk-rows", str(chunk_rows)] * (chunk_rows != 1024)
    parts += ["--local"] * local + ["--address", str(address)] * (address is not None) + ["--overwrite"] * overwrite
    return shlex.join(parts + ["--resume", *(overrides or [])])


def encode_dataset(model, data, out, layer: int | None = None, **kwargs) -> EncodeResult:
    """Hidden codes of encoder `layer` (default innermost) of every row; see transform_dataset."""
    return transform_dataset(model, data, out, "encode", layer, **kwargs)


def reconstruct_dataset(model, data, out, **kwargs) -> EncodeResult:
    """Reconstructions x̂ of every row, in the input's space; see transform_dataset."""
    return transform_dataset(model, data, out, "reconstruct", None, **kwargs)

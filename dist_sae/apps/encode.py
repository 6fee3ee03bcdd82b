"""Using learned features: hidden codes (or reconstructions) of a dataset, written as a new dataset.

The rows stream through the session's evaluator exactly like a training pass (`map_units`: the Ray
workers, or this process with workers.engine=local) and come back in unit order, so the output
rows are the input rows' codes in the same order. The output is an ordinary dataset folder
(dataset.json + HDF5 shards), ready to train the next layer of a stack on, or for anything else.

The input is taken as it is stored when it records preprocessing of its own: a dataset built with
preprocessing holds the transformed rows, which is what the model was trained on. New raw data that
records none gets the training data's saved transform as it is read (engine.inherited_transform,
as `evaluate` does). Reconstructions keep the transform of their input, so they can be inverted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_sae.session import open_session
from dist_sae.data.dataset import Dataset
from dist_sae.data.storage import is_url
from dist_sae.data.writer import DatasetWriter
from dist_sae.train.inputs import bind_dataset, inherited_transform
from dist_sae.errors import DataError, ModelError
from dist_sae.sae.model import load_model
from dist_sae import progress

log = logging.getLogger(__name__)

KINDS = ("encode", "reconstruct")


@dataclass
class EncodeResult:
    dataset: Dataset  # the folder written
    rows: int
    seconds: float


def _transform_source(dataset: Dataset, cfg) -> Path | None:
    """The folder whose saved transform maps the rows the model sees: the session's data.transform
    (inherited from the training data), else the input's own, else None."""
    if cfg.data.transform:
        return Path(cfg.data.transform)
    return Path(dataset.path) if dataset.meta.get("transform") else None


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
) -> EncodeResult:
    """Write the codes (kind=encode) or reconstructions (kind=reconstruct) of every row of a dataset.

    Args:
        model: run directory or model.safetensors (with config.json beside it).
        data: input dataset folder; its rows must have the model's input dimension.
        out: the dataset folder to create.
        kind: encode or reconstruct.
        layer: encoder layer (1-based) whose codes to write; default the innermost.
        local: run in this process (workers.engine=local) instead of the configured engine.
        address: Ray address to join.
        overrides: config overrides for the session (workers.num=4, data.block_rows=8192, ...).
        dtype: stored dtype of the output; default that of the input.
        overwrite: replace an existing `out`.
        quiet: no progress bar.

    Returns:
        EncodeResult with the written dataset.

    Raises:
        ModelError, DataError, ConfigError naming the file or value at fault.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model_obj, cfg = load_model(model)
    if layer is not None and not 1 <= layer <= model_obj.num_encoder:
        raise ModelError(f"--layer {layer} is out of range: {model} has {model_obj.num_encoder} encoder layer(s) (model.hidden={model_obj.hidden})")
    dataset = Dataset.open(data)
    if is_url(out):
        raise DataError(f"--out {out}: encode writes a local dataset folder; upload it afterwards (object-storage output is for `dist-sae data build`)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.resolve() == Path(dataset.path).resolve():
        raise DataError(f"--out {out} is the input dataset; write the output to another folder")
    training_data = cfg.data.path
    # Training noise does not belong in codes; new raw data gets the training data's preprocessing.
    session_overrides = ["noise.kind=none", *inherited_transform(training_data, dataset), *(overrides or [])]
    if local:
        session_overrides.append("workers.engine=local")
    if address:
        session_overrides.append(f"workers.address={address}")
    cfg = bind_dataset(cfg.with_overrides(session_overrides), dataset)  # checks the model's input width

    code_layer = layer or model_obj.num_encoder
    transform_dir = _transform_source(dataset, cfg)
    info: dict = {}
    if kind == "encode":
        dim, sample_shape = model_obj.hidden[code_layer - 1], [model_obj.hidden[code_layer - 1]]
        info["preprocessing"] = []  # codes are a new space
    else:
        # Reconstructions live where the model's inputs did: keep that transform so they can be inverted.
        dim = model_obj.visible
        sample_shape = list(dataset.sample_shape) if dim == dataset.dim else [dim]
        if transform_dir is not None:
            manifest = json.loads((transform_dir / "dataset.json").read_text())
            info["transform"] = manifest["transform"]
            info["preprocessing"] = list(manifest.get("preprocessing", []))
        else:
            info["preprocessing"] = list(dataset.preprocessing)
    # Rows keep their order; shards hold as many rows as the input's largest shard (so with uneven
    # input shards, output shard boundaries need not match the input's).
    shard_rows = max(s.rows for s in dataset.shards)
    info["source"] = {
        "kind": kind,
        "model": str(model),
        "data": str(dataset.path),
        "data_fingerprint": dataset.fingerprint,
        "layer": code_layer if kind == "encode" else None,
        "model_trained_on": training_data,
        "input_transform": str(cfg.data.transform) if cfg.data.transform else None,
    }
    theta = model_obj.theta.detach().numpy().copy()
    t0 = time.perf_counter()
    session = open_session(cfg, dataset)
    try:
        units = session.problem.units
        bar = progress.bar(dataset.rows, kind, quiet=quiet)
        with bar, DatasetWriter(
            out, dim, shard_rows=shard_rows, dtype=dtype or dataset.dtype, sample_shape=sample_shape,
            chunk_rows=min(1024, shard_rows), overwrite=overwrite, info=info,
        ) as writer:
            for unit, rows in session.problem.evaluator.map_units(kind, theta, units, code_layer if kind == "encode" else None):
                rows = np.asarray(rows)
                if rows.shape != (unit.rows, dim):
                    raise DataError(f"work unit {unit.id} of {dataset.path} gave {rows.shape} outputs, expected ({unit.rows}, {dim})")
                writer.write(rows)
                bar.update(unit.rows)
            if "transform" in info:  # the file the copied manifest entry names, beside the new shards
                shutil.copy2(transform_dir / info["transform"]["file"], writer.tmp / info["transform"]["file"])
            if writer.rows != dataset.rows:  # checked before the writer moves the folder into place
                raise DataError(f"{kind} wrote {writer.rows} rows but {dataset.path} holds {dataset.rows}")
    finally:
        session.close()
    return EncodeResult(writer.dataset, writer.rows, time.perf_counter() - t0)


def encode_dataset(model, data, out, layer: int | None = None, **kwargs) -> EncodeResult:
    """Hidden codes of encoder `layer` (default innermost) of every row; see transform_dataset."""
    return transform_dataset(model, data, out, "encode", layer, **kwargs)


def reconstruct_dataset(model, data, out, **kwargs) -> EncodeResult:
    """Reconstructions x̂ of every row, in the input's space; see transform_dataset."""
    return transform_dataset(model, data, out, "reconstruct", None, **kwargs)

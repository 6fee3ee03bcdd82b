"""What a worker does to rows before the model sees them: the device, the saved preprocessing, the noise.

Also binds a config to its dataset (model.visible from the data's dimension after preprocessing).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import logging
import torch

from dist_sae.config import Config
from dist_sae.data.dataset import Dataset
from dist_sae.data.storage import is_url
from dist_sae.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def resolve_device(requested: str, gpus_assigned: float = 0.0) -> torch.device:
    """The torch device for a worker: cuda when asked (or auto with a GPU assigned), else cpu.

    Raises:
        ConfigError: cuda is requested but no GPU is visible to this process.
    """
    wants_cuda = requested == "cuda" or (requested == "auto" and gpus_assigned > 0)
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "a GPU was requested (compute.device=cuda or workers.gpus_per_worker > 0) but torch sees no CUDA device "
            "here; set workers.gpus_per_worker=0 and compute.device=cpu, or run on GPU nodes"
        )
    return torch.device("cuda")



def input_transform(cfg: Config):
    """The preprocessing applied to rows as they are read (data.transform), or None."""
    if not cfg.data.transform:
        return None
    from dist_sae.data.transforms import load_transform

    transform = load_transform(cfg.data.transform)
    if transform is None:
        raise DataError(f"data.transform={cfg.data.transform} has no saved preprocessing (no transform in its dataset.json)")
    return transform



def bind_dataset(cfg: Config, dataset: Dataset) -> Config:
    """The config with model.visible taken from the data (after data.transform), checked, and data.path set."""
    transform = input_transform(cfg)
    dim = dataset.dim if transform is None else transform.out_dim(dataset.dim)
    visible = cfg.model.visible
    if visible is not None and visible != dim:
        via = "" if transform is None else f" after the preprocessing of {cfg.data.transform}"
        raise DataError(f"the model takes {visible} inputs (model.visible) but {dataset.location} has rows of {dim} features{via}")
    return cfg.with_overrides({"model.visible": dim, "data.path": dataset.location})



def inherited_transform(trained_on: str | None, dataset: Dataset) -> list[str]:
    """Overrides that make new raw data be preprocessed like the model's training data.

    When `dataset` records no preprocessing of its own but the training data folder saved a
    transform, its rows get that transform as they are read (data.transform).
    """
    remote = is_url(trained_on)
    if not trained_on or dataset.meta.get("transform") or not (remote or Path(trained_on, "dataset.json").is_file()):
        return []
    if trained_on == dataset.location or (not remote and Path(trained_on).resolve() == Path(dataset.path).resolve()):
        return []
    from dist_sae.data.transforms import load_transform

    if load_transform(trained_on) is None:
        return []
    log.info("applying the preprocessing saved with the training data %s to %s", trained_on, dataset.path)
    return [f"data.transform={trained_on}"]



NOISE_CHUNK_ROWS = 128  # noise is drawn per fixed chunk of a shard's rows, whatever the work units



def corruption_seed(seed: int, shard: int, chunk: int) -> int:
    """Seed of the input noise of rows [chunk·128, (chunk+1)·128) of a shard: a function of the
    rows alone, so every cut of the data into work units, and every worker, sees the same noise."""
    return (seed * 1_000_003 + shard) * 1_000_003 + chunk



def row_noise(kind: str, seed: int, spans: Iterable[tuple[int, int, int]], dim: int) -> torch.Tensor:
    """Standard-normal (gaussian) or uniform (mask) draws for the rows of `spans` ((shard, start,
    stop) each, a work unit's spans), one after another: (rows, dim) float64."""
    draw = torch.randn if kind == "gaussian" else torch.rand
    parts = []
    for shard, start, stop in spans:
        for chunk in range(start // NOISE_CHUNK_ROWS, (stop - 1) // NOISE_CHUNK_ROWS + 1):
            gen = torch.Generator().manual_seed(corruption_seed(seed, shard, chunk))
            block = draw((NOISE_CHUNK_ROWS, dim), generator=gen, dtype=torch.float64)
            lo = max(start - chunk * NOISE_CHUNK_ROWS, 0)
            hi = min(stop - chunk * NOISE_CHUNK_ROWS, NOISE_CHUNK_ROWS)
            parts.append(block[lo:hi])
    return torch.cat(parts)

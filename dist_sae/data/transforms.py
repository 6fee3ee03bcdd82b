"""Preprocessing: the notes' normalisation, standardisation, PCA/ZCA whitening, fitted out of core.

A preprocessing pipeline is a list of `StepSpec`s (what to do). Fitting a step needs statistics of
the data as the earlier steps leave it; they are float64 partial sums computed per work unit by the
pure function `unit_sums` and added in unit order by `reduce_sums`, so the result does not depend
on how the passes were split or who ran them (dist_sae/cluster/stats.py runs the same functions as
Ray tasks). A fitted pipeline is a `Transform`, saved in the dataset folder as `transform.safetensors`
plus a manifest entry, and applied by `encode`/`evaluate` to new data.

Invertibility: `Transform.inverse` maps back through the dataset-wide part only. Standardise, ZCA and
full-rank PCA invert exactly (PCA with fewer components projects); the notes' normalisation removes
each patch's own mean and clips at ±3σ, which cannot be undone, so its inverse only undoes the
dataset-wide affine map, giving mean-free patches in the units of the data before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_sae.data.dataset import Dataset
from dist_sae.data.storage import is_url
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

TRANSFORM_FILE = "transform.safetensors"
KINDS = ("notes", "standardize", "pca", "zca")
NOTES_LOW, NOTES_HIGH = 0.1, 0.9  # the notes map [-3σ, 3σ] onto [0.1, 0.9] for sigmoid outputs


@dataclass(frozen=True)
class StepSpec:
    """One preprocessing step to fit.

    kind: "notes" (remove each row's mean, clip at ±clip_sigmas·std of all values, map to [0.1, 0.9]),
        "standardize" (per feature: subtract mean, divide by std), "pca" or "zca" (whitening).
    epsilon: PCA/ZCA regulariser added to every eigenvalue (the notes' ε; ~0.1 for 8×8 patches in
        [0, 1] units, 0.01 … 1e-5 for data with small variance).
    components: PCA only: keep this many leading components (None: all).
    clip_sigmas: notes only: clip at this many standard deviations.
    """

    kind: str
    epsilon: float = 0.0
    components: int | None = None
    clip_sigmas: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown preprocessing step {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.epsilon < 0:
            raise DataError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.components is not None and (self.kind != "pca" or self.components < 1):
            raise DataError("components applies to pca only and must be >= 1")
        if self.clip_sigmas <= 0:
            raise DataError(f"clip_sigmas must be > 0, got {self.clip_sigmas}")


# ---- out-of-core statistics: pure per-unit partial sums, reduced in unit order ---------------------

# Which sums a step needs, pass by pass. "mean" gives the per-feature mean used to centre later passes.
PASSES = {"notes": ["notes"], "standardize": ["mean", "var"], "pca": ["mean", "cov"], "zca": ["mean", "cov"]}


def unit_sums(block: np.ndarray, kind: str, center: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Float64 partial sums of one block (B, n) for one statistics pass.

    kind: "mean" (count, Σx), "var" (count, Σ(x−c)² per feature), "cov" (count, Σ(x−c)(x−c)ᵀ),
        "notes" (count of values, Σy, Σy² over y = x − row mean).
    center: the per-feature mean (n,) for "var" and "cov".
    """
    x = np.asarray(block, dtype=np.float64)
    rows = np.array(x.shape[0], dtype=np.int64)
    if kind == "mean":
        return {"count": rows, "sum": x.sum(axis=0)}
    if kind == "var":
        d = x - center
        return {"count": rows, "sumsq": np.einsum("ij,ij->j", d, d)}
    if kind == "cov":
        d = x - center
        return {"count": rows, "outer": d.T @ d}  # (n, n)
    if kind == "notes":
        y = x - x.mean(axis=1, keepdims=True)
        return {"count": np.array(y.size, dtype=np.int64), "sum": np.array(y.sum()), "sumsq": np.array(np.einsum("ij,ij->", y, y))}
    raise ValueError(f"unknown statistics pass {kind!r}")


def reduce_sums(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Add partial sums left to right; callers pass them in unit order, so the float64 result is fixed."""
    total: dict[str, np.ndarray] | None = None
    for part in parts:
        if total is None:
            total = {k: np.array(v, copy=True) for k, v in part.items()}
        else:
            for k, v in part.items():
                total[k] = total[k] + v
    if total is None:
        raise DataError("no rows to compute statistics from")
    return total


# A "sums function" runs one statistics pass over the whole data, after applying `pre` (the steps
# fitted so far) to every block: sums_fn(kind, center, pre) -> reduced sums.
SumsFn = Callable[[str, "np.ndarray | None", "Transform"], dict]


def local_sums_fn(blocks: Callable[[], Iterable[np.ndarray]], progress: Callable[[str], Any] | None = None) -> SumsFn:
    """A SumsFn over a re-iterable stream of blocks, in this process (blocks are the units, in order)."""

    def run(kind: str, center: np.ndarray | None, pre: Transform) -> dict:
        stream = blocks()
        if progress is not None:
            stream = progress(stream, kind)
        return reduce_sums(unit_sums(pre.apply(b, dtype=np.float64), kind, center) for b in stream)

    return run


# ---- fitted steps and the saved transform -------------------------------------------------------


@dataclass
class Step:
    """A fitted step: its spec, float64 tensors, and the numbers a manifest shows."""

    spec: StepSpec
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def out_dim(self, dim: int) -> int:
        if self.spec.kind == "pca" and self.spec.components is not None:
            return min(self.spec.components, dim)
        return dim

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (B, n) float64 -> (B, n') float64."""
        kind, t = self.spec.kind, self.tensors
        if kind == "notes":
            pstd = float(np.asarray(t["pstd"]).reshape(-1)[0])
            y = x - x.mean(axis=1, keepdims=True)
            y = np.clip(y, -pstd, pstd) / pstd
            return (y + 1.0) * ((NOTES_HIGH - NOTES_LOW) / 2) + NOTES_LOW
        if kind == "standardize":
            return (x - t["mean"]) / t["std"]
        if kind == "pca":
            return ((x - t["mean"]) @ t["eigvecs"]) / np.sqrt(t["eigvals"] + self.spec.epsilon)
        if kind == "zca":
            return (x - t["mean"]) @ t["whiten"].T
        raise AssertionError(kind)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """y (B, n') float64 -> (B, n); the notes step undoes only its dataset-wide affine map."""
        kind, t = self.spec.kind, self.tensors
        if kind == "notes":
            return ((y - NOTES_LOW) / ((NOTES_HIGH - NOTES_LOW) / 2) - 1.0) * float(np.asarray(t["pstd"]).reshape(-1)[0])
        if kind == "standardize":
            return y * t["std"] + t["mean"]
        if kind == "pca":
            return (y * np.sqrt(t["eigvals"] + self.spec.epsilon)) @ t["eigvecs"].T + t["mean"]
        if kind == "zca":
            return y @ t["unwhiten"].T + t["mean"]
        raise AssertionError(kind)


def _eigh_sorted(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues descending and eigenvectors as columns, each with its largest-|.| entry positive.

    The sign convention makes PCA output independent of LAPACK's arbitrary signs.
    """
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
    flip = np.sign(eigvecs[np.argmax(np.abs(eigvecs), axis=0), np.arange(eigvecs.shape[1])])
    return eigvals, eigvecs * np.where(flip == 0, 1.0, flip)


def _warn_if_underdetermined(spec: StepSpec, rows: int, dim: int) -> None:
    """Whitening fitted on fewer rows than it whitens: most directions are set by ε alone."""
    rank = max(rows - 1, 0)  # mean-free rows span at most rows - 1 directions
    kept = (spec.components or dim) if spec.kind == "pca" else dim
    if kept <= rank:
        return
    log.warning(
        "%s whitening fitted on %d rows of %d dimensions: the covariance has rank <= %d, so %d of the %d directions it "
        "whitens have eigenvalue 0 and are scaled by 1/sqrt(epsilon) = %.3g from noise alone. Use more rows (at least %d), "
        "PCA with K <= %d components (--pca %d), or a larger --epsilon",
        spec.kind, rows, dim, rank, kept - rank, kept, 1 / np.sqrt(spec.epsilon) if spec.epsilon > 0 else float("inf"),
        dim + 1, rank, rank,
    )


def fit_step(spec: StepSpec, sums_fn: SumsFn, pre: Transform) -> Step:
    """Fit one step from passes over the data as `pre` leaves it."""
    if spec.kind == "notes":
        s = sums_fn("notes", None, pre)
        count = int(s["count"])
        var = (float(s["sumsq"]) - float(s["sum"]) ** 2 / count) / max(count - 1, 1)  # MATLAB std: ddof=1
        pstd = spec.clip_sigmas * np.sqrt(var)
        if not pstd > 0:
            raise DataError("the notes' normalisation needs data that varies within rows (the std of mean-free rows is 0)")
        return Step(spec, {"pstd": np.array([pstd])}, {"pstd": pstd, "std": float(np.sqrt(var))})
    s = sums_fn("mean", None, pre)
    count = int(s["count"])
    mean = s["sum"] / count
    if spec.kind == "standardize":
        v = sums_fn("var", mean, pre)
        std = np.sqrt(v["sumsq"] / count)
        constant = int((std == 0).sum())
        std = np.where(std == 0, 1.0, std)  # constant features are centred, not scaled
        return Step(spec, {"mean": mean, "std": std}, {"constant_features": constant})
    c = sums_fn("cov", mean, pre)
    cov = c["outer"] / count  # population covariance, as the notes' sigma = x·xᵀ/m
    _warn_if_underdetermined(spec, count, cov.shape[0])
    eigvals, eigvecs = _eigh_sorted(cov)
    # Whitening divides by √λ of the components it keeps (all for ZCA, the leading K for PCA), so
    # only those must be non-zero; mean-free rows make the discarded last eigenvalue 0.
    kept = eigvals[: spec.components or len(eigvals)] if spec.kind == "pca" else eigvals
    if spec.epsilon == 0 and kept.min() <= 1e-12 * max(eigvals.max(), 1e-300):
        raise DataError(f"{spec.kind} whitening: the covariance is singular (smallest kept eigenvalue {kept.min():.3g}); give epsilon > 0")
    info = {"epsilon": spec.epsilon, "eigval_max": float(eigvals[0]), "eigval_min": float(eigvals[-1])}
    if spec.kind == "pca":
        k = spec.components or len(eigvals)
        retained = float(eigvals[:k].sum() / eigvals.sum()) if eigvals.sum() > 0 else 1.0
        info.update(components=k, variance_retained=retained)
        return Step(spec, {"mean": mean, "eigvals": eigvals[:k].copy(), "eigvecs": eigvecs[:, :k].copy()}, info)
    scale = np.sqrt(eigvals + spec.epsilon)
    whiten = (eigvecs / scale) @ eigvecs.T  # U diag(1/√(λ+ε)) Uᵀ, symmetric
    unwhiten = (eigvecs * scale) @ eigvecs.T
    return Step(spec, {"mean": mean, "eigvals": eigvals, "eigvecs": eigvecs, "whiten": whiten, "unwhiten": unwhiten}, info)


class Transform:
    """A fitted pipeline of steps; `apply` to new rows, `inverse` back through the dataset-wide part.

    Both take (..., n) arrays (a single row, a batch (B, n)), compute in float64 and return the input's
    float dtype (float64 for integer input) unless `dtype` is given.
    """

    def __init__(self, steps: list[Step] | None = None, in_dim: int | None = None) -> None:
        self.steps = list(steps or [])
        self.in_dim = in_dim

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __repr__(self) -> str:
        return f"Transform({[s.spec.kind for s in self.steps]}, in_dim={self.in_dim})"

    def out_dim(self, dim: int | None = None) -> int:
        dim = dim if dim is not None else self.in_dim
        for step in self.steps:
            dim = step.out_dim(dim)
        return dim

    def then(self, step: Step) -> Transform:
        return Transform(self.steps + [step], self.in_dim)

    @staticmethod
    def _run(x: np.ndarray, fns: list[Callable], dtype) -> np.ndarray:
        x = np.asarray(x)
        out_dtype = np.dtype(dtype) if dtype is not None else (x.dtype if x.dtype.kind == "f" else np.dtype(np.float64))
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]).astype(np.float64, copy=False)
        for fn in fns:
            y = fn(y)
        return y.reshape(*lead, y.shape[-1]).astype(out_dtype, copy=False)

    def apply(self, x: np.ndarray, dtype=None) -> np.ndarray:
        """(..., n) -> (..., n_out): every step in order, including the per-row notes normalisation."""
        if not self.steps:
            return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
        return self._run(x, [s.apply for s in self.steps], dtype)

    def inverse(self, y: np.ndarray, dtype=None) -> np.ndarray:
        """(..., n_out) -> (..., n): undo the steps in reverse. Per-row mean removal and clipping are not undone."""
        if not self.steps:
            return np.asarray(y) if dtype is None else np.asarray(y, dtype=dtype)
        return self._run(y, [s.inverse for s in reversed(self.steps)], dtype)

    # ---- files: safetensors + a manifest entry, never pickle ----

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write `transform.safetensors` into folder; return the manifest entry describing it."""
        from safetensors.numpy import save_file

        tensors = {f"step{i}.{name}": np.ascontiguousarray(arr, dtype=np.float64) for i, s in enumerate(self.steps) for name, arr in s.tensors.items()}
        path = Path(folder) / TRANSFORM_FILE
        save_file(tensors, str(path), metadata={"format": "dist_sae.transform/1"})
        return {
            "file": TRANSFORM_FILE,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "in_dim": self.in_dim,
            "steps": [{"kind": s.spec.kind, "epsilon": s.spec.epsilon, "components": s.spec.components, "clip_sigmas": s.spec.clip_sigmas, **_jsonable(s.info)} for s in self.steps],
        }

    @classmethod
    def load(cls, folder: str | Path, entry: dict[str, Any]) -> Transform:
        from safetensors.numpy import load_file

        path = Path(folder) / entry.get("file", TRANSFORM_FILE)
        if not path.is_file():
            raise DataError(f"{path} is missing but {Path(folder) / 'dataset.json'} lists a saved transform; rebuild the dataset")
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise DataError(f"{path} cannot be read as safetensors ({type(exc).__name__}: {exc}); rebuild the dataset") from None
        steps = []
        for i, desc in enumerate(entry["steps"]):
            spec = StepSpec(desc["kind"], float(desc.get("epsilon", 0.0)), desc.get("components"), float(desc.get("clip_sigmas", 3.0)))
            prefix = f"step{i}."
            mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            info = {k: v for k, v in desc.items() if k not in ("kind", "epsilon", "components", "clip_sigmas")}
            steps.append(Step(spec, mine, info))
        return cls(steps, entry.get("in_dim"))


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=float))


def load_transform(dataset_dir: str | Path) -> Transform | None:
    """The dataset-wide transform saved in a dataset folder, or None if it has none.

    `encode`/`evaluate` call `.apply(x)` on new raw rows (..., n) to get what the model was trained on,
    and `.inverse(y)` to show reconstructions in the original units (see the module docstring for
    what the notes' normalisation cannot undo).
    """
    if is_url(dataset_dir):  # an object-store dataset: its mirror holds dataset.json and the transform file
        dataset_dir = Dataset.open(dataset_dir, verify_shards=False).path
    folder = Path(dataset_dir)
    manifest = folder / "dataset.json"
    if not manifest.is_file():
        raise DataError(f"{folder} has no dataset.json: it is not a dataset folder")
    try:
        entry = json.loads(manifest.read_text()).get("transform")
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest} is not valid JSON: {exc}") from None
    if not entry or not entry.get("steps"):
        return None
    return Transform.load(folder, entry)


def fit_transform(specs: list[StepSpec], sums_fn: SumsFn, base: Transform | None = None, in_dim: int | None = None) -> Transform:
    """Fit `specs` in order, each from passes over the data as the steps before it leave it.

    base: steps already applied to the data (they are kept first in the result, so the saved
    transform maps the original raw rows); the new steps see data with base already applied, so
    base is not re-applied during fitting.
    """
    order = [s.kind for s in specs]
    if "pca" in order and "zca" in order:
        raise DataError("choose PCA or ZCA whitening, not both")
    fitted = Transform([], in_dim)
    for spec in specs:
        fitted = fitted.then(fit_step(spec, sums_fn, fitted))
    if base is None:
        return fitted
    return Transform(base.steps + fitted.steps, base.in_dim)


def describe_steps(transform: Transform) -> list[dict[str, Any]]:
    """Manifest `preprocessing` entries for the fitted steps."""
    out = []
    for s in transform.steps:
        d: dict[str, Any] = {"kind": s.spec.kind, "saved": True}
        if s.spec.kind in ("pca", "zca"):
            d["epsilon"] = s.spec.epsilon
        if s.spec.kind == "pca":
            d["components"] = s.info.get("components")
        if s.spec.kind == "notes":
            d.update(clip_sigmas=s.spec.clip_sigmas, range=[NOTES_LOW, NOTES_HIGH], pstd=s.info.get("pstd"))
        out.append(d)
    return out

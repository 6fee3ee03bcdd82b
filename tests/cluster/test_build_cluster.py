"""Parallel builds on local Ray (dist_sae.cluster.build): the same dataset as the single-process build.

Each case builds one small input in this process and on Ray with 1, 2 and 3 workers; the
fingerprint (SHA-256 over the shards' row hashes, in order) and the rows must be equal. A worker
killed mid-shard is retried by Ray and the result is unchanged; bad inputs are one-line errors
(exit 2) with nothing written.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dist_sae.commands.main import main
from dist_sae.data import build as prep
from dist_sae.data.images import ImageFolderSource
from dist_sae.data.patches import FolderPatchSource
from dist_sae.data.sources import NpySource, SyntheticSource
from dist_sae.data.transforms import StepSpec
from util import read_all

WORKERS = (1, 2, 3)


def image_folder(root: Path, count: int = 13, size=(6, 5), seed: int = 0) -> Path:
    """`count` gray PNGs in two sub-folders, plus one undecodable file in the middle of the order."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = root / ("a" if i < count // 2 else "b") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)
    (root / "a" / "005x.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def same_build(make_source, tmp_path: Path, options: prep.WriterOptions, specs=None, stats=None, workers=WORKERS):
    """Build here, then on Ray with each worker count; every fingerprint must be the first's."""
    from dist_sae.cluster.build import ray_runner

    here = prep.build(make_source(), tmp_path / "here", specs, options)
    for n in workers:
        there = prep.build(make_source(), tmp_path / f"ray{n}", specs, options, runner=ray_runner(workers=n), stats=stats)
        assert there.fingerprint == here.fingerprint, f"{n} workers"
        assert [s.file for s in there.shards] == [s.file for s in here.shards]
        np.testing.assert_array_equal(read_all(there.path), read_all(here.path))
        assert not list(there.path.glob(".range-*")) and not (tmp_path / f"ray{n}.partial").exists()
    return here


def test_images_npy_synthetic_patches_equal_the_single_process_build(ray_session, tmp_path):
    folder = image_folder(tmp_path / "imgs")
    here = same_build(lambda: ImageFolderSource(folder), tmp_path / "images", prep.WriterOptions(shard_rows=3, block_rows=2))
    assert here.rows == 13 and len(here.shards) == 5  # 14 files in shards of 3 files; one file skipped
    assert "a/005x.png" in json.loads((here.path / "dataset.json").read_text())["skipped"]["files"]

    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((1000, 7)).astype(np.float32))
    same_build(lambda: NpySource(tmp_path / "x.npy"), tmp_path / "npy", prep.WriterOptions(shard_rows=128, block_rows=50))
    # 20,000 rows cross the synthetic generator's 8192-row blocks inside and between shards
    same_build(lambda: SyntheticSource(20000, 6, seed=3), tmp_path / "syn", prep.WriterOptions(shard_rows=3000))
    same_build(lambda: FolderPatchSource(folder, patch=3, count=100, seed=2), tmp_path / "patches", prep.WriterOptions(shard_rows=20))


def test_preprocessing_statistics_on_ray_give_the_same_transform(ray_session, tmp_path):
    """Staged build: raw shards on Ray, statistics passes on Ray, transformed shard by shard on Ray."""
    from dist_sae.cluster.stats import ray_sums_fn

    folder = image_folder(tmp_path / "imgs", count=40)
    specs = [StepSpec("standardize"), StepSpec("zca", 0.1)]
    same_build(lambda: ImageFolderSource(folder), tmp_path, prep.WriterOptions(shard_rows=7, block_rows=4), specs, stats=ray_sums_fn, workers=(2,))
    assert not list(tmp_path.glob("*.staging*"))


class DiesOnce(SyntheticSource):
    """A synthetic source whose worker process exits in the middle of shard `victim`, once."""

    def __init__(self, marker: Path, victim: int, *args) -> None:
        super().__init__(*args)
        self.marker, self.victim = marker, victim

    def range_blocks(self, r, block_rows):
        for i, block in enumerate(super().range_blocks(r, block_rows)):
            if r.shard == self.victim and i == 1 and not self.marker.exists():
                self.marker.write_text(str(os.getpid()))
                os._exit(1)  # the worker dies with half a shard in its scratch folder
            yield block


def test_a_worker_killed_mid_shard_is_retried_and_the_result_is_unchanged(ray_session, tmp_path):
    import ray.cloudpickle

    from dist_sae.cluster.build import ray_runner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get the class by value
    options = prep.WriterOptions(shard_rows=2000, block_rows=500)
    here = prep.build(SyntheticSource(9000, 5, 4), tmp_path / "here", None, options)
    marker = tmp_path / "died"
    there = prep.build(DiesOnce(marker, 2, 9000, 5, 4), tmp_path / "there", None, options, runner=ray_runner(workers=2))
    assert marker.exists(), "the fault never fired"
    assert there.fingerprint == here.fingerprint
    assert sorted(p.name for p in there.path.iterdir()) == sorted(p.name for p in here.path.iterdir())


def run_cli(args, capsys):
    rc = main(["data", "build", *map(str, args), "--ray", "--workers", "2", "-q"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_errors_exit_2_with_nothing_written(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("no images here")
    mixed = image_folder(tmp_path / "mixed", count=8)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(mixed / "b" / "006y.png")  # after 006.png: the first odd file
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(mixed / "b" / "007y.png")
    cases = [
        (["--from", "images", tmp_path / "empty"], r"image folder .*empty is empty"),
        (["--from", "images", tmp_path / "text"], r"holds no image files"),
        (["--from", "patches", tmp_path / "empty"], r"is empty"),
        (["--from", "images", mixed, "--shard-rows", "2"], r"006y\.png is 9x9 but earlier images are 5x6.*--size"),
    ]
    for args, message in cases:
        rc, stdout, stderr = run_cli([*args, "--out", out], capsys)
        assert rc == 2 and len(stderr.strip().splitlines()) == 1, (args, stderr)
        assert re.search(message, stderr), (message, stderr)
        assert not out.exists() and not list(tmp_path.glob("out.*")), args
    out.mkdir()
    rc, _, stderr = run_cli(["--from", "images", mixed, "--size", "4", "4", "--out", out], capsys)
    assert rc == 2 and "already exists" in stderr and not any(out.iterdir())


def test_cli_lists_bad_images_with_the_count_last(ray_session, tmp_path, capsys):
    folder = image_folder(tmp_path / "imgs", count=10)
    rc, stdout, _ = run_cli(["--from", "images", folder, "--shard-rows", "3", "--out", tmp_path / "ds"], capsys)
    assert rc == 0 and stdout.strip().splitlines()[-1].startswith("skipped 1 file(s)") and "a/005x.png" in stdout
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["skipped"]["count"] == 1 and list(meta["skipped"]["files"]) == ["a/005x.png"]
    assert meta["rows"] == 10 and meta["source"]["skipped"] == 1

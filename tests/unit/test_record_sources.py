"""`--from webdataset` and `--from parquet`, on inputs made by the formats' own producers.

Tars come from webdataset's TarWriter, Parquet from Hugging Face `datasets` (to_parquet) and from
pyarrow directly; the reference rows are Pillow's own decode of the same bytes (tests/producers.py).
Local disk and the suite's local S3 server; bad records skipped and listed; bad inputs exit 2 with
nothing written. The Ray builds (1, 2, 3 workers) are in tests/cluster/test_record_sources_ray.py.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from dist_sae.commands.main import main
from dist_sae.data import build as prep
from dist_sae.data.images import decode_image
from dist_sae.data.parquet import ParquetSource
from dist_sae.data.patches import FolderPatchSource, patch_source
from dist_sae.data.wds import WebDatasetSource
from producers import encoded_images, expected_rows, write_arrow_parquet, write_hf_parquet, write_tars
from util import read_all

COUNT, PER_TAR, SIZE = 40, 12, (24, 20)  # 4 tars: 12, 12, 12, 4 records


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    images = encoded_images(COUNT, seed=1, size=SIZE)
    write_tars(root / "wds", images, PER_TAR)
    write_hf_parquet(root / "hf" / "part-0.parquet", images[:25])
    write_hf_parquet(root / "hf" / "part-1.parquet", images[25:])
    write_arrow_parquet(root / "arrow.parquet", images, row_group_size=7)
    return root, images


def cli(args, capsys):
    rc = main(["data", "build", *map(str, args), "-q"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_tars_and_parquet_give_pillows_rows_in_record_order(inputs, tmp_path):
    root, images = inputs
    ref = expected_rows(images)
    tars = prep.build(WebDatasetSource(str(root / "wds")), tmp_path / "wds", None, prep.WriterOptions(block_rows=5))
    assert len(tars.shards) == 4 and [s.rows for s in tars.shards] == [12, 12, 12, 4]  # one shard per tar
    np.testing.assert_array_equal(read_all(tars.path), ref)
    for pattern in (root / "wds" / "train-{000000..000003}.tar", root / "wds" / "train-*.tar"):
        again = prep.build(WebDatasetSource(str(pattern)), tmp_path / "again", None, prep.WriterOptions(overwrite=True))
        assert again.fingerprint == tars.fingerprint, pattern
    hf = prep.build(ParquetSource(str(root / "hf")), tmp_path / "hf", None, prep.WriterOptions())
    np.testing.assert_array_equal(read_all(hf.path), ref)
    arrow = ParquetSource(str(root / "arrow.parquet"), column="jpeg")
    assert arrow.items == 6 and arrow.planned_rows == COUNT  # row groups of 7
    ds = prep.build(arrow, tmp_path / "arrow", None, prep.WriterOptions(shard_rows=14))
    assert [s.rows for s in ds.shards] == [14, 14, 12]  # two whole row groups per shard
    np.testing.assert_array_equal(read_all(ds.path), ref)  # other shard boundaries, so another fingerprint


def test_size_mode_and_raw_pixel_columns(inputs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, images = inputs
    ds = prep.build(WebDatasetSource(str(root / "wds"), size=(8, 8)), tmp_path / "small", None)
    np.testing.assert_array_equal(read_all(ds.path), expected_rows(images, size=(8, 8)))
    rgb = WebDatasetSource(str(root / "wds" / "train-000001.tar"), mode="rgb")
    assert rgb.sample_shape == [24, 20, 3] and rgb.items == 1
    pixels = np.random.default_rng(5).integers(0, 256, (30, 12), dtype=np.uint8)
    pq.write_table(pa.table({"x": pa.array(list(pixels), type=pa.list_(pa.uint8(), 12))}), tmp_path / "raw.parquet", row_group_size=8)
    raw = prep.build(ParquetSource(str(tmp_path / "raw.parquet"), column="x"), tmp_path / "raw", None)
    np.testing.assert_allclose(read_all(raw.path), pixels / 255.0, rtol=1e-6)
    unscaled = prep.build(ParquetSource(str(tmp_path / "raw.parquet"), column="x", scale=False), tmp_path / "raw255", None)
    np.testing.assert_array_equal(read_all(unscaled.path), pixels.astype(np.float32))


def test_image_key_chooses_the_member(inputs, tmp_path):
    """A record with a .jpg and a .png: the first image member by default, --image-key png the other."""
    _, images = inputs
    pngs = encoded_images(6, seed=10, size=SIZE, fmt="PNG")
    write_tars(tmp_path / "two", images[:6], 3, extra={i: {"jpg": images[i], "png": pngs[i]} for i in range(6)})
    default = prep.build(WebDatasetSource(str(tmp_path / "two")), tmp_path / "jpg", None)
    np.testing.assert_array_equal(read_all(default.path), expected_rows(images[:6]))
    rc = main(["data", "build", "--from", "webdataset", str(tmp_path / "two"), "--image-key", "png", "--out", str(tmp_path / "png"), "-q"])
    assert rc == 0
    np.testing.assert_array_equal(read_all(tmp_path / "png"), expected_rows(pngs))


def _truncate_last_member(tar, keep_bytes: int = 300) -> None:
    """Cut the tar inside its last member's data (TarWriter writes a record's .jpg after its .cls)."""
    import tarfile

    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
    data = tar.read_bytes()[: last.offset_data + keep_bytes]
    tar.write_bytes(data)


def test_bad_records_and_files_are_skipped_and_listed(inputs, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, images = inputs
    bad = list(images)
    bad[3] = images[3][:200]  # a JPEG cut short: Pillow cannot decode it
    tars = write_tars(tmp_path / "wds", bad, PER_TAR, extra={14: {"txt": b"a caption, no image"}})
    _truncate_last_member(tars[2])  # record 35, the last of tar 2, is cut
    rc, out, _ = cli(["--from", "webdataset", tmp_path / "wds", "--out", tmp_path / "ds"], capsys)
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    names = ["train-000000.tar:000003", "train-000001.tar:000014", "train-000002.tar:000035"]
    assert rc == 0 and meta["skipped"]["count"] == 3 and sorted(meta["skipped"]["files"]) == names
    assert "truncated" in meta["skipped"]["files"][names[2]] and "no image" in meta["skipped"]["files"][names[1]]
    assert out.strip().splitlines()[-1].startswith("skipped 3 record(s)") and meta["rows"] == COUNT - 3
    keep = [i for i in range(COUNT) if i not in (3, 14, 35)]
    np.testing.assert_array_equal(read_all(tmp_path / "ds"), expected_rows([images[i] for i in keep]))

    pq_dir = tmp_path / "pq"
    write_arrow_parquet(pq_dir / "a.parquet", images[:20], 10, column="image")
    (pq_dir / "b.parquet").write_bytes((pq_dir / "a.parquet").read_bytes()[:-12] + b"\0" * 12)  # corrupt footer
    pq.write_table(pa.table({"other": [b"x"] * 5}), pq_dir / "c.parquet")  # wrong column
    write_arrow_parquet(pq_dir / "d.parquet", images[20:], 10, column="image")
    rc, out, _ = cli(["--from", "parquet", pq_dir, "--out", tmp_path / "pds"], capsys)
    meta = json.loads((tmp_path / "pds" / "dataset.json").read_text())
    assert rc == 0 and sorted(meta["skipped"]["files"]) == ["b.parquet", "c.parquet"] and meta["rows"] == COUNT
    assert "no column 'image'" in meta["skipped"]["files"]["c.parquet"]
    assert out.strip().splitlines()[-1].startswith("skipped 2 ")
    np.testing.assert_array_equal(read_all(tmp_path / "pds"), expected_rows(images))


def test_bad_inputs_exit_2_with_nothing_written(inputs, tmp_path, capsys):
    root, _ = inputs
    (tmp_path / "empty.tar").write_bytes(b"")
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "none.tar")):
        pass  # a valid tar with no members
    out = tmp_path / "out"
    cases = [
        (["--from", "webdataset", tmp_path / "nothing-{000..009}.tar"], r"nothing-\{000..009\}.tar matches no tar files"),
        (["--from", "webdataset", tmp_path / "none.tar"], r"none.tar.*an empty tar"),
        (["--from", "webdataset", tmp_path / "empty.tar"], r"empty.tar.*an empty tar"),
        (["--from", "webdataset", root / "wds" / "train-{000000..000009}.tar"], r"6 of the 10 names .* do not exist"),
        (["--from", "parquet", root / "hf", "--column", "pixels"], r"column 'pixels' does not exist .*image, label"),
        (["--from", "parquet", tmp_path / "*.parquet"], r"matches no Parquet files"),
        (["--from", "webdataset", root / "wds", "--shards", "2"], r"--shard-rows N"),
    ]
    import re

    for args, message in cases:
        rc, _, err = cli([*args, "--out", out], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert re.search(message, err), (message, err)
        assert not out.exists() and not list(tmp_path.glob("out*")), args


def test_draft_decode_is_close_to_the_exact_one_but_not_equal():
    jpeg = encoded_images(1, seed=2, size=(256, 256))[0]
    exact = decode_image(jpeg, "gray", (32, 32))
    draft = decode_image(jpeg, "gray", (32, 32), draft=True)
    assert exact.shape == draft.shape == (32, 32)
    diff = np.abs(exact - draft)
    assert 0 < diff.max() < 0.25 and diff.mean() < 0.02, (diff.max(), diff.mean())
    png = encoded_images(1, seed=2, size=(64, 64), fmt="PNG")[0]  # draft mode is JPEG-only: a PNG decodes exactly
    np.testing.assert_array_equal(decode_image(png, "gray", (16, 16), draft=True), decode_image(png, "gray", (16, 16)))
    # MPO (a phone camera's JPEG with a second frame) is a JPEG to draft mode too: its first frame, drafted.
    import io

    from PIL import Image

    frame = Image.open(io.BytesIO(jpeg))
    buf = io.BytesIO()
    frame.save(buf, format="MPO", save_all=True, append_images=[frame], quality=95)
    mpo = buf.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert not np.array_equal(decode_image(mpo, "gray", (32, 32), draft=True), decode_image(mpo, "gray", (32, 32)))


def test_patches_from_tars_and_parquet_follow_the_folder_rule(inputs, tmp_path):
    """Record i of tars or Parquet gives the patches file i of a folder gives: the same dataset."""
    root, images = inputs
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i:06d}.jpg").write_bytes(data)
    options = prep.WriterOptions(shard_rows=30)
    ref = prep.build(FolderPatchSource(folder, patch=5, count=130, seed=4), tmp_path / "ref", None, options)
    tars = prep.build(patch_source(str(root / "wds"), patch=5, count=130, seed=4), tmp_path / "tars", None, options)
    hf = prep.build(patch_source(str(root / "hf"), patch=5, count=130, seed=4), tmp_path / "hf", None, options)
    assert tars.rows == hf.rows == ref.rows == 130
    np.testing.assert_array_equal(read_all(tars.path), read_all(ref.path))
    np.testing.assert_array_equal(read_all(hf.path), read_all(ref.path))


def test_object_storage_reads_in_place_with_the_local_result(inputs, local_s3, tmp_path):
    root, _ = inputs
    bucket = local_s3.create_bucket("dsae-records")
    s3 = local_s3.client()
    for path in sorted((root / "wds").iterdir()) + sorted((root / "hf").iterdir()):
        s3.upload_file(str(path), "dsae-records", f"{path.parent.name}/{path.name}")
    cache = tmp_path.parent / "cache"  # the fixture's DIST_SAE_CACHE is beside it
    shutil.rmtree(cache, ignore_errors=True)
    local = prep.build(WebDatasetSource(str(root / "wds")), tmp_path / "local", None)
    for src in (f"{bucket}/wds/train-{{000000..000003}}.tar", f"{bucket}/wds", f"{bucket}/wds/*.tar"):
        ds = prep.build(WebDatasetSource(src), tmp_path / "s3", None, prep.WriterOptions(overwrite=True))
        assert ds.fingerprint == local.fingerprint, src
    hf = prep.build(ParquetSource(f"{bucket}/hf/"), tmp_path / "hf", None)
    assert hf.fingerprint == prep.build(ParquetSource(str(root / "hf")), tmp_path / "hf-local", None).fingerprint
    log = local_s3.log_path.read_text()
    ranged = [line for line in log.splitlines() if "GET /dsae-records/" in line and '" 206 ' in line]  # ranged GETs
    assert any("/wds/train-" in line for line in ranged) and any("/hf/part-" in line for line in ranged)
    cached = list(cache.rglob("*.tar")) + list(cache.rglob("*.parquet")) if cache.exists() else []
    assert not cached  # read in place: no local copy of the input
    # reads that cross the reader's buffer (8 MB in a build): every byte as on disk, by ranged GETs of 1,000
    from dist_sae.data.inputs import RangedReader
    from dist_sae.data.wds import tar_members

    tar = root / "wds" / "train-000001.tar"
    with open(tar, "rb") as fh, RangedReader(f"{bucket}/wds/{tar.name}", buffer_size=1000) as remote:
        assert remote.read(333) == fh.read(333) and remote.read(2500) == fh.read(2500)
        remote.seek(0)
        fh.seek(0)
        assert [(n, r()) for n, _, r in tar_members(remote)] == [(n, r()) for n, _, r in tar_members(fh)]
    # The .cls members nobody reads are read past in the reader's buffer, not seeked past (a seek
    # drops obstore's buffer: one ranged GET per member): a tar under 8 MB is one GET.
    from dist_sae.data.wds import count_records, tar_records

    before = local_s3.gets("/wds/train-000001.tar")
    assert len(list(tar_records(f"{bucket}/wds/{tar.name}", tar.stat().st_size))) == 12
    assert count_records(f"{bucket}/wds/{tar.name}", tar.stat().st_size) == 12
    assert local_s3.gets("/wds/train-000001.tar") - before == 2  # one each
    rc = main(["data", "build", "--from", "webdataset", f"{bucket}/wds/nope-*.tar", "--out", str(tmp_path / "x"), "-q"])
    assert rc == 2 and not (tmp_path / "x").exists()
    # Patterns as on disk: `*` stays within a level, a glob keeps the suffix, a prefix is listed
    # itself (not the bucket; a single object: that listing finds nothing under it, then one HEAD).
    from dist_sae.data.inputs import expand_inputs

    tar_bytes = (root / "wds" / "train-000001.tar").read_bytes()
    for key in ("nested/t.tar", "nested/deeper/t.tar", "nested/t.tar.idx"):
        s3.put_object(Bucket="dsae-records", Key=key, Body=tar_bytes)
    assert [u for u, _ in expand_inputs(f"{bucket}/nested/*", (".tar",), "tar")] == [f"{bucket}/nested/t.tar"]
    assert [u for u, _ in expand_inputs(f"{bucket}/nested/**/*.tar", (".tar",), "tar")] == [f"{bucket}/nested/deeper/t.tar", f"{bucket}/nested/t.tar"]
    braced = [u for u, _ in expand_inputs(f"{bucket}/{{nested,wds}}", (".tar",), "tar")]  # brace names may be prefixes, as folders
    assert braced[:2] == [f"{bucket}/nested/deeper/t.tar", f"{bucket}/nested/t.tar"] and len(braced) == 6
    before = len(local_s3.log_path.read_text().splitlines())
    assert expand_inputs(f"{bucket}/wds/train-000001.tar", (".tar",), "tar") == [(f"{bucket}/wds/train-000001.tar", len(tar_bytes))]
    assert len(expand_inputs(f"{bucket}/wds/", (".tar",), "tar")) == 4
    requests = local_s3.log_path.read_text().splitlines()[before:]
    lists = [line for line in requests if "list-type=2" in line]
    assert lists and all("prefix=wds" in line for line in lists), lists  # never the whole bucket
    # --from patches --images on object storage: a prefix of tars or Parquet is that kind, found
    # by one listing (not taken for an image folder and downloaded).
    from dist_sae.data.patches import image_set_kind

    assert (image_set_kind(f"{bucket}/wds"), image_set_kind(f"{bucket}/hf/")) == ("webdataset", "parquet")


def test_a_build_process_peak_rss_does_not_grow_with_the_tar_or_parquet_file(tmp_path):
    """The benchmark's RSS case at a small size: /proc of the build process sampled from outside,
    one tar / Parquet file of 300 records against one of 2,400 (docs/sources_bench.json: 1,000 vs 8,000)."""
    from dist_sae.bench.build import make_image_folder
    from dist_sae.bench.sources import rss_case
    from dist_sae.data.images import list_images

    files = list_images(make_image_folder(tmp_path / "jpegs", 60, (96, 96)))
    rss = rss_case(files, tmp_path, 300, (16, 16), engines=("single",))
    assert rss["webdataset"]["8x"]["input_mb"] > 7 * rss["webdataset"]["1x"]["input_mb"]
    assert rss["webdataset"]["8x_over_1x"] <= 1.15 and rss["parquet"]["8x_over_1x"] <= 1.15, rss


def test_files_that_are_not_tars_are_skipped_and_listed(inputs, tmp_path, capsys):
    """A folder of tars with an HTML error page and a gzip file named .tar among them: both skipped,
    named in dataset.json, the good tars built."""
    import gzip

    _, images = inputs
    tars = write_tars(tmp_path / "wds", images[:24], PER_TAR)
    (tmp_path / "wds" / "train-000000x.tar").write_bytes(b"<html><body>503 Service Unavailable</body></html>" * 40)
    (tmp_path / "wds" / "train-000001x.tar").write_bytes(gzip.compress(tars[0].read_bytes()))
    rc, out, _ = cli(["--from", "webdataset", tmp_path / "wds", "--out", tmp_path / "ds"], capsys)
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert rc == 0 and sorted(meta["skipped"]["files"]) == ["train-000000x.tar", "train-000001x.tar"], meta["skipped"]
    assert all("not a tar" in why for why in meta["skipped"]["files"].values()), meta["skipped"]
    np.testing.assert_array_equal(read_all(tmp_path / "ds"), expected_rows(images[:24]))


def test_parts_with_one_file_name_in_two_folders_are_named_apart(inputs, tmp_path, capsys):
    """Hive-style folders (a/train-000000.tar, b/train-000000.tar), a bad record at the same key in
    both: two entries in the skip list, named by their path below the shared folder."""
    _, images = inputs
    bad = list(images[:PER_TAR])
    bad[3] = images[3][:200]
    write_tars(tmp_path / "wds" / "a", bad, PER_TAR)
    write_tars(tmp_path / "wds" / "b", bad, PER_TAR)
    rc, out, _ = cli(["--from", "webdataset", tmp_path / "wds", "--out", tmp_path / "ds"], capsys)
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert rc == 0 and meta["skipped"]["count"] == 2, meta["skipped"]
    assert sorted(meta["skipped"]["files"]) == ["a/train-000000.tar:000003", "b/train-000000.tar:000003"]
    assert meta["rows"] == 2 * (PER_TAR - 1)

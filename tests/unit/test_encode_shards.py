"""Encode written shard by shard: the plan, resume after a stop (Ctrl-C, SIGTERM), a corrupt shard
recomputed, the sparse top-k layout, float16; all in one process (the Ray side: tests/cluster/test_encode_cluster.py)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
import time

import numpy as np
import pytest

import dist_sae
from dist_sae.api import train
from dist_sae.apps.encode import encode_dataset, reconstruct_dataset
from dist_sae.commands.main import main
from dist_sae.data.check import check_dataset, dataset_info
from dist_sae.data.dataset import Dataset
from dist_sae.errors import DataError, Interrupted
from dist_sae.train.codes import plan_shards

from util import config, global_rows, make_dataset, random_rows, read_all


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 12-8-12 model and 1,000 rows in uneven shards of 300, 300, 400."""
    root = tmp_path_factory.mktemp("shards")
    x = random_rows(1000, 12, seed=7)
    make_dataset(root / "uneven", x, shard_rows=400)  # 400, 400, 200
    cfg = config(root / "uneven", model__hidden=[8], optim__steps=5, data__block_rows=64, run__out=str(root / "run"))
    train(cfg)
    return root, x


@pytest.mark.parametrize("sizes,out_rows,block", [([400, 400, 200], 150, 64), ([5, 0, 7], 4, 3), ([100], 100, 100)])
def test_plan_cuts_fixed_row_ranges_into_units_within_each_output_shard(sizes, out_rows, block):
    plan = plan_shards(sizes, out_rows, block)
    total = sum(sizes)
    assert len(plan) == -(-total // out_rows)
    ids = [u.id for units in plan for u in units]
    assert ids == list(range(len(ids)))  # ids in row order over the plan
    for k, units in enumerate(plan):
        rows = np.concatenate([global_rows(u, sizes) for u in units])
        np.testing.assert_array_equal(rows, np.arange(k * out_rows, min((k + 1) * out_rows, total)))
        assert all(0 < u.rows <= block for u in units)


def test_shards_are_fixed_row_ranges_equal_to_the_model(trained, tmp_path):
    root, x = trained
    result = encode_dataset(root / "run", root / "uneven", tmp_path / "codes", local=True, shard_rows=300, overrides=["data.block_rows=64"])
    assert [s.rows for s in result.dataset.shards] == [300, 300, 300, 100]
    np.testing.assert_allclose(read_all(tmp_path / "codes"), dist_sae.load(root / "run").encode(x), rtol=1e-13)
    assert (result.computed, result.kept) == (4, 0)
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["dataset.json"] + [f"shard-0000{i}.h5" for i in range(4)]
    assert not (tmp_path / "codes.partial").exists()


def _stop_after(shards: int, exc: type[BaseException] = KeyboardInterrupt):
    def hook(k, rows):
        if hook.seen == shards - 1:
            raise exc()
        hook.seen += 1
    hook.seen = 0
    return hook


def test_a_stopped_encode_resumes_computing_only_the_missing_shards(trained, tmp_path):
    root, x = trained
    kw = {"local": True, "shard_rows": 100}
    whole = encode_dataset(root / "run", root / "uneven", tmp_path / "whole", **kw).dataset
    with pytest.raises(Interrupted, match=r"encode stopped on Ctrl-C: 3 of 10 shards are finished in .*codes\.partial; "
                                          r"resume with: dist-sae encode .* --shard-rows 100 --local --resume"):
        encode_dataset(root / "run", root / "uneven", tmp_path / "codes", on_shard=_stop_after(3), **kw)
    assert not (tmp_path / "codes").exists()
    with pytest.raises(DataError, match="holds an earlier run's output .3 finished shard.*add --resume"):
        encode_dataset(root / "run", root / "uneven", tmp_path / "codes", **kw)
    with pytest.raises(DataError, match="made with other settings .*rows_per_shard"):
        encode_dataset(root / "run", root / "uneven", tmp_path / "codes", resume=True, local=True, shard_rows=200)
    with pytest.raises(DataError, match="made with other settings .*compute_dtype"):
        encode_dataset(root / "run", root / "uneven", tmp_path / "codes", resume=True, overrides=["compute.dtype=float32"], **kw)
    stored = []
    result = encode_dataset(root / "run", root / "uneven", tmp_path / "codes", resume=True, on_shard=lambda k, r: stored.append(k), **kw)
    assert (result.computed, result.kept) == (7, 3) and stored == list(range(3, 10))
    assert result.dataset.fingerprint == whole.fingerprint
    np.testing.assert_array_equal(read_all(tmp_path / "codes"), read_all(tmp_path / "whole"))
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["dataset.json"] + [f"shard-{k:05d}.h5" for k in range(10)]
    assert not (tmp_path / "codes.partial").exists() and not (tmp_path / "codes.partial.lock").exists()


def test_overwrite_starts_over_from_a_partial_folder_made_with_other_settings(trained, tmp_path):
    root, _ = trained
    with pytest.raises(Interrupted):
        encode_dataset(root / "run", root / "uneven", tmp_path / "codes", local=True, shard_rows=100, on_shard=_stop_after(2))
    for resume in (False, True):
        result = encode_dataset(root / "run", root / "uneven", tmp_path / "codes", local=True, shard_rows=300, overwrite=True, resume=resume)
        assert (result.computed, result.kept) == (4, 0) and [s.rows for s in result.dataset.shards] == [300, 300, 300, 100]


def test_one_encode_at_a_time_writes_a_local_output(trained, tmp_path):
    from dist_sae.data.partial import PartialOutput

    first = PartialOutput(tmp_path / "codes", {"a": 1})
    assert first.start() == {}
    with pytest.raises(DataError, match="another encode is writing .*codes"):
        PartialOutput(tmp_path / "codes", {"a": 1}, resume=True).start()
    first.close()
    assert PartialOutput(tmp_path / "codes", {"a": 1}, resume=True).start() == {}  # released: an empty partial starts afresh


def test_a_shard_corrupted_before_the_resume_is_detected_and_recomputed(trained, tmp_path):
    root, _ = trained
    kw = {"local": True, "shard_rows": 250}
    whole = encode_dataset(root / "run", root / "uneven", tmp_path / "whole", **kw).dataset
    with pytest.raises(Interrupted):
        encode_dataset(root / "run", root / "uneven", tmp_path / "codes", on_shard=_stop_after(3), **kw)
    shard = tmp_path / "codes.partial" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: only the SHA-256 tells
    shard.write_bytes(bytes(data))
    (tmp_path / "codes.partial" / "shard-00000.h5.json").write_text("")  # a record torn by a crash
    stored = []
    result = encode_dataset(root / "run", root / "uneven", tmp_path / "codes", resume=True, on_shard=lambda k, r: stored.append(k), **kw)
    assert (result.computed, result.kept) == (3, 1) and stored == [0, 1, 3]
    assert result.dataset.fingerprint == whole.fingerprint


def test_sigterm_from_the_cli_exits_143_with_the_resume_command_that_finishes_it(trained, tmp_path, capsys):
    root, _ = trained
    out = tmp_path / "codes"
    partial = tmp_path / "codes.partial"

    def terminate_when_two_shards_are_stored():
        while len(list(partial.glob("*.h5.json"))) < 2:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=terminate_when_two_shards_are_stored, daemon=True)
    watcher.start()
    out.mkdir()  # an earlier output, replaced only with --overwrite
    argv = ["encode", "--local", "--quiet", "--model", str(root / "run"), "--data", str(root / "uneven"), "--out", str(out),
            "--shard-rows", "5", "--dtype", "float32", "--chunk-rows", "4", "--overwrite"]
    assert main(argv) == 143
    watcher.join(5)
    err = capsys.readouterr().err
    assert "encode stopped on SIGTERM:" in err and "of 200 shards are finished" in err, err
    command = err.split("resume with: ")[1].strip()
    assert "--chunk-rows 4" in command and "--overwrite" in command
    assert main(shlex.split(command)[1:]) == 0
    assert "finished shard(s) kept from the earlier run" in capsys.readouterr().out
    assert Dataset.open(out).rows == 1000 and Dataset.open(out).dtype == "float32" and Dataset.open(out).chunk_rows() == 4


def test_top_k_layout_reads_back_as_the_dense_codes_with_zeros_elsewhere(trained, tmp_path):
    root, x = trained
    codes = dist_sae.load(root / "run").encode(x)  # (1000, 8)
    result = encode_dataset(root / "run", root / "uneven", tmp_path / "sparse", local=True, top_k=3, dtype="float32")
    meta = json.loads((tmp_path / "sparse" / "dataset.json").read_text())
    assert meta["layout"] == {"kind": "topk", "k": 3, "values": "topk_values", "indices": "topk_indices"}
    # an independent reference: the 3 largest of each row kept, the rest zero
    keep = np.argsort(-np.abs(codes), axis=1, kind="stable")[:, :3]
    want = np.zeros_like(codes, dtype=np.float32)
    np.put_along_axis(want, keep, np.take_along_axis(codes, keep, axis=1).astype(np.float32), axis=1)
    np.testing.assert_array_equal(read_all(tmp_path / "sparse"), want)
    assert result.dataset.dim == 8 and check_dataset(tmp_path / "sparse") == []
    info = dataset_info(tmp_path / "sparse")
    assert info["rows"] == 1000 and info["value_range"][0] == 0.0
    # the rows hash as a reader gets them back: a dense dataset of the same rows has the same fingerprint
    from dist_sae.data.writer import write_array

    assert write_array(tmp_path / "dense", want, shard_rows=400, dtype="float32").fingerprint == result.dataset.fingerprint
    with pytest.raises(DataError, match="--top-k must be between 1 and 7"):
        encode_dataset(root / "run", root / "uneven", tmp_path / "bad", local=True, top_k=8)
    with pytest.raises(DataError, match="not reconstructions"):
        reconstruct_dataset(root / "run", root / "uneven", tmp_path / "bad", local=True, top_k=2)


def test_float16_codes_and_the_output_options(trained, tmp_path):
    root, x = trained
    result = encode_dataset(root / "run", root / "uneven", tmp_path / "half", local=True, dtype="float16", compression="gzip",
                            shard_bytes="2KB", chunk_rows=32)
    ds = result.dataset
    assert ds.dtype == "float16" and [s.rows for s in ds.shards][:2] == [125, 125]  # 2,000 bytes / (8 × 2 bytes per row)
    np.testing.assert_array_equal(read_all(tmp_path / "half"), dist_sae.load(root / "run").encode(x).astype(np.float16))
    assert check_dataset(tmp_path / "half") == []


def test_top_k_keeps_the_largest_magnitudes_ties_to_the_lowest_column_and_narrowing_never_overflows(tmp_path):
    from dist_sae.data.writer import ShardWriter

    rows = np.array([[0.0, -3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])  # linear codes; a row of ties
    writer = ShardWriter(tmp_path / "s.h5", 5, "float32", top_k=2)
    writer.write(rows)
    writer.close()
    import h5py

    from dist_sae.data.dataset import stored_rows

    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["topk_indices"][:], [[1, 3], [0, 1]])
        np.testing.assert_array_equal(stored_rows(f)[0:2], [[0, -3, 0, 2, 0], [1, 1, 0, 0, 0]])
    half = ShardWriter(tmp_path / "h.h5", 2, "float16")
    with pytest.raises(DataError, match="beyond the range of float16"):
        half.write(np.array([[1.0, 70000.0]]))
    half.abort()


def test_encode_to_object_storage_leaves_other_objects_under_the_prefix_alone(trained, tmp_path, local_s3):
    from dist_sae.data import storage

    pytest.importorskip("obstore")
    root, _ = trained
    local_s3.create_bucket("dsae-enc")
    storage.put_bytes("s3://dsae-enc/proj/notes.txt", b"mine")
    with pytest.raises(DataError, match="already holds 1 object"):
        encode_dataset(root / "run", root / "uneven", "s3://dsae-enc/proj", local=True)
    encode_dataset(root / "run", root / "uneven", "s3://dsae-enc/proj", local=True, overwrite=True, shard_rows=500)
    again = encode_dataset(root / "run", root / "uneven", "s3://dsae-enc/proj", local=True, overwrite=True, shard_rows=300).dataset
    names = sorted(storage.listing("s3://dsae-enc/proj"))
    assert names == ["dataset.json", "notes.txt"] + [f"shard-0000{k}.h5" for k in range(4)]  # the old 2 shards replaced
    np.testing.assert_array_equal(read_all(again.url), read_all(encode_dataset(root / "run", root / "uneven", tmp_path / "ref", local=True).dataset.path))

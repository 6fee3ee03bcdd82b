"""`dist-sae data build | transform | check | info`: thin shells over dist_sae.data.build and dist_sae.data.check."""

from __future__ import annotations

import argparse
import json

from dist_sae.errors import DataError
from dist_sae import progress

SOURCE_HELP = """sources:
  npy        INPUT is a .npy or .npz array (rows first), memory-mapped
  idx        INPUT is an MNIST/Fashion-MNIST IDX file, gzipped or not; uint8 is scaled to [0, 1]
  images     INPUT is a folder tree of PNG/JPEG/TIFF (--mode, --size, --fit); undecodable files are skipped
  webdataset INPUT is WebDataset tar shards: a .tar, a folder of them, a glob or "DIR/train-{000000..000099}.tar",
             local or s3:// (read in place); a record's image is its jpg/jpeg/png/webp/ppm/pgm/bmp/tif member
             (--image-key EXT); one shard per tar (--shard-rows N: N tars per shard)
  parquet    INPUT is Parquet files (a file, a folder, a glob, or s3://): --column NAME (default image) holds the
             encoded image, Hugging Face's {bytes, path} struct, or raw pixel values; shards are whole row groups
  patches    random --patch x --patch patches of whitened images (--images SRC or INPUT: an image folder,
             WebDataset tars or Parquet files; or scikit-image's
             photographs); defaults give the notes' exercise data: 10,000 8x8 patches normalised to [0.1, 0.9].
             From a folder, tars or Parquet, patches are seeded per image: image i gives its share of --count
             from seed (seed, i)

--ray builds one shard per task on Ray (--workers N, --address ADDR): the same dataset, fingerprint
included, as without --ray. Patches of the bundled photographs and digits are built in one process.
  digits     scikit-learn's 1797 8x8 digits in [0, 1] (--size 28 upsamples)
  synthetic  --rows N seeded rows of --dim features with planted sparse structure
"""


def _preprocessing_args(p: argparse.ArgumentParser, notes_default: str | None = None) -> None:
    g = p.add_argument_group("preprocessing (dataset-wide statistics are computed out of core and saved in the folder)")
    g.add_argument("--normalize", choices=["notes", "none"], default=notes_default, help="notes: remove each row's mean, clip at ±3 std, map to [0.1, 0.9] (default: notes for patches, none otherwise)")
    g.add_argument("--standardize", action="store_true", help="per feature: subtract the mean, divide by the std")
    g.add_argument("--pca", type=int, nargs="?", const=0, metavar="K", help="PCA whitening, keeping K components (default all)")
    g.add_argument("--zca", action="store_true", help="ZCA whitening")
    g.add_argument("--epsilon", type=float, default=0.1, help="regulariser added to each eigenvalue for PCA/ZCA (default 0.1)")
    g = p.add_argument_group("cluster (the same dataset, fingerprint included, as the single-process build)")
    g.add_argument("--ray", action="store_true", help="write the shards and compute the statistics with Ray tasks, one per shard (a private local Ray on 127.0.0.1 unless --address)")
    g.add_argument("--address", help="Ray cluster to join ('auto' or HOST:PORT; input and output on storage every node sees at the same path); implies --ray")
    g.add_argument("--workers", type=int, help="at most this many tasks at once (default: every CPU); implies --ray")


def _output_args(p: argparse.ArgumentParser, transform: bool = False) -> None:
    """Where and how the new dataset is written; `data transform` takes OUT as a positional and
    keeps the input's dtype by default."""
    g = p.add_argument_group("output")
    if not transform:
        g.add_argument("--out", required=True, help="dataset folder to create (appears only when complete)")
    size = g.add_mutually_exclusive_group()
    if not transform:
        size.add_argument("--shards", type=int, help="number of shards (sources with a known row count)")
    size.add_argument("--shard-rows", type=int, help="rows per shard (--from images: files per shard)")
    size.add_argument("--shard-size", help="bytes per shard, e.g. 256MB (the default)")
    g.add_argument("--chunk-rows", type=int, default=1024, help="HDF5 chunk height in rows")
    g.add_argument("--compression", choices=["gzip", "lzf"], help="HDF5 compression (default none)")
    dtype_default = "the input's" if transform else "float32, float64 for float64 input"
    g.add_argument("--dtype", choices=["float32", "float64", "float16"], help=f"stored dtype (default: {dtype_default})")
    g.add_argument("--block-rows", type=int, help="rows streamed at a time (default: ~32 MB)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder once the new one is complete")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _writer_options(args):
    """The WriterOptions of build.build / build.transform_dataset that _output_args' flags set."""
    from dist_sae.data.build import WriterOptions

    return WriterOptions(
        shard_rows=args.shard_rows,
        shards=getattr(args, "shards", None),
        shard_bytes=args.shard_size,
        block_rows=args.block_rows,
        dtype=args.dtype,
        chunk_rows=args.chunk_rows,
        compression=args.compression,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def register(sub) -> None:
    data = sub.add_parser("data", help="build, transform, check and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("build", help="write a dataset folder from a source", epilog=SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=["npy", "idx", "images", "webdataset", "parquet", "patches", "digits", "synthetic"], help="source kind")
    p.add_argument("input", nargs="?", help="input file, folder or pattern (npy, idx, images, webdataset, parquet; optional for patches)")
    _output_args(p)
    g = p.add_argument_group("source options")
    g.add_argument("--mode", choices=["gray", "rgb"], default="gray", help="images: grayscale or RGB")
    g.add_argument("--size", type=int, nargs="+", metavar="N", help="images: H [W] to resize/crop to; digits: side (8 or 28)")
    g.add_argument("--fit", choices=["resize", "crop"], default="resize", help="images: resize, or centre-crop after scaling the short side")
    g.add_argument("--no-scale", action="store_true", help="idx, images, webdataset, parquet: keep pixel values 0..255 instead of [0, 1]")
    g.add_argument("--decode", choices=["exact", "draft"], default="exact",
                   help="images, webdataset, parquet: draft lets Pillow decode a JPEG at 1/2, 1/4 or 1/8 scale when --size allows (faster; pixels differ)")
    g.add_argument("--image-key", metavar="EXT", help="webdataset: the member extension holding the image (default: the first of jpg, jpeg, png, webp, ppm, pgm, bmp, tif)")
    g.add_argument("--column", default="image", help="parquet: the column holding the images (default image)")
    g.add_argument("--images", metavar="SRC", help="patches: the images to sample: a folder, WebDataset tars or Parquet files (the same as INPUT)")
    g.add_argument("--patch", type=int, default=8, help="patches: side p of the p x p patches")
    g.add_argument("--count", type=int, default=10000, help="patches: how many")
    g.add_argument("--no-whiten", action="store_true", help="patches: do not whiten the images before sampling")
    g.add_argument("--seed", type=int, default=0, help="patches, synthetic: random seed")
    g.add_argument("--rows", type=float, help="synthetic: row count (1e7 is fine)")
    g.add_argument("--dim", type=int, default=64, help="synthetic: features per row")
    g.add_argument("--atoms", type=int, default=32, help="synthetic: dictionary atoms")
    g.add_argument("--active", type=int, default=3, help="synthetic: active atoms per row")
    _preprocessing_args(p)
    p.set_defaults(handler=cmd_build)

    p = dsub.add_parser("transform", help="fit preprocessing on a dataset and write the result as a new one")
    p.add_argument("input", help="dataset folder to read")
    p.add_argument("out_pos", nargs="?", metavar="OUT", help="dataset folder to create (or --out)")
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)
    _output_args(p, transform=True)
    _preprocessing_args(p)
    p.set_defaults(handler=cmd_transform)

    p = dsub.add_parser("check", help="read every shard and report every problem (exit 1 if any)")
    p.add_argument("dir", help="dataset folder")
    p.add_argument("--json", action="store_true", help="print the problems as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_check)

    p = dsub.add_parser("info", help="counts, size on disk, per-feature statistics, a PNG grid of samples")
    p.add_argument("dir", help="dataset folder")
    p.add_argument("--png", help="write a grid of samples to this PNG")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                   help="draw rows as H×W images in the PNG (default: the stored sample shape, or √dim × √dim for flat rows)")
    p.add_argument("--samples", type=int, default=64, help="samples in the PNG grid")
    p.add_argument("--max-rows", type=int, help="compute the statistics over the first N rows only")
    p.add_argument("--json", action="store_true", help="print the info as JSON")
    p.set_defaults(handler=cmd_info)


def _specs(args) -> list:
    from dist_sae.data.transforms import StepSpec

    specs = []
    if args.normalize == "notes":
        specs.append(StepSpec("notes"))
    if args.standardize:
        specs.append(StepSpec("standardize"))
    if args.pca is not None and args.zca:
        raise DataError("choose --pca or --zca, not both")
    if args.pca is not None:
        specs.append(StepSpec("pca", args.epsilon, args.pca or None))
    if args.zca:
        specs.append(StepSpec("zca", args.epsilon))
    return specs


def _on_ray(args) -> bool:
    return bool(args.ray or args.address or args.workers)


def _stats(args):
    if not _on_ray(args):
        return None
    from dist_sae.cluster.stats import ray_sums_fn

    return lambda dataset, block_rows: ray_sums_fn(dataset, block_rows, address=args.address, max_in_flight=args.workers or 64)


def _runner(args):
    if not _on_ray(args):
        return None
    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    from dist_sae.cluster.build import ray_runner

    return ray_runner(address=args.address, workers=args.workers)


def _image_size(args) -> tuple[int, int] | None:
    if not args.size:
        return None
    if len(args.size) > 2:
        raise DataError("--size takes H or H W")
    return (args.size[0], args.size[-1])


def _decode_args(args) -> dict:
    """How an image source decodes: the flags every image source takes."""
    return {"mode": args.mode, "size": _image_size(args), "fit": args.fit, "draft": args.decode == "draft", "scale": not args.no_scale}


# How each --from source is made from the flags: keyword arguments of its class in build.SOURCES.
SOURCE_ARGS = {
    "npy": lambda a: {"path": a.input},
    "idx": lambda a: {"path": a.input, "scale": not a.no_scale},
    "images": lambda a: {"folder": a.input, **_decode_args(a)},
    "webdataset": lambda a: {"src": a.input, "image_key": a.image_key, "tars_per_shard": a.shard_rows or 1, **_decode_args(a)},
    "parquet": lambda a: {"src": a.input, "column": a.column, **_decode_args(a)},
    "patches": lambda a: {"images": a.images or a.input, "patch": a.patch, "count": a.count, "seed": a.seed, "whiten": not a.no_whiten,
                          "image_key": a.image_key, "column": a.column},
    "digits": lambda a: {"size": a.size[0] if a.size else 8},
    "synthetic": lambda a: {"rows": int(a.rows), "dim": a.dim, "seed": a.seed, "atoms": a.atoms, "active": a.active},
}


def cmd_build(args) -> int:
    from dist_sae.data import build as prep

    kind = args.source
    if kind in ("npy", "idx", "images", "webdataset", "parquet") and not args.input:
        raise DataError(f"--from {kind} needs an INPUT {'folder' if kind == 'images' else 'file or pattern' if kind in ('webdataset', 'parquet') else 'file'}")
    if kind == "webdataset" and (args.shards or args.shard_size):
        raise DataError("--from webdataset writes whole tars to each shard: give --shard-rows N (tars per shard, default 1), not --shards or --shard-size")
    if kind == "synthetic" and not args.rows:
        raise DataError("--from synthetic needs --rows N")
    if kind == "patches" and args.normalize is None:
        args.normalize = "notes"
    prep.check_out(args.out, args.overwrite)  # before any decoding
    source = prep.SOURCES[kind](**SOURCE_ARGS[kind](args))
    ds = prep.build(source, args.out, _specs(args), _writer_options(args), stats=_stats(args), runner=_runner(args))
    _summary(ds)
    if source.skipped:
        what = "record(s) or file(s) that could not be read or decoded" if kind in ("webdataset", "parquet") or hasattr(source, "records") else "file(s) that could not be decoded"
        print(f"skipped {len(source.skipped)} {what}: {', '.join(sorted(source.skipped)[:10])}{' ...' if len(source.skipped) > 10 else ''}")
    return 0


def cmd_transform(args) -> int:
    from dist_sae.data import build as prep

    out = args.out or args.out_pos
    if not out:
        raise DataError("give the output folder: dist-sae data transform IN OUT")
    ds = prep.transform_dataset(args.input, out, _specs(args), _writer_options(args), stats=_stats(args), runner=_runner(args))
    _summary(ds)
    return 0


def _summary(ds) -> None:
    steps = ", ".join(p["kind"] for p in ds.preprocessing) or "none"
    print(f"wrote {ds.rows} rows of {ds.dim} features ({'x'.join(map(str, ds.sample_shape))}, {ds.dtype}) in {len(ds.shards)} shard(s) to {ds.location}")
    print(f"preprocessing: {steps}; fingerprint {ds.fingerprint}")


def cmd_check(args) -> int:
    from dist_sae.data.check import check_dataset

    bar = progress.bar(None, "check", quiet=args.quiet, leave=False)
    try:
        problems = check_dataset(args.dir, progress=bar.update)
    finally:
        bar.close()
    if args.json:
        print(json.dumps([{"file": p.file, "rows": list(p.rows) if p.rows else None, "message": p.message} for p in problems], indent=2))
    elif problems:
        print(f"{len(problems)} problem(s) in {args.dir}:")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"{args.dir}: OK")
    return 1 if problems else 0


def cmd_info(args) -> int:
    from dist_sae.data.check import dataset_info, human_bytes, sample_grid

    info = dataset_info(args.dir, max_rows=args.max_rows)
    if args.png:
        info["png"] = str(sample_grid(args.dir, args.png, count=args.samples, shape=args.shape))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fm, fs = info["feature_mean"], info["feature_std"]
    print(f"{info['path']}")
    print(f"  rows {info['rows']}, dim {info['dim']}, sample shape {info['sample_shape']}, {info['dtype']}, {info['shards']} shard(s), {human_bytes(info['bytes_on_disk'])} on disk")
    print(f"  source: {json.dumps(info['source'])}")
    print(f"  preprocessing: {', '.join(p['kind'] for p in info['preprocessing']) or 'none'}")
    print(f"  values in [{info['value_range'][0]:.4g}, {info['value_range'][1]:.4g}] over {info['rows_summarised']} rows")
    print(f"  per-feature mean: min {fm['min']:.4g}, median {fm['median']:.4g}, max {fm['max']:.4g}")
    print(f"  per-feature std:  min {fs['min']:.4g}, median {fs['median']:.4g}, max {fs['max']:.4g}")
    print(f"  fingerprint {info['fingerprint']}")
    if "png" in info:
        print(f"  sample grid: {info['png']}")
    return 0

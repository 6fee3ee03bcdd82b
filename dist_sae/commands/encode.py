"""`dist-sae encode | reconstruct`: a thin shell over dist_sae.apps.encode."""

from __future__ import annotations

import argparse

DTYPES = ("float16", "float32", "float64")  # apps.encode.DTYPES (not imported here: parsing stays free of torch)

EPILOG = """Each worker writes the shards it computes into OUT.partial/ (a folder, or s3:// gs:// az://);
dataset.json comes last. Output shard k holds a fixed range of input rows, so the output is the same
for any number of workers and equal to --local. A stopped or killed run continues with --resume:
every finished shard whose size and SHA-256 still match its record is kept, the rest computed.
--top-k K stores each row's K largest codes and their columns (topk_values, topk_indices); the
readers (training, data info, data check) give the rows back dense, zeros elsewhere."""


def register(sub) -> None:
    for kind, text in (("encode", "write the hidden codes of every row of a dataset as a new dataset"),
                       ("reconstruct", "write the reconstructions of every row of a dataset as a new dataset")):
        p = sub.add_parser(kind, help=text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--model", required=True, help="run directory or model.safetensors")
        p.add_argument("--data", required=True, help="input dataset folder or URL")
        p.add_argument("--out", required=True, help="dataset to create: a folder or s3://bucket/prefix (appears only when complete)")
        if kind == "encode":
            p.add_argument("--layer", type=int, help="encoder layer whose codes to write (1-based; default: the innermost)")
            p.add_argument("--top-k", type=int, metavar="K", help="store only each row's K largest codes and their columns (sparse layout)")
        p.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: the input's)")
        size = p.add_mutually_exclusive_group()
        size.add_argument("--shard-rows", type=int, help="input rows per output shard")
        size.add_argument("--shard-size", help="bytes per output shard, e.g. 256MB (default: the input's shards, at most 256MB)")
        p.add_argument("--compression", choices=["gzip", "lzf"], help="HDF5 compression (default none)")
        p.add_argument("--chunk-rows", type=int, default=1024, help="HDF5 chunk height in rows")
        p.add_argument("--resume", action="store_true", help="continue a stopped run: keep OUT.partial's verified shards, compute the rest")
        p.add_argument("--local", action="store_true", help="run in this process without Ray")
        p.add_argument("--address", help="Ray address to join; default: start a local Ray")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and start over from an earlier OUT.partial)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="session config overrides, e.g. workers.num=4 data.block_rows=8192")
        p.set_defaults(handler=cmd_transform, kind=kind)


def cmd_transform(args) -> int:
    from dist_sae.apps.encode import transform_dataset

    result = transform_dataset(
        args.model, args.data, args.out, kind=args.kind, layer=getattr(args, "layer", None), local=args.local,
        address=args.address, overrides=args.overrides, dtype=args.dtype, overwrite=args.overwrite, quiet=args.quiet,
        resume=args.resume, top_k=getattr(args, "top_k", None), shard_rows=args.shard_rows, shard_bytes=args.shard_size,
        compression=args.compression, chunk_rows=args.chunk_rows,
    )
    ds = result.dataset
    kept = f"; {result.kept} finished shard(s) kept from the earlier run" if result.kept else ""
    start = f": {result.start_s:.2f}s starting the workers, {result.encode_s:.2f}s encoding" if result.computed else ""
    print(f"wrote {result.rows} rows of {ds.dim} features in {len(ds.shards)} shard(s) to {ds.location} ({result.seconds:.2f}s{start}{kept})")
    return 0

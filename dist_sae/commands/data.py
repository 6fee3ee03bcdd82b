"""data build / check / info / transform."""

from __future__ import annotations

from .. import prep


def register(sub) -> None:
    data = sub.add_parser("data", help="build, check and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("build", help="write a dataset folder from a source")
    p.add_argument("--from", dest="source", required=True, choices=["npy"], help="source kind")
    p.add_argument("input", nargs="?", help="input file or folder")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--shards", type=int, help="number of shards")
    p.add_argument("--shard-rows", type=int, help="rows per shard")
    p.add_argument("--chunk-rows", type=int, default=1024, help="HDF5 chunk height in rows")
    p.add_argument("--compression", choices=["gzip", "lzf"], help="HDF5 compression")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(handler=cmd_build)


def cmd_build(args) -> int:
    ds = prep.build_from_npy(
        args.input,
        args.out,
        shards=args.shards,
        shard_rows=args.shard_rows,
        chunk_rows=args.chunk_rows,
        compression=args.compression,
        overwrite=args.overwrite,
    )
    print(f"wrote {ds.rows} rows of {ds.dim} features in {len(ds.shards)} shard(s) to {ds.path}")
    return 0

"""``mae-service data synth | pack | index``: registered on the ``mae-service`` parser by :mod:`mae_service.cli`."""

from __future__ import annotations

import argparse

from mae_service.data import formats


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to ``sub``."""
    data = sub.add_parser("data", help="make or convert image datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="{synth,pack,index}", required=True)

    s = dsub.add_parser(
        "synth",
        help="write a labelled synthetic image set (real JPEG/PNG files)",
        description="Write procedurally drawn images of up to 12 shape classes (class visible only "
        "from shape/structure) to a local folder or s3://bucket/prefix.",
    )
    s.add_argument("out", metavar="OUT", help="output folder or s3://bucket/prefix")
    s.add_argument("--num-images", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--classes", type=int, default=12, help="number of classes (1-12)")
    s.add_argument("--format", default=formats.FOLDER, help=f"{' | '.join(formats.NAMES)} (default {formats.FOLDER})")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction in OUT/val (the rest goes to OUT/train); 0 writes straight to OUT",
    )
    s.add_argument("--shard-size", type=int, default=256, help="images per tar / Parquet file (wds, parquet)")
    s.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    s.set_defaults(func=_synth)

    p = dsub.add_parser(
        "pack",
        help=f"convert a folder of images into shards ({', '.join(formats.PACK_TARGETS)})",
        description="Copy the images under SRC (class folders give labels) into shuffled shards "
        "under OUT, with an _index.json of class names and counts.",
    )
    p.add_argument("src", metavar="SRC", help="folder or s3://bucket/prefix of images")
    p.add_argument("out", metavar="OUT", help="output folder or s3://bucket/prefix")
    p.add_argument("--format", required=True, help=" | ".join(formats.PACK_TARGETS))
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=_pack)

    i = dsub.add_parser(
        "index",
        help="write a manifest of a folder of loose images (format files), so it opens without listing",
        description="List the images under URI once and write URI/_mae_manifest.parquet (keys, labels, sizes). "
        "Training and evaluation then read the manifest instead of listing the objects; run it again after "
        "adding or removing images (a manifest naming missing objects is refused).",
    )
    i.add_argument("uri", metavar="URI", help="folder or s3://bucket/prefix of images (class folders give labels)")
    i.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    i.set_defaults(func=_index)


def _synth(args: argparse.Namespace) -> int:
    from mae_service.data.synth import synthesize

    counts = synthesize(
        args.out,
        num_images=args.num_images,
        image_size=args.image_size,
        classes=args.classes,
        fmt=args.format,
        seed=args.seed,
        val_fraction=args.val_fraction,
        shard_size=args.shard_size,
        s3_endpoint=args.s3_endpoint,
        progress=True,
    )
    print(f"wrote {sum(counts.values())} images ({', '.join(f'{k}: {v}' for k, v in counts.items())}) to {args.out}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from mae_service.data.pack import pack

    n = pack(
        args.src,
        args.out,
        fmt=args.format,
        shard_size=args.shard_size,
        seed=args.seed,
        s3_endpoint=args.s3_endpoint,
        progress=True,
    )
    print(f"packed {n} images into {args.format} shards under {args.out}")
    return 0


def _index(args: argparse.Namespace) -> int:
    import time

    from mae_service.data.formats.files import write_manifest

    t0 = time.perf_counter()
    n, where = write_manifest(args.uri, s3_endpoint=args.s3_endpoint)
    print(f"indexed {n} images of {args.uri} into {where} in {time.perf_counter() - t0:.1f} s")
    return 0

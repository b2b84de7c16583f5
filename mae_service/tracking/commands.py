"""``mae-service models …``, ``mae-service eval knn`` and ``mae-service reconstruct``.

Registered on the ``mae-service`` parser by :mod:`mae_service.cli`. Imports stay light: MLflow, torch and Ray
load inside the handlers. Registry lookups fail fast: an unreachable server is reported in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from typing import Any

_TRACKING_HELP = "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
_URI_HELP = "models:/NAME@ALIAS or models:/NAME/VERSION"


def _fast_fail() -> None:
    """Short HTTP retries for interactive lookups (MLflow's defaults retry for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow's per-file progress bars would bury the one-line answers; downloads log what they fetch instead
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _tracking_uri(args: argparse.Namespace) -> str:
    from mae_service.tracking.runs import check_reachable, resolve_tracking_uri

    # absolute SQLite path; http://user:password@… credentials moved to MLflow's auth variables
    uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    check_reachable(uri)
    return uri


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


# ---- models -------------------------------------------------------------------------------------------------
def _models_list(args: argparse.Namespace) -> int:
    from mae_service.tracking.registry import list_versions

    rows = list_versions(tracking_uri=_tracking_uri(args), name=args.name, include_all=args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(
            "no mae-service encoders registered"
            + (f" under {args.name!r}" if args.name else "")
            + " (run mae-service pretrain, or --all to list every model)"
        )
        return 0
    table = [
        [
            r["name"],
            str(r["version"]),
            ",".join(f"@{a}" for a in r["aliases"]) or "-",
            _when(r["created"]),
            r["tags"].get("model_name", "-" if r["encoder"] else "(not mae-service)"),
            r["tags"].get("steps", "-"),
            r["tags"].get("eval.knn_top1", "-"),
            r["tags"].get("data_uri", "-"),
        ]
        for r in rows
    ]
    print(_table(table, ["NAME", "VERSION", "ALIASES", "CREATED", "MODEL", "STEPS", "KNN_TOP1", "DATA"]))
    return 0


_GROUPS = (
    (
        "lineage",
        (
            "data_uri",
            "config_digest",
            "model_name",
            "timm_name",
            "image_size",
            "patch_size",
            "embed_dim",
            "mask_ratio",
            "norm_pix_loss",
            "decoder_embed_dim",
            "decoder_depth",
            "steps",
            "final_loss",
            "checkpoint_uri",
            "source_run",
        ),
    ),
    ("checksums", ("weights_sha256", "mae_weights_sha256", "architecture_sha256")),
)


def _models_show(args: argparse.Namespace) -> int:
    from mae_service.tracking.artifacts import EVAL_TAG_PREFIX, KIND_TAG
    from mae_service.tracking.registry import describe

    info = describe(args.uri, tracking_uri=_tracking_uri(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    aliases = ", ".join(f"@{a}" for a in info["aliases"]) or "none"
    print(f"{info['uri']}  (aliases: {aliases})")
    print(f"  status    {info['status']}")
    print(f"  created   {_when(info['created'])}")
    print(f"  run       {info['run_id']}")
    print(f"  source    {info['source']}")
    if not info["encoder"]:
        print("  (not an mae-service encoder)")
    tags = dict(info["tags"])
    for title, keys in _GROUPS:
        present = [(k, tags.pop(k)) for k in keys if k in tags]
        if present:
            print(f"  {title}:")
            for k, v in present:
                print(f"    {k:<20} {v}")
    evals = {k: tags.pop(k) for k in list(tags) if k.startswith(EVAL_TAG_PREFIX)}
    if evals:
        print("  evaluations:")
        for k, v in sorted(evals.items()):
            print(f"    {k[len(EVAL_TAG_PREFIX) :]:<20} {v}")
    tags.pop(KIND_TAG, None)
    if tags:
        print("  other tags:")
        for k, v in sorted(tags.items()):
            print(f"    {k:<20} {v}")
    if info["files"]:
        print("  files:")
        for path, size in info["files"].items():
            print(f"    {path:<36} {size if size is not None else '?':>12} bytes")
    if info["encoder"]:
        uri = f"models:/{info['name']}@{info['aliases'][0]}" if info["aliases"] else info["uri"]
        print(f"load:  python -c \"from mae_service.tracking import load_encoder; enc = load_encoder('{uri}')\"")
        print(
            f"serve: mae-service models download {uri} OUT (every file verified), then "
            "mlflow models serve -m OUT --env-manager local"
        )
    return 0


def _models_download(args: argparse.Namespace) -> int:
    from mae_service.tracking.artifacts import FILES_SHA_TAG
    from mae_service.tracking.registry import download, load_mae

    uri = _tracking_uri(args)
    out = download(args.uri, args.out, tracking_uri=uri)
    tags = json.loads((out / "registry.json").read_text()).get("tags", {})
    what = "every file" if FILES_SHA_TAG in tags else "the weights and architecture.json"
    print(f"downloaded {args.uri} to {out} ({what} verified against the sha256 recorded at registration)")
    print(f"serve it: mlflow models serve -m {out} --env-manager local")
    if args.hf:
        from mae_service.model.export import save_hf_pretrained

        hf = save_hf_pretrained(load_mae(args.uri, tracking_uri=uri), out / "hf")
        print(f"Hugging Face layout: {hf} (transformers.ViTMAEForPreTraining.from_pretrained)")
    return 0


def _models_promote(args: argparse.Namespace) -> int:
    from mae_service.tracking.register import promote

    previous = promote(args.name, args.version, args.alias, tracking_uri=_tracking_uri(args))
    was = f"(was version {previous})" if previous is not None else "(new alias)"
    print(f"models:/{args.name}@{args.alias} → version {int(args.version)} {was}")
    return 0


# ---- eval / reconstruct ------------------------------------------------------------------------------------
def _eval_knn(args: argparse.Namespace) -> int:
    from mae_service.tracking.evaluations import evaluate_model

    model, train, val, fmt, k = args.model, args.train_data, args.val_data, args.format, args.k
    s3_endpoint, tracking = args.s3_endpoint, args.tracking_uri
    if args.config or args.overrides:  # a job config (as in ``jobs/evaluate.py``) fills what the flags leave open
        from mae_service.config import load_config

        cfg = load_config(args.config, args.overrides)
        model = model or f"models:/{cfg.registry.model_name}@{cfg.registry.alias}"
        train, val = train or cfg.data.train_uri, val or cfg.data.val_uri
        fmt, k = fmt or cfg.data.format, k or cfg.train.knn_k
        s3_endpoint, tracking = s3_endpoint or cfg.data.s3_endpoint, tracking or cfg.mlflow.tracking_uri
    missing = [flag for flag, v in (("--model", model), ("--train-data", train), ("--val-data", val)) if not v]
    if missing:
        raise ValueError(
            f"missing {', '.join(missing)} (give the flags, or --config with registry.model_name, "
            "data.train_uri and data.val_uri)"
        )
    args.tracking_uri = tracking
    metrics = evaluate_model(
        model,
        train,
        val,
        fmt=fmt or "files",
        image_size=args.image_size,
        k=k or 20,
        temperature=args.temperature,
        linear_probe=not args.no_linear_probe,
        random_baseline=args.random_baseline,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        s3_endpoint=s3_endpoint,
        tracking_uri=_tracking_uri(args),
        experiment=args.experiment,
        record=not args.no_record,
        amp=args.amp,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:<32} {int(value)}" if key.startswith("num_") else f"{key:<32} {value:.4f}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from mae_service.tracking.pictures import reconstruct_to_file

    uri = _tracking_uri(args)
    out = reconstruct_to_file(
        args.model,
        args.data,
        args.out,
        fmt=args.format,
        num_images=args.num_images,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        s3_endpoint=args.s3_endpoint,
        tracking_uri=uri,
    )
    print(f"wrote {out} (rows: original | masked | reconstruction | reconstruction + visible)")
    return 0


def _wrap(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        _fast_fail()
        return fn(args)

    return run


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models``, ``eval`` and ``reconstruct`` to ``sub``."""
    _register_models(sub)
    _register_eval(sub)
    _register_reconstruct(sub)


def _register_models(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="look up registered encoders (list, show, download, promote)")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    p = msub.add_parser("list", help="registered mae-service encoders, newest first")
    p.add_argument("--name", default=None, help="only this registered model")
    p.add_argument("--all", action="store_true", help="include model versions that are not mae-service encoders")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_tracking(p)
    p.set_defaults(func=_wrap(_models_list))

    p = msub.add_parser("show", help="one version: aliases, lineage, checksums, evaluations, files")
    p.add_argument("uri", metavar="URI", help=_URI_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_tracking(p)
    p.set_defaults(func=_wrap(_models_show))

    p = msub.add_parser("download", help="copy a version's files (MLmodel, pyfunc, weights) and verify them")
    p.add_argument("uri", metavar="URI", help=_URI_HELP)
    p.add_argument("out", metavar="OUT", help="new or empty folder")
    p.add_argument("--hf", action="store_true", help="also write the Hugging Face ViTMAE layout to OUT/hf")
    _add_tracking(p)
    p.set_defaults(func=_wrap(_models_download))

    p = msub.add_parser("promote", help="point an alias at a version")
    p.add_argument("name", metavar="NAME", help="registered model name")
    p.add_argument("version", metavar="VERSION", help="version number")
    p.add_argument("--alias", required=True, help="alias to set, e.g. production")
    _add_tracking(p)
    p.set_defaults(func=_wrap(_models_promote))


def _register_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a registered encoder on labelled data")
    esub = ev.add_subparsers(dest="eval_command", metavar="METHOD", required=True)
    p = esub.add_parser(
        "knn",
        help="k-NN (and linear-probe) top-1 accuracy on frozen features; recorded in MLflow",
        description="Embed labelled train and held-out images with a registered encoder (Ray Data), "
        "score k-NN and a linear probe, log an MLflow run and tag the model version. "
        "With --config (and KEY=VALUE overrides) the model, data and tracking URI "
        "default to the config's registry.*, data.* and mlflow.*.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.val_uri=s3://b/v")
    p.add_argument("--config", default=None, help="YAML job config (as for pretrain)")
    p.add_argument("--model", default=None, help=_URI_HELP)
    p.add_argument("--train-data", default=None, help="labelled images the classifiers fit (s3:// or a path)")
    p.add_argument("--val-data", default=None, help="labelled held-out images (s3:// or a path)")
    p.add_argument("--format", default=None, choices=("files", "wds", "parquet"), help="data format (default files)")
    p.add_argument("--image-size", type=_positive_int, default=None, help="crop size (default: the encoder's)")
    p.add_argument("--k", type=_positive_int, default=None, help="neighbours (default 20, or train.knn_k)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per embedding batch")
    p.add_argument("--concurrency", type=_positive_int, default=1, help="Ray Data embedding actors")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"), help="embeddings' autocast (train.amp)")
    p.add_argument("--no-linear-probe", action="store_true", help="skip the linear probe")
    p.add_argument(
        "--random-baseline", action="store_true", help="also score the same architecture with random weights"
    )
    p.add_argument(
        "--experiment", default=None, help="MLflow experiment of the evaluation run (default mae-service-eval)"
    )
    p.add_argument("--no-record", action="store_true", help="do not log a run or tag the model version")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_tracking(p)
    p.set_defaults(func=_wrap(_eval_knn))


def _register_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="picture of masked images and the registered MAE's reconstructions")
    p.add_argument("--model", required=True, help=_URI_HELP)
    p.add_argument("--data", required=True, help="images (s3:// or a path)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--format", default="files", choices=("files", "wds", "parquet"), help="data format")
    p.add_argument("--num-images", type=_positive_int, default=4, help="rows in the picture (default 4)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")
    _add_tracking(p)
    p.set_defaults(func=_wrap(_reconstruct))

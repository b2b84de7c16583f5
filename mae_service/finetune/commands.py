"""``mae-service eval finetune`` and ``mae-service eval report`` (added to the ``eval`` group of
:mod:`mae_service.tracking.commands`, which :mod:`mae_service.cli` registers first).

Flags are config overrides: ``--model`` is ``finetune.model_uri``, ``--train-data``/``--val-data`` are
``data.train_uri``/``data.val_uri``, ``--blocks``, ``--from-scratch`` and ``--epochs`` the ``finetune`` keys; a flag
wins over ``--config FILE`` and ``KEY=VALUE``. Torch, Ray and MLflow load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

_URI_HELP = "models:/NAME@ALIAS or models:/NAME/VERSION (a registered mae-service encoder)"


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "finetune.model_uri": args.model,
        "data.train_uri": args.train_data,
        "data.val_uri": args.val_data,
        "data.format": args.format,
        "mlflow.tracking_uri": args.tracking_uri,
        "finetune.epochs": args.epochs,
    }
    out = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    if getattr(args, "blocks", None) is not None:
        out.append(f"finetune.blocks={args.blocks}")
    if getattr(args, "from_scratch", False):
        out.append("finetune.from_scratch=true")
    return out


def _config(args: argparse.Namespace) -> Any:
    from mae_service.config import load_config

    return load_config(args.config, _overrides(args))


def _write_json(path: str | None, payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def cmd_finetune(args: argparse.Namespace) -> int:
    from mae_service.finetune.driver import finetune

    res = finetune(_config(args))
    _write_json(args.json, res.to_json())
    top5 = f"{res.top5:.4f}" if res.top5 is not None else "- (fewer than 5 classes)"
    print(f"fine-tune:    {res.run_name} ({res.step} steps, {res.epochs} epochs, {res.seconds:.0f} s)")
    print(f"source:       {res.source_uri}")
    print(f"val top-1:    {res.top1:.4f}   top-5: {top5}")
    print(f"mlflow run:   {res.mlflow_run_id}")
    print(f"classifier:   {res.classifier_uri or '(not registered)'}")
    if res.classifier_uri:
        print(
            f'load it:      python -c "from mae_service.tracking import load_classifier; '
            f"m = load_classifier('{res.classifier_uri}')\""
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mae_service.finetune.table import report

    res = report(_config(args), epochs=args.epochs, partial_blocks=tuple(args.partial), out_dir=args.out)
    print(res.markdown)
    _write_json(args.json, res.to_json())
    print(f"\nrecorded as MLflow run {res.mlflow_run_id} (report.md, report.csv, report.png); files in {res.out_dir}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. finetune.batch_size=256")
    p.add_argument("--config", default=None, help="YAML job config (sections as for pretrain, plus finetune)")
    p.add_argument("--model", default=None, help=_URI_HELP)
    p.add_argument("--train-data", default=None, help="labelled training images (s3:// or a path)")
    p.add_argument("--val-data", default=None, help="labelled held-out images (s3:// or a path)")
    p.add_argument("--format", default=None, choices=("files", "wds", "parquet"), help="data format (data.format)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (finetune.epochs)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (mlflow.tracking_uri)")


def _eval_group(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    ev = sub.choices["eval"]
    return next(a for a in ev._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune`` and ``report`` to the ``eval`` group."""
    esub = _eval_group(sub)
    p = esub.add_parser(
        "finetune",
        help="fine-tune a registered encoder as a ViT classifier on Ray Train (MAE's yardstick)",
        description="Fine-tune a registered encoder as a timm ViT classifier with the MAE paper's recipe "
        "(AdamW, layer-wise lr decay, mixup/cutmix, label smoothing, drop path, warm-up + cosine) on Ray Train; "
        "log an MLflow run, register the classifier (<source>-ft) and record its top-1 on the source version.",
    )
    _common(p)
    p.add_argument("--blocks", type=int, default=None, help="train only the last K blocks; 0: the linear probe")
    p.add_argument("--from-scratch", action="store_true", help="same architecture from random init (the baseline)")
    p.set_defaults(func=cmd_finetune)

    p = esub.add_parser(
        "report",
        help="k-NN, linear probe, partial and full fine-tune, scratch baseline: one table of top-1",
        description="Run k-NN (with a random-init twin), the linear probe (--blocks 0), partial fine-tunes, the "
        "full fine-tune and the scratch baseline with the same budget; print one table and log it to MLflow.",
    )
    _common(p)
    p.add_argument("--partial", type=int, nargs="*", default=[1, 2], metavar="K", help="partial blocks (default 1 2)")
    p.add_argument("--out", default=None, help="folder for report.md/.csv/.png (default: a temporary one)")
    p.set_defaults(func=cmd_report)

"""``mae-service pretrain`` and its closing summary (:func:`report`, which ``mae-service demo`` prints too)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="MAE pretraining on Ray Train (local Ray, or the cluster in RAY_ADDRESS)")
    p.add_argument("--config", help="YAML config (sections data, model, train, tune, mlflow, registry)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.mask_ratio=0.6 train.epochs=10")
    p.set_defaults(func=cmd_pretrain)


def run_and_report(cfg) -> int:
    from mae_service.train.driver import pretrain

    report(cfg, pretrain(cfg))
    return 0


def report(cfg, result, evaluation: dict | None = None) -> None:
    """The closing summary: what was trained, how long, how good (next to random weights), where to look."""
    from mae_service.tracking.pictures import latest_picture

    took = f" in {result.train_seconds:.0f} s" if result.train_seconds is not None else ""
    loss = f", final loss {result.loss:.4f}" if isinstance(result.loss, int | float) else ""
    print(f"\ntrained:      run {result.run_name} to step {result.step}{took}{loss}")
    if evaluation:
        print(
            f"evaluation:   k-NN top-1 {evaluation['knn_top1']:.3f} (random weights {evaluation['knn_top1_random_init']:.3f})"
            + (
                f", linear probe {evaluation['linear_probe_top1']:.3f} "
                f"(random weights {evaluation['linear_probe_top1_random_init']:.3f})"
                if "linear_probe_top1" in evaluation
                else ""
            )
            + " on the held-out split"
        )
    elif result.metrics and "knn_top1" in result.metrics:
        print(f"evaluation:   k-NN top-1 {result.metrics['knn_top1']:.3f} on data.val_uri")
    picture = latest_picture(result.tracking_uri, result.mlflow_run_id) if result.mlflow_run_id else None
    if picture:
        print(f"picture:      {picture}")
    print(f"mlflow run:   {result.mlflow_run_id} at {result.tracking_uri}")
    print(f"checkpoint:   {result.checkpoint_uri}")
    if result.model_version is not None:
        mv = result.model_version
        alias_uri = f"models:/{mv.name}@{cfg.registry.alias}"
        print(f"registered:   models:/{mv.name}/{mv.version} (alias @{cfg.registry.alias})")
        print(f"look it up:   MLFLOW_TRACKING_URI={result.tracking_uri} .venv/bin/mae-service models show {alias_uri}")
        print(
            f'load it:      MLFLOW_TRACKING_URI={result.tracking_uri} .venv/bin/python -c "from mae_service.tracking '
            f"import load_encoder; print(load_encoder('{alias_uri}'))\""
        )


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mae_service.config import load_config

    cfg = load_config(args.config, args.overrides)
    return run_and_report(cfg)

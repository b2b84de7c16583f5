"""``mae-service pretrain`` and ``mae-service demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="MAE pretraining on Ray Train (local Ray, or the cluster in RAY_ADDRESS)")
    p.add_argument("--config", help="YAML config (sections data, model, train, tune, mlflow, registry)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.mask_ratio=0.6 train.epochs=10")
    p.set_defaults(func=cmd_pretrain)

    d = sub.add_parser("demo", help="synthetic data → local pretraining with 2 workers → registered encoder")
    d.add_argument("--out", default="demo_out", help="folder for the demo's data, checkpoints and MLflow store")
    d.add_argument("--no-finetune", action="store_true", help="skip the closing fine-tune vs scratch table")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d.set_defaults(func=cmd_demo)


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


def cmd_demo(args: argparse.Namespace) -> int:
    from mae_service.config import load_config
    from mae_service.data.synth import synthesize

    out = Path(args.out)
    data = out / "data"
    if not (data / "train").exists():
        print(f"writing a synthetic labelled image set to {data} …", file=sys.stderr)
        synthesize(
            str(data), num_images=1200, image_size=64, classes=10, fmt="files", seed=0, val_fraction=0.25, progress=True
        )
    overrides = [
        f"data.train_uri={data / 'train'}",
        f"data.val_uri={data / 'val'}",
        f"train.storage_path={out.resolve() / 'checkpoints'}",
        f"mlflow.tracking_uri=sqlite:///{out.resolve() / 'mlflow.db'}",
        *args.overrides,
    ]
    cfg = load_config(DEMO_CONFIG, overrides)
    from mae_service.train.driver import pretrain

    t0 = time.monotonic()
    result = pretrain(cfg)
    evaluation = None
    if result.model_version is not None and cfg.data.val_uri:
        from mae_service.tracking import evaluate_model

        print("evaluating the registered encoder against the same architecture with random weights …", file=sys.stderr)
        evaluation = evaluate_model(
            result.model_version.alias_uri,
            cfg.data.train_uri,
            cfg.data.val_uri,
            tracking_uri=result.tracking_uri,
            random_baseline=True,
            linear_probe=True,
            experiment=cfg.mlflow.experiment,
        )
    report(cfg, result, evaluation)
    if result.model_version is not None and cfg.data.val_uri and not args.no_finetune:
        _finetune_table(cfg, result.model_version.alias_uri, out)
    print(f"demo:         {time.monotonic() - t0:.0f} s in all (training, evaluation, fine-tuning, registration)")
    return 0


def _finetune_table(cfg, model_uri: str, out: Path) -> None:
    """The short results table: the encoder fine-tuned end to end next to the same recipe from random weights
    (``finetune`` section of the demo config), as ``mae-service eval report`` prints it in full."""
    import dataclasses

    from mae_service.finetune.table import report as results_table

    print(
        f"fine-tuning the encoder and, for comparison, the same ViT from random weights "
        f"({cfg.finetune.epochs} epochs each) …",
        file=sys.stderr,
    )
    ft_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, model_uri=model_uri))
    table = results_table(ft_cfg, short=True, out_dir=str(out / "report"))
    print("\n" + table.markdown)
    print(
        f"the whole table:   .venv/bin/mae-service eval report --model {model_uri} --train-data "
        f"{cfg.data.train_uri} --val-data {cfg.data.val_uri} --tracking-uri {cfg.mlflow.tracking_uri} "
        f"train.num_workers={cfg.train.num_workers} finetune.batch_size={cfg.finetune.batch_size} "
        f"finetune.epochs=10"
    )

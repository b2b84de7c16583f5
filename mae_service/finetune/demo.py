"""``mae-service demo``: synthetic data → local pretraining with 2 workers → registered encoder → its evaluation
next to random weights → the short fine-tuning table (fine-tune vs scratch). It composes pretraining, evaluation
and fine-tuning, so it lives at the fine-tuning layer."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mae_service.train.commands import REPO, report

DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="synthetic data → local pretraining with 2 workers → registered encoder")
    d.add_argument("--out", default="demo_out", help="folder for the demo's data, checkpoints and MLflow store")
    d.add_argument("--no-finetune", action="store_true", help="skip the closing fine-tune vs scratch table")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d.set_defaults(func=cmd_demo)


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

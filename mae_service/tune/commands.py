"""``mae-service sweep``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over mask ratio and decoder size (objective: k-NN accuracy)")
    p.add_argument("--config", help="YAML config; the tune section gives the search space and scheduler")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. tune.mask_ratios=[0.5,0.75,0.9]")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from mae_service.config import load_config
    from mae_service.tune.sweep import sweep

    cfg = load_config(args.config, args.overrides)
    result = sweep(cfg)
    metric = cfg.tune.metric
    print(f"sweep:        {result.sweep_name} (parent MLflow run {result.parent_run_id})")
    print(f"{'mask':>6} {'width':>6} {'depth':>6} {metric:>10} {'step':>6}  stopped-early")
    for r in sorted(result.table, key=lambda r: (r["decoder_embed_dim"], r["mask_ratio"])):
        depth = r["decoder_depth"] if r["decoder_depth"] is not None else "-"
        print(
            f"{r['mask_ratio']:>6g} {r['decoder_embed_dim']:>6} {depth!s:>6} {r[metric]:>10.4f} {r['step']:>6}  "
            f"{'yes' if r['stopped_early'] else 'no'}{'  (failed)' if r['error'] else ''}"
        )
    if result.model_version is not None and result.best is not None:
        mv = result.model_version
        print(
            f"best:         {result.best['run_name']} → models:/{mv.name}/{mv.version} (alias @{cfg.tune.best_alias})"
        )
    return 0

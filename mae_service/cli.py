"""The ``mae-service`` console script (also ``python -m mae_service``).

Each area of the package registers its own subcommands (``register(subparsers)`` in its ``commands``
module), so this file stays a table of contents. Exit 0 on success; on bad input, exit 2 with a one-line reason.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mae_service.runtime import ExitError, offline_defaults, quiet_output

COMMAND_MODULES = (
    "mae_service.train.commands",  # pretrain
    "mae_service.finetune.demo",  # demo
    "mae_service.tune.commands",  # sweep
    "mae_service.data.commands",  # data synth | pack
    "mae_service.tracking.commands",  # models …, eval knn, reconstruct
    "mae_service.finetune.commands",  # eval finetune | report (after tracking: it adds to the eval group)
)


# Offline hygiene for every process the CLI starts (Ray workers inherit the environment at ray.init).
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-service", description="MAE pretraining on Ray, tracked in MLflow.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, with Ray's and MLflow's own output"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_output(not args.verbose)  # Ray's and MLflow's own lines only with -v
    try:
        rc = args.func(args)
    except ValueError as e:  # user mistakes: one clear line (ConfigError lists every problem), no credentials
        from mae_service.tracking.runs import redact

        print(f"mae-service {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except ExitError as e:  # e.g. the tracking server lost after training: one line, the command's exit code
        from mae_service.tracking.runs import redact

        print(f"mae-service {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"mae-service {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)

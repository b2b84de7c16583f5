"""Subcommands of this area, registered on the ``mae-service`` parser by :mod:`mae_service.cli`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to ``sub``."""

"""Lazy package exports: ``import mae_service.<area>`` stays cheap; a name's module loads on first use.

Standard library only; any package may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that resolves ``name`` from ``exports[name]``, which is
    ``"module"`` (the same name there) or ``"module:attribute"`` (another name)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = exports[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)

    return __getattr__

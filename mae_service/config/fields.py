"""How a config field is declared and read: docs and checks on the field, YAML/CLI values coerced to its type.

Pure: standard library and nothing else. :mod:`mae_service.config` declares the sections with these pieces.
The alias and model-name rules live here once; the registry (``mae_service.tracking``) applies the same ones.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import field
from typing import Any, get_args, get_origin

Check = Callable[[Any], "str | None"]  # what is wrong with a value ("must be ≥ 1", "is empty"), or None

ALIAS_RULE = "an alias is 1–255 letters, digits, '_' or '-', and not 'latest' or v<number> (reserved by MLflow)"
MODEL_NAME_RULE = (
    "a registered model name has at most 255 characters and no '/', ':', '@' or quotes (models:/NAME@ALIAS)"
)


def alias_problem(alias: Any) -> str | None:
    """None when MLflow accepts ``alias`` as a registry alias; else the rule it breaks."""
    ok = (
        isinstance(alias, str)
        and re.fullmatch(r"[\w-]{1,255}", alias)
        and alias.lower() != "latest"
        and not re.fullmatch(r"[vV]\d+", alias)
    )
    return None if ok else ALIAS_RULE


def model_name_problem(name: Any) -> str | None:
    """None when ``name`` can be a registered model's name; else the rule it breaks."""
    ok = (
        isinstance(name, str)
        and name.strip()
        and len(name) <= 255
        and not set(name) & set("/:@'\"`")
        and name not in (".", "..")
    )
    return None if ok else MODEL_NAME_RULE


AUTH_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""Where MLflow's client reads HTTP basic-auth credentials (never a URI, a param, a tag or a checkpoint)."""


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http(s)://user:password@host…`` → ``(http(s)://host…, user, password)`` (percent-decoded); any other URI
    (databases keep theirs: SQLAlchemy reads them from the URI) comes back unchanged with ``(None, None)``."""
    parts = urllib.parse.urlsplit(uri) if isinstance(uri, str) else None
    if parts is None or parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    user, _, password = parts.netloc.rsplit("@", 1)[0].partition(":")
    host = parts.netloc.rsplit("@", 1)[1]
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return clean, urllib.parse.unquote(user) or None, urllib.parse.unquote(password) if password else None


def adopt_credentials(uri: str, environ: dict | None = None) -> str:
    """``uri`` without its user-info; the user and password go to :data:`AUTH_ENV` in ``environ`` (default
    ``os.environ``), where MLflow's client (and, passed on, Ray workers) read them."""
    import os

    clean, user, password = split_credentials(uri)
    env = os.environ if environ is None else environ
    for key, value in zip(AUTH_ENV, (user, password), strict=True):
        if value is not None:
            env[key] = value
    return clean


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


# ---- field declarations and their checks ---------------------------------------------------------------------
def declare(default: Any, doc: str, *checks: Check, each: Check | None = None, defines_run: bool = False) -> Any:
    """A field. ``checks`` test its value (unless None; the first failure is reported), ``each`` every item of a
    list; ``defines_run``: part of what the run learns (:meth:`Config.digest`, :meth:`Config.resume_conflicts`)."""
    meta = {"doc": doc, "checks": checks, "each": each, "defines_run": defines_run}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def rule(ok: Callable[[Any], Any], problem: str) -> Check:
    return lambda v: None if ok(v) else problem


def ge(lo: float, note: str = "") -> Check:
    return rule(lambda v: v >= lo, f"must be ≥ {lo}{note}")


def one_of(*allowed: str) -> Check:
    return rule(lambda v: v in allowed, f"allowed {', '.join(allowed)}")


def filled(hint: str = "") -> Check:
    return rule(lambda v: v.strip() if isinstance(v, str) else v, "is empty" + (hint and f": {hint}"))


positive = rule(lambda v: v > 0, "must be positive")
unit = rule(lambda v: 0 < v < 1, "must be in (0, 1)")
beta = rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
WHERE = "give s3://bucket/prefix or a local"
RUN_NAME_RULE = (
    "must be a plain name (no '/', not starting with '.'): 1–200 letters, digits, '_', '-' or '.', e.g. vitb-800"
)
plain_name = rule(lambda v: isinstance(v, str) and re.fullmatch(r"(?!\.)[\w.-]{1,200}", v, re.ASCII), RUN_NAME_RULE)
"""A run name: it names a storage folder and is looked up in MLflow (a quote there would break the filter)."""
server_uri = rule(
    lambda v: "://" in v and not v.startswith("file:"),
    "MLflow 3 needs a database or server URI (sqlite:///mlflow.db, http://host:5000)",
)
is_model_name = model_name_problem
is_alias = alias_problem


# ---- reading values -------------------------------------------------------------------------------------------------
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar(v: Any, tp: type) -> Any:
    """``v`` as ``tp`` (bool, int, float or str); ValueError when it is not one."""
    if tp is bool and isinstance(v, str) and v.lower() in _BOOLS:
        return _BOOLS[v.lower()]
    if tp is str and v is not None and not isinstance(v, dict | list):
        return str(v)
    if isinstance(v, bool) != (tp is bool) or not isinstance(v, int | float | str) or tp is str:
        raise ValueError(v)
    if tp is int and not isinstance(v, int):
        if not float(v).is_integer():
            raise ValueError(v)
        return int(float(v))
    return tp(v)


def coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert a YAML/CLI value to the field's type, or record a problem (and return the value unchanged)."""
    if type(None) in get_args(tp):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    origin, args = get_origin(tp), get_args(tp)
    if origin not in (list, tuple):
        try:
            return _scalar(value, tp)
        except (ValueError, OverflowError):
            if value is None:  # YAML null / ~: say so, rather than show the string 'None'
                problems.append(f"{where}=null: expected {_EXPECTED[tp]} (this key cannot be null)")
            else:
                problems.append(f"{where}={value!r}: expected {_EXPECTED[tp]}")
            return value
    n = len(args) if origin is tuple else 0
    if not isinstance(value, list | tuple) or (n and len(value) != n):
        problems.append(f"{where}={value!r}: expected {f'{n} values' if n else 'a list'}")
        return value
    items = [coerce(v, args[i] if n else args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    return tuple(items) if n else items

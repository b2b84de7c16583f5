"""Names and plumbing every registry call shares: ``models:/`` URIs, aliases, the tracking URI MLflow reads,
MLflow errors as one line.

Pure Python; MLflow is imported inside :func:`use_tracking_uri` only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from mae_service.config.fields import alias_problem
from mae_service.tracking.runs import resolve_tracking_uri

T = TypeVar("T")

_URI_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_URI_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/@]+)$")


# ---- model URIs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (VERSION may be ``latest``)."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    """Parse a registry URI; ValueError naming the accepted forms otherwise."""
    forms = "models:/NAME@ALIAS or models:/NAME/VERSION (e.g. models:/mae-encoder@current, models:/mae-encoder/3)"
    text = str(uri).strip()
    if m := _URI_ALIAS.match(text):
        return ModelRef(m["name"], alias=m["alias"])
    if m := _URI_VERSION.match(text):
        version = m["version"]
        if not (version.isdigit() and int(version) > 0) and version != "latest":
            raise ValueError(
                f"model URI {uri!r}: version {version!r} must be a positive integer or 'latest'; expected {forms}"
            )
        return ModelRef(m["name"], version=version)
    raise ValueError(f"model URI {uri!r} is not of the form {forms}")


def check_alias(alias: str) -> str:
    """ValueError unless ``alias`` is a name MLflow accepts as an alias (the rule the config checks too)."""
    problem = alias_problem(alias)
    if problem:
        raise ValueError(f"alias {alias!r}: {problem}; pick a name such as current, best or production")
    return alias


# ---- MLflow plumbing shared with register.py -----------------------------------------------------------------
@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Parts of MLflow (model logging, ``models:/`` sources) read the global tracking URI: set it for the block,
    then restore it."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    if previous == uri:
        yield
        return
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def with_tracking_uri(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with its ``tracking_uri`` keyword resolved and installed as MLflow's global tracking URI."""

    @functools.wraps(fn)
    def wrapper(*args: Any, tracking_uri: str | None = None, **kwargs: Any) -> T:
        uri = resolve_tracking_uri(tracking_uri)
        with use_tracking_uri(uri):
            return fn(*args, tracking_uri=uri, **kwargs)

    return wrapper


def first_line(e: BaseException) -> str:
    """The first line of an (MLflow) error's message, for one-line answers."""
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", ""))

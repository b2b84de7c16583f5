"""Keeping credentials out of text that is logged or stored (pure: no Ray, no MLflow), used by the tracking
layer and by checkpoints."""

from __future__ import annotations

import os
import re

_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
    "RAY_AUTH_TOKEN",
)


def redact(value: str) -> str:
    """Drop credentials from a text: URL user-info, signed query strings, the values of secret env vars."""
    value = re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1", value)
    value = re.sub(r"\?[^\s]*(signature|token|credential|secret|password)[^\s]*", "", value, flags=re.IGNORECASE)
    for env in _SECRET_ENV:
        secret = os.environ.get(env)
        if secret and len(secret) >= 8 and secret in value:
            value = value.replace(secret, "<redacted>")
    return value

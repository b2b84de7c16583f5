"""MLflow side of mae-service: the model registry (register, look up, load, serve) and evaluations.

Importing this package is cheap: MLflow, torch and timm load on first use of a function.

- :func:`register_encoder` — the driver registers the encoder at the end of a successful run.
- :func:`load_encoder` / :func:`load_mae` — ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → verified model.
- :func:`list_versions`, :func:`describe`, :func:`download`, :func:`promote` — what ``mae-service models`` runs.
- :func:`record_eval` — evaluation metrics as an MLflow run and as tags on the model version.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "register_encoder": "mae_service.tracking.registry",
    "RegisteredEncoder": "mae_service.tracking.registry",
    "load_encoder": "mae_service.tracking.registry",
    "load_mae": "mae_service.tracking.registry",
    "list_versions": "mae_service.tracking.registry",
    "describe": "mae_service.tracking.registry",
    "download": "mae_service.tracking.registry",
    "promote": "mae_service.tracking.registry",
    "record_eval": "mae_service.tracking.registry",
    "parse_model_uri": "mae_service.tracking.registry",
    "ModelRef": "mae_service.tracking.registry",
    "LINEAGE_KEYS": "mae_service.tracking.registry",
    "evaluate_model": "mae_service.tracking.evaluate",
    "dataset_features": "mae_service.tracking.evaluate",
    "splits_features": "mae_service.tracking.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mae_service.tracking' has no attribute {name!r}")

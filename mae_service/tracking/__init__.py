"""MLflow side of mae-service: runs, the model registry (register, look up, load, serve) and evaluations.

Owns every MLflow call: :mod:`.runs` (tracking URIs, reachability, experiments, run records, keeping secrets
out), :mod:`.uris` (``models:/`` URIs, aliases), :mod:`.registry` (resolution, verified loads, listings), :mod:`.register` (new
versions, aliases, recorded evaluations), :mod:`.artifacts` (what a version holds and its checksums),
:mod:`.evaluations` (score a registered encoder and record it), :mod:`.pictures` (``mae-service reconstruct``)
and :mod:`.commands` (the ``models``/``eval``/``reconstruct`` CLI). ``encoder_pyfunc.py`` is the serving code
stored with each model and imports nothing from the package.

May import: :mod:`mae_service.evaluation`, :mod:`mae_service.runtime`, :mod:`mae_service.config`,
:mod:`mae_service.data`, :mod:`mae_service.model` — never train or tune. Importing this package is cheap:
MLflow, torch and timm load on first use of a function.

- :func:`register_encoder` — the driver registers the encoder at the end of a successful run.
- :func:`load_encoder` / :func:`load_mae` — ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → verified model.
- :func:`list_versions`, :func:`describe`, :func:`download`, :func:`promote` — what ``mae-service models`` runs.
- :func:`record_eval` — evaluation metrics as an MLflow run and as tags on the model version.
- :func:`evaluate_model` — what ``mae-service eval knn`` runs.
- :func:`load_classifier` / :func:`register_classifier` — fine-tuned classifiers (:mod:`.classifiers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_service.lazy import lazy_exports

_EXPORTS = {
    "register_encoder": "mae_service.tracking.register",
    "RegisteredEncoder": "mae_service.tracking.register",
    "promote": "mae_service.tracking.register",
    "record_eval": "mae_service.tracking.register",
    "load_encoder": "mae_service.tracking.registry",
    "load_mae": "mae_service.tracking.registry",
    "list_versions": "mae_service.tracking.registry",
    "describe": "mae_service.tracking.registry",
    "download": "mae_service.tracking.registry",
    "parse_model_uri": "mae_service.tracking.uris",
    "ModelRef": "mae_service.tracking.uris",
    "evaluate_model": "mae_service.tracking.evaluations",
    "load_classifier": "mae_service.tracking.classifiers",
    "register_classifier": "mae_service.tracking.classifiers",
}

__all__ = [
    "ModelRef",
    "RegisteredEncoder",
    "describe",
    "download",
    "evaluate_model",
    "list_versions",
    "load_classifier",
    "load_encoder",
    "load_mae",
    "parse_model_uri",
    "promote",
    "record_eval",
    "register_classifier",
    "register_encoder",
]

if TYPE_CHECKING:  # pragma: no cover
    from mae_service.tracking.classifiers import load_classifier, register_classifier
    from mae_service.tracking.evaluations import evaluate_model
    from mae_service.tracking.register import RegisteredEncoder, promote, record_eval, register_encoder
    from mae_service.tracking.registry import describe, download, list_versions, load_encoder, load_mae
    from mae_service.tracking.uris import ModelRef, parse_model_uri


__getattr__ = lazy_exports(__name__, _EXPORTS)

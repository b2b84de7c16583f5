"""Evaluation of encoders on frozen features: embeddings, weighted k-NN, linear probe.

Owns: the embedding of uint8 images by an in-memory encoder (:mod:`.features`, including the Ray Data pass that
embeds whole datasets in actors), k-NN top-1 (:mod:`.knn`, also the in-training k-NN of the sweep objective) and
the linear probe (:mod:`.probes`). Knows nothing of MLflow or the registry: :mod:`mae_service.tracking` loads
registered encoders and records what this package computes.

May import: :mod:`mae_service.model`, :mod:`mae_service.data`, :mod:`mae_service.runtime`, torch, timm and
``ray.data`` — never tracking, train or tune. Importing this package is cheap: torch loads on first use.

Public interface::

    embed(model, uint8 [N, 3, H, W], dtype=None) -> float32 [N, D]            # dtype: autocast (None: fp32)
    extract_features(model, batches) / extract_labelled_features(model, batches) -> features (, labels)
    splits_features([ds, …], [encoder, …]) -> [([features per encoder], labels), …]   # one Ray Data pass
    knn_top1(train_feats, train_labels, val_feats, val_labels, k=20, temperature=0.07) -> float
    knn_metrics(model, spec) -> {"knn_top1": …}                                    # in training, rank 0
    linear_probe(train_feats, train_labels, val_feats, val_labels) -> float
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_service.lazy import lazy_exports

_EXPORTS = {
    "embed": "mae_service.evaluation.features",
    "extract_features": "mae_service.evaluation.features",
    "extract_labelled_features": "mae_service.evaluation.features",
    "splits_features": "mae_service.evaluation.features",
    "knn_top1": "mae_service.evaluation.knn",
    "knn_metrics": "mae_service.evaluation.knn",
    "linear_probe": "mae_service.evaluation.probes",
}

__all__ = [
    "embed",
    "extract_features",
    "extract_labelled_features",
    "knn_metrics",
    "knn_top1",
    "linear_probe",
    "splits_features",
]

if TYPE_CHECKING:  # pragma: no cover
    from mae_service.evaluation.features import embed, extract_features, extract_labelled_features, splits_features
    from mae_service.evaluation.knn import knn_metrics, knn_top1
    from mae_service.evaluation.probes import linear_probe


__getattr__ = lazy_exports(__name__, _EXPORTS)

"""The MAE model: factory, presets, input normalisation, checkpoint interoperability (see ``export``), and the
autocast dtype ``train.amp`` resolves to on a device (``precision``: the training step, embeddings and pictures).

Pure package: imports torch and timm, never Ray or MLflow. Names load lazily, so ``import mae_service.model`` and
:mod:`mae_service.model.presets` (names, shapes, override keys) do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_service.lazy import lazy_exports

_EXPORTS = {
    "IMAGENET_MEAN": "mae_service.model.mae",
    "IMAGENET_STD": "mae_service.model.mae",
    "MaskedAutoencoder": "mae_service.model.mae",
    "create_model": "mae_service.model.mae",
    "normalize": "mae_service.model.mae",
    "MODEL_NAMES": "mae_service.model.presets",
    "OVERRIDE_KEYS": "mae_service.model.presets",
    "preset": "mae_service.model.presets",
    "sincos_2d": "mae_service.model.pos_embed",
    "autocast": "mae_service.model.precision",
    "resolve_amp": "mae_service.model.precision",
}

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "OVERRIDE_KEYS",
    "MaskedAutoencoder",
    "autocast",
    "create_model",
    "normalize",
    "preset",
    "resolve_amp",
    "sincos_2d",
]

if TYPE_CHECKING:  # pragma: no cover
    from mae_service.model.mae import IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoder, create_model, normalize
    from mae_service.model.pos_embed import sincos_2d
    from mae_service.model.precision import autocast, resolve_amp
    from mae_service.model.presets import MODEL_NAMES, OVERRIDE_KEYS, preset


__getattr__ = lazy_exports(__name__, _EXPORTS)

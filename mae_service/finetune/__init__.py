"""Fine-tuning registered encoders as timm ViT classifiers on Ray Train, and the results table.

Owns: ``preflight`` (every check before Ray: source encoder, ``--blocks`` range, labels and class sets, storage),
``driver`` (preflight → MLflow run → ``TorchTrainer.fit`` → registered classifier → score on the source version),
``loop`` (the per-rank function: the paper's fine-tuning recipe with timm's layer decay, Mixup/CutMix, soft-target
loss and drop path), ``table`` (``report``: k-NN, linear probe, partial and full fine-tune, scratch baseline: one table) and
``commands`` (``mae-service eval finetune`` and ``eval report``).

May import: ``train`` (checkpoints, step plan, run logger, the MLflow run of a job), ``tracking``, ``evaluation``,
``runtime``, ``config``, ``data``, ``model``; never ``tune`` or ``cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_service.lazy import lazy_exports

_EXPORTS = {
    "finetune": "mae_service.finetune.driver",
    "FinetuneResult": "mae_service.finetune.driver",
    "protocol": "mae_service.finetune.driver",
    "report": "mae_service.finetune.table",
    "ReportResult": "mae_service.finetune.table",
}

__all__ = ["FinetuneResult", "ReportResult", "finetune", "protocol", "report"]

if TYPE_CHECKING:  # pragma: no cover
    from mae_service.finetune.driver import FinetuneResult, finetune, protocol
    from mae_service.finetune.table import ReportResult, report


__getattr__ = lazy_exports(__name__, _EXPORTS)

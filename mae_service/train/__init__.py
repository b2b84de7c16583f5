"""Pretraining on Ray Train: the driver, the per-worker loop, one optimiser step, checkpoints, the run logger.

Owns: ``driver`` (preflight → MLflow run → ``TorchTrainer.fit`` → register; the public API the sweep uses),
``loop`` (the per-rank function, a table of contents), ``step`` (one optimiser step and the step arithmetic,
pure torch), ``schedule`` (optimiser and learning rate, pure), ``checkpoint`` (self-describing checkpoints,
finding a run's latest), ``run_logger`` (rank 0's queued metrics, pictures and system metrics), ``commands``
(``mae-service pretrain`` and ``demo``).

May import: ``tracking``, ``evaluation``, ``runtime``, ``config``, ``data``, ``model``; never ``tune`` or ``cli``.
"""

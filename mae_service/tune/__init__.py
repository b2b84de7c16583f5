"""Ray Tune sweeps over mask ratio and decoder size (``mae-service sweep``).

Owns: the search space, the scheduler, the sweep's parent MLflow run and its results table, registering the
best trial. May import: the training driver's public API (``train.driver``), ``tracking.runs``, ``runtime``,
``config``, ``data.storage``; never ``cli``.
"""

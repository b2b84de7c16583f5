"""Rank 0's link to the run's MLflow record: queued metrics, reconstruction pictures, system metrics.

Nothing here may stop training: a lost metric batch or picture upload is a warning. Metrics are queued with
MLflow's asynchronous logging (its writer thread sends them while the next step runs) and :meth:`RunLogger.flush`
waits for them before every checkpoint, so the metrics up to a checkpoint are in MLflow before it exists.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mae_service.model.mae import MaskedAutoencoder

logger = logging.getLogger(__name__)


class RunLogger:
    """Logs into MLflow run ``run_id`` at ``tracking_uri`` (rank 0 only; other ranks hold no logger)."""

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self.run_id = run_id
        self.client = mlflow.MlflowClient(tracking_uri)
        self._pending: list[Any] = []  # MLflow RunOperations of queued metric batches
        self._system = False
        if system_metrics:
            try:
                mlflow.start_run(run_id=run_id, log_system_metrics=True)
                self._system = True
            except Exception as e:  # noqa: BLE001 - system metrics are a nicety; never fail a run for them
                logger.warning("system metrics disabled: %s", e)

    def metrics(self, values: dict[str, float], step: int, *, wait: bool = False) -> None:
        """Queue ``values`` at ``step`` (sent in the background unless ``wait``)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in values.items()]
        try:
            op = self.client.log_batch(self.run_id, metrics=batch, synchronous=wait)
        except Exception as e:  # noqa: BLE001 - a lost metric batch must not kill training
            logger.warning("metrics at step %d not logged to MLflow: %s", step, e)
            return
        if op is not None and not wait:
            self._pending.append(op)

    def tag(self, key: str, value: str) -> None:
        """Set tag ``key`` on the run (a warning when it fails)."""
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as e:  # noqa: BLE001 - a lost tag must not kill training
            logger.warning("tag %s not set on the MLflow run: %s", key, e)

    def picture(
        self, model: MaskedAutoencoder, images: torch.Tensor, step: int, *, seed: int, dtype: torch.dtype | None = None
    ) -> None:
        """Log the reconstruction grid of ``images`` (uint8), computed under autocast ``dtype`` (None: fp32), as
        ``reconstructions/step_XXXXXXXX.png``."""
        from mae_service.model.pictures import reconstruction_grid

        try:
            grid = reconstruction_grid(model, images, seed=seed, dtype=dtype)
            self.client.log_image(self.run_id, grid, artifact_file=f"reconstructions/step_{step:08d}.png")
        except Exception as e:  # noqa: BLE001 - a failed picture upload must not kill training
            logger.warning("reconstruction picture at step %d not logged: %s", step, e)

    def flush(self) -> None:
        """Wait until every queued metric batch is sent."""
        for op in self._pending:
            try:
                op.wait()
            except Exception as e:  # noqa: BLE001 - a lost metric batch must not kill training
                logger.warning("metrics not logged to MLflow: %s", e)
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._system:
            import mlflow

            try:
                mlflow.end_run()
            except Exception:  # noqa: BLE001
                pass

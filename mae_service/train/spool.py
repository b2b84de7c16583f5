"""The MLflow spool: tracking records that could not be delivered, kept beside a run's checkpoints.

When the tracking server is unreachable, rank 0's :class:`~mae_service.train.run_logger.RunLogger` writes what it
still holds (metric batches, reconstruction pictures, tags) to ``<train.storage_path>/<run_name>/mlflow_spool.jsonl``
at every checkpoint and at the end of training; the driver adds what it could not record at the end of the run.
A resubmit of the same command replays the spool into the same MLflow run before it trains, then deletes it.

The file is rewritten whole each time (object stores have no append): one JSON object per line, each naming the
MLflow run it belongs to::

    {"kind": "metrics", "run_id": "…", "step": 12, "ts": 1733130000000, "values": {"loss": 0.51, "lr": 0.001}}
    {"kind": "picture", "run_id": "…", "path": "reconstructions/step_00000012.png", "png": "<base64>"}
    {"kind": "tag", "run_id": "…", "key": "mae.checkpoint_uri", "value": "s3://…/step_00000024"}

Storage only (pyarrow filesystems through :mod:`mae_service.data.storage`, local or ``s3://``); no MLflow here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

SPOOL_FILE = "mlflow_spool.jsonl"
KINDS = ("metrics", "picture", "tag")

logger = logging.getLogger(__name__)


class SpoolError(OSError):
    """The spool could not be read or written; the message names its location."""


@dataclass(frozen=True)
class Spool:
    """Where run ``run_name``'s spool lives: ``storage_path`` (a local folder or ``s3://bucket/prefix``, the run's
    ``train.storage_path``), read and written with ``s3_endpoint`` (``data.s3_endpoint``)."""

    storage_path: str
    run_name: str
    s3_endpoint: str | None = None

    @property
    def uri(self) -> str:
        """The spool's location as the user writes it (``s3://…`` or a local path)."""
        base = self.storage_path.rstrip("/")
        if "://" not in base:
            base = os.path.abspath(os.path.expanduser(base))
        return f"{base}/{self.run_name}/{SPOOL_FILE}"

    def to_dict(self) -> dict[str, Any]:
        return {"storage_path": self.storage_path, "run_name": self.run_name, "s3_endpoint": self.s3_endpoint}

    def _fs_path(self) -> tuple[Any, str]:
        from mae_service.data.storage import filesystem_for

        fs, root = filesystem_for(self.storage_path, s3_endpoint=self.s3_endpoint)
        return fs, f"{root.rstrip('/')}/{self.run_name}/{SPOOL_FILE}"

    def read(self) -> list[dict[str, Any]]:
        """The records in the spool (empty when there is none). A line that is not a record (e.g. cut short) is
        skipped with a warning; SpoolError when the storage cannot be read."""
        import pyarrow.fs as pafs

        try:
            fs, path = self._fs_path()
            if fs.get_file_info(path).type != pafs.FileType.File:
                return []
            with fs.open_input_stream(path) as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError as e:
            raise SpoolError(f"cannot read the MLflow spool {self.uri}: {e}") from e
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or rec.get("kind") not in KINDS or not rec.get("run_id"):
                logger.warning("MLflow spool %s: line %d is not a record, skipped", self.uri, n)
                continue
            records.append(rec)
        return records

    def write(self, records: list[dict[str, Any]]) -> None:
        """Replace the spool with ``records`` (an empty list deletes it). Readers see the old or the new file: a
        local file is renamed into place, an S3 object appears when its upload completes."""
        import pyarrow.fs as pafs

        if not records:
            self.clear()
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        try:
            fs, path = self._fs_path()
            folder = path.rsplit("/", 1)[0]
            fs.create_dir(folder, recursive=True)
            tmp = path if not isinstance(fs, pafs.LocalFileSystem) else f"{folder}/.{SPOOL_FILE}.tmp"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            if tmp != path:
                fs.move(tmp, path)
        except OSError as e:
            raise SpoolError(f"cannot write the MLflow spool {self.uri}: {e}") from e

    def clear(self) -> None:
        """Delete the spool (nothing when there is none)."""
        import pyarrow.fs as pafs

        try:
            fs, path = self._fs_path()
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)
        except OSError as e:
            raise SpoolError(f"cannot delete the MLflow spool {self.uri}: {e}") from e


def spool_from_dict(d: dict[str, Any] | None) -> Spool | None:
    return Spool(**d) if d else None

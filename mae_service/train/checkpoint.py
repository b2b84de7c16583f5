"""Self-describing training checkpoints, written without pickle.

A checkpoint is a directory (uploaded by Ray Train to ``train.storage_path/<run_name>/step_XXXXXXXX``)::

    model.safetensors   MAE weights (the reference checkpoints' key names)
    state.pt            optimiser, AMP scaler and RNG states: tensors and plain containers only,
                        read back with ``torch.load(weights_only=True)``
    meta.json           step, rows consumed per rank, resolved config, model args, MLflow run id, last loss,
                        and the bytes and sha256 of every other file (written last, after the files were read back)
    config.yaml         the resolved config the run used (credentials scrubbed), for people and for load_config

A reader trusts a step folder only when its ``meta.json`` parses and every file it lists has the recorded size
(:func:`latest_checkpoint`: an interrupted upload or a full disk is passed over, with a warning naming the
folder); :func:`read_meta` also checks the sha256 of each file before a checkpoint is loaded.

Writing and reading is pure (torch, safetensors, json); finding a run's latest checkpoint on its storage
(local or ``s3://``) uses pyarrow's filesystems through :mod:`mae_service.data.storage`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"

logger = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only or missing folder); the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class CheckpointMeta:
    step: int
    rows_per_rank: int
    """Rows of each rank's data stream consumed up to this step (the data position)."""
    config: dict[str, Any]
    model_args: dict[str, Any]
    mlflow_run_id: str | None = None
    loss: float | None = None
    format_version: int = FORMAT_VERSION
    files: dict[str, dict[str, Any]] | None = None
    """``{file name: {"bytes": n, "sha256": hex}}`` of every file beside ``meta.json`` (None: an older
    checkpoint, trusted as it is)."""

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        return cls(**d)


def _sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _scrubbed(value: Any) -> Any:
    """``value`` with credentials removed from every string in it (URI user-info, secrets of the environment)."""
    from mae_service.config.secrets import redact

    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    meta: CheckpointMeta,
    config_yaml: str | None = None,
) -> None:
    """Write a checkpoint into ``directory``: the files, then ``meta.json`` recording their sizes and sha256 (read
    back from disk), atomically. :class:`CheckpointWriteError` naming the folder when the storage refuses."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(d / "model.safetensors"))
        extra: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            extra["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(extra, d / "state.pt")
        if config_yaml is not None:
            (d / CONFIG_FILE).write_text(config_yaml)
        names = ["model.safetensors", "state.pt"] + ([CONFIG_FILE] if config_yaml is not None else [])
        meta.files = {n: {"bytes": (d / n).stat().st_size, "sha256": _sha256(d / n)} for n in names}
        tmp = d / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps(_scrubbed(meta.__dict__), indent=1, default=str))
        os.replace(tmp, d / META_FILE)  # last, and atomic: a reader sees no meta.json or a complete one
    except OSError as e:
        raise CheckpointWriteError(
            e.errno,
            f"cannot write the checkpoint to {str(d)!r}: {e.strerror or e}; the checkpoints written before are intact",
        ) from e


def read_meta(directory: str | os.PathLike, *, verify: bool = True) -> CheckpointMeta:
    """The checkpoint's meta; with ``verify``, ValueError naming the file unless every recorded file has its size
    and sha256."""
    d = Path(directory)
    meta = CheckpointMeta.from_json((d / META_FILE).read_text())
    for name, want in (meta.files or {}).items() if verify else ():
        path = d / name
        if not path.is_file() or path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise ValueError(
                f"checkpoint file {str(path)!r} is missing, truncated or modified (its size or sha256 differs "
                "from meta.json); resubmit to continue from the previous complete checkpoint"
            )
    return meta


def _incomplete(fs: Any, path: str, meta: CheckpointMeta) -> str | None:
    """Why the checkpoint at ``path`` (on ``fs``) is incomplete, by the file sizes recorded in its meta; or None."""
    import pyarrow.fs as pafs

    for name, want in (meta.files or {}).items():
        info = fs.get_file_info(f"{path}/{name}")
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != want["bytes"]:
            return f"{name} has {info.size} bytes, {want['bytes']} were written"
    return None


def load_model_weights(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    state = load_file(str(Path(directory) / "model.safetensors"))
    model.load_state_dict(state, strict=True)


def load_training_state(
    directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    extra = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    if scaler is not None and extra.get("scaler") is not None:
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["torch_rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])


def latest_checkpoint(
    storage_path: str, run_name: str, s3_endpoint: str | None
) -> tuple[str, Any, CheckpointMeta] | None:
    """The newest complete checkpoint of run ``run_name`` under ``storage_path``: ``(path on its filesystem,
    pyarrow filesystem, meta)``, or None. A step folder without a readable ``meta.json``, or whose files do not
    have the sizes it records (an interrupted upload, a full disk), is passed over for the one before, with a
    warning naming it."""
    import pyarrow.fs as pafs

    from mae_service.data.storage import filesystem_for

    fs, root = filesystem_for(storage_path, s3_endpoint=s3_endpoint)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return None
    steps = sorted(
        (i.path for i in infos if i.type == pafs.FileType.Directory and STEP_DIR.match(i.base_name)), reverse=True
    )
    for path in steps:
        try:
            with fs.open_input_stream(f"{path}/{META_FILE}") as f:
                meta = CheckpointMeta.from_json(f.read().decode())
            problem = _incomplete(fs, path, meta)
        except FileNotFoundError:
            problem = f"no {META_FILE} (the checkpoint was not finished)"
        except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON, or not a checkpoint meta
            problem = f"{META_FILE} is unreadable ({e})"
        if problem is None:
            return path, fs, meta
        logger.warning("skipping incomplete checkpoint %s: %s; trying the one before", path, problem)
    return None


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's list of a run's reported checkpoints, in the run folder. Ray Train rewrites it in place after each
checkpoint, so a full disk (or a kill mid-write) can leave it empty or cut short, and Ray Train then refuses to
start the run again (``CheckpointManagerInitializationError``)."""


def drop_broken_run_state(fs: Any, run_dir: str) -> bool:
    """Remove Ray Train's checkpoint list in ``run_dir`` (on ``fs``) when it is not readable JSON, with a warning;
    True when it did. Nothing is lost: a resubmit continues from :func:`latest_checkpoint`, which reads the step
    folders themselves."""
    import pyarrow.fs as pafs

    path = f"{run_dir.rstrip('/')}/{RAY_TRAIN_SNAPSHOT}"
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return False
        with fs.open_input_stream(path) as f:
            json.loads(f.read().decode())
        return False
    except (ValueError, UnicodeDecodeError) as e:  # empty or cut short (a full disk): json's ValueError
        logger.warning(
            "Ray Train's checkpoint list %s is unreadable (%s), probably cut short by a full disk: removed; the run "
            "continues from its latest complete checkpoint",
            path,
            e,
        )
        fs.delete_file(path)
        return True


_STORAGE_ERRORS = re.compile(
    r"No space left on device|Read-only file system|Permission denied|Operation not permitted|Disk quota exceeded"
    r"|AccessDenied"
)
_DATA_SOURCE = re.compile(r"data source '(s3a?://[^']+)': ([^\n]+)")
_S3_OBJECT = re.compile(r"key '([^']*)' in bucket '([^']+)'")


def _texts(error: BaseException) -> list[str]:
    """The messages of ``error`` and of the chain of its causes (with what Ray kept of a worker's error)."""
    seen: set[int] = set()
    texts: list[str] = []
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        texts.append(str(e))
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        # Ray Train's WorkerGroupError and ControllerError keep the ranks' and the controller's own errors
        todo += [c for c in (getattr(e, "worker_failures", None) or {}).values() if isinstance(c, BaseException)]
        if isinstance(failure := getattr(e, "controller_failure", None), BaseException):
            todo.append(failure)
    return texts


def store_unreachable(error: BaseException, storage_path: str, data_uri: str) -> str | None:
    """One line naming the ``s3://`` URI when ``error`` (e.g. Ray Train's, wrapping a worker's) is an S3 store that
    stopped answering (every attempt timed out, or the connection was refused or dropped): the data source
    ``data_uri`` when a data read failed so, else ``train.storage_path`` (a checkpoint upload, download or
    listing); None for other errors."""
    from mae_service.data.storage import S3_MAX_ATTEMPTS, S3_REQUEST_TIMEOUT_S, unreachable

    texts = _texts(error)
    why = next((w for t in texts if (w := unreachable(t))), None)
    if why is None:
        return None
    advice = "; check the S3 store (data.s3_endpoint or AWS_ENDPOINT_URL), then resubmit the same command: the run "
    advice += "continues from its last complete checkpoint"
    for t in texts:
        if (m := _DATA_SOURCE.search(t)) and unreachable(m.group(2)):
            return f"data.train_uri={m.group(1)!r}: the S3 store stopped answering ({m.group(2).strip()[:300]}){advice}"
    where = ""
    if (m := next((m for t in texts if (m := _S3_OBJECT.search(t))), None)) is not None:
        where = f" at s3://{m.group(2)}/{m.group(1)}"
        data = data_uri.removeprefix("s3a://").removeprefix("s3://").rstrip("/")
        if data_uri.startswith(("s3://", "s3a://")) and f"{m.group(2)}/{m.group(1)}".startswith(data + "/"):
            return f"data.train_uri={data_uri!r}: the S3 store stopped answering{where} ({why[:300]}){advice}"
    if not storage_path.startswith(("s3://", "s3a://")):
        return None
    return (
        f"train.storage_path={storage_path!r}: the S3 store stopped answering{where} ({why[:300]}; "
        f"{S3_MAX_ATTEMPTS} attempts of {S3_REQUEST_TIMEOUT_S:.0f} s){advice}"
    )


def storage_failure(error: BaseException, storage_path: str) -> str | None:
    """One line naming ``storage_path`` when ``error`` (e.g. Ray Train's, wrapping a worker's) is the storage
    refusing a write (full, read-only, no permission); None for other errors."""
    texts = _texts(error)
    m = next((m for t in texts if (m := _STORAGE_ERRORS.search(t))), None)
    if m is None:
        return None
    return (
        f"train.storage_path={storage_path!r}: writing a checkpoint failed ({m.group(0)}); free space or give a "
        "writable train.storage_path, then resubmit: the run continues from its last complete checkpoint"
    )


def checkpoint_uri(storage_path: str, fs_path: str | None) -> str | None:
    """A checkpoint's filesystem path in the user's URI form (``s3://…`` or a local path)."""
    if fs_path is None:
        return None
    if storage_path.startswith("s3://"):
        return "s3://" + fs_path.lstrip("/")
    return fs_path

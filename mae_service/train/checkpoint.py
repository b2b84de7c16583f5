"""Self-describing training checkpoints, written without pickle.

A checkpoint is a directory (uploaded by Ray Train to ``train.storage_path/<run_name>/step_XXXXXXXX``)::

    model.safetensors   MAE weights (the reference checkpoints' key names)
    state.pt            optimiser, AMP scaler and RNG states: tensors and plain containers only,
                        read back with ``torch.load(weights_only=True)``
    meta.json           step, rows consumed per rank, resolved config, model args, MLflow run id, last loss
    config.yaml         the resolved config the run used (credentials scrubbed), for people and for load_config

Writing and reading is pure (torch, safetensors, json); finding a run's latest checkpoint on its storage
(local or ``s3://``) uses pyarrow's filesystems through :mod:`mae_service.data.storage`.
"""

from __future__ import annotations

import json
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

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        return cls(**d)


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    meta: CheckpointMeta,
    config_yaml: str | None = None,
) -> None:
    d = Path(directory)
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
    (d / "meta.json").write_text(json.dumps(meta.__dict__, indent=1, default=str))  # last: marks it complete


def read_meta(directory: str | os.PathLike) -> CheckpointMeta:
    return CheckpointMeta.from_json((Path(directory) / "meta.json").read_text())


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
    pyarrow filesystem, meta)``, or None. A step folder without a readable ``meta.json`` (an interrupted upload)
    is passed over for the one before."""
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
            with fs.open_input_stream(f"{path}/meta.json") as f:
                return path, fs, CheckpointMeta.from_json(f.read().decode())
        except (OSError, FileNotFoundError):
            continue
    return None


def checkpoint_uri(storage_path: str, fs_path: str | None) -> str | None:
    """A checkpoint's filesystem path in the user's URI form (``s3://…`` or a local path)."""
    if fs_path is None:
        return None
    if storage_path.startswith("s3://"):
        return "s3://" + fs_path.lstrip("/")
    return fs_path

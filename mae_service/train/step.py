"""One optimiser step of MAE pretraining, and the step arithmetic: pure torch, no Ray, no MLflow.

How rows of each rank's stream map onto optimiser steps is computed once, here (:class:`StepPlan`), and used by
the driver (how many steps, where a resumed run's data starts), the worker loop and the sweep (ASHA's budget).
Every rank takes the same skip/step decision for a non-finite loss, so DDP never waits on a rank that has stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist

from mae_service.config import Config
from mae_service.model import create_model, normalize
from mae_service.model.precision import autocast, resolve_amp

if TYPE_CHECKING:
    from mae_service.model.mae import MaskedAutoencoder

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run rolls back to its last checkpoint (a Ray Train retry)."""


def model_kwargs(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    kw: dict[str, Any] = dict(
        img_size=cfg.data.image_size,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
    )
    if m.patch_size is not None:
        kw["patch_size"] = m.patch_size
    return kw


def build_model(cfg: Config) -> MaskedAutoencoder:
    return create_model(cfg.model.name, **model_kwargs(cfg))


def compile_model(model: torch.nn.Module, *, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` of the model as prepared for DDP: DDP first, then compile, as torch's DDP notes advise
    (dynamo's DDPOptimizer splits the graph at the gradient buckets, so their all-reduce still overlaps the
    backward). The compiled wrapper forwards attributes (``no_sync``); the bare module is what checkpoints save."""
    out = torch.compile(model, backend=backend)
    assert isinstance(out, torch.nn.Module)
    return out


def mask_noise(n: int, num_patches: int, *, seed: int, rank: int, step: int, micro: int) -> torch.Tensor:
    """Masking noise as a pure function of (seed, rank, step, micro-batch): a resumed run draws the same masks."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_009 + micro)
    return torch.rand(n, num_patches, generator=g)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@dataclass(frozen=True)
class StepPlan:
    """How rows of each rank's stream map onto optimiser steps (pure numbers; the one place they are computed)."""

    micro_batch: int
    accum: int
    steps_per_epoch: int
    epochs: int
    max_steps: int | None = None

    @classmethod
    def for_config(cls, cfg: Config, rows_per_rank: int) -> StepPlan:
        """The plan of ``cfg`` when each rank's stream holds ``rows_per_rank`` rows per epoch."""
        steps_per_epoch = rows_per_rank // cfg.micro_batch // cfg.accum_steps
        return cls(
            micro_batch=cfg.micro_batch,
            accum=cfg.accum_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps,
        )

    @property
    def rows_per_step(self) -> int:
        """Rows one rank consumes per optimiser step."""
        return self.micro_batch * self.accum

    @property
    def schedule_steps(self) -> int:
        """Steps of the full schedule (the cosine decay spans these, whatever ``max_steps`` cuts)."""
        return self.steps_per_epoch * self.epochs

    @property
    def total_steps(self) -> int:
        """Steps this run trains for."""
        return min(self.schedule_steps, self.max_steps) if self.max_steps else self.schedule_steps

    def warmup_steps(self, warmup_epochs: float) -> int:
        return int(round(warmup_epochs * self.steps_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return dict(
            micro_batch=self.micro_batch,
            accum=self.accum,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
            max_steps=self.max_steps,
        )


class StepResult(NamedTuple):
    loss: float  # mean over ranks of the step's loss (NaN when the step was skipped)
    skipped: bool  # some rank's loss was non-finite: every rank skipped the update
    sums: list[float]  # the caller's ``sums``, added over ranks


def optimizer_step(
    ddp_model: torch.nn.Module,
    core: MaskedAutoencoder,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[torch.Tensor],
    *,
    cfg: Config,
    device: torch.device,
    rank: int,
    step: int,
    sums: Sequence[float] = (),
) -> StepResult:
    """One optimiser step over ``micro_batches`` (uint8 images) with gradient accumulation, the forward passes
    under the autocast ``train.amp`` resolves to on ``device`` (:func:`mae_service.model.precision.resolve_amp`).

    One collective and one host synchronisation per step, whatever the accumulation: the losses stay on the
    device until the step's single all-reduce, which carries the loss, a non-finite flag and the caller's
    ``sums`` (bad rows, data-wait seconds). A non-finite loss on any rank makes every rank skip the update
    together: every rank still runs its backward passes (so DDP's gradient all-reduce is entered by all), and the
    decision is taken on the all-reduced flag, which is the same number on every rank.
    """
    accum = len(micro_batches)
    ddp = hasattr(ddp_model, "no_sync")  # DDP, possibly under torch.compile (which forwards attributes)
    amp = resolve_amp(cfg.train.amp, device)  # pure and cached: the worker resolved (and logged) the same
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for micro, images in enumerate(micro_batches):
        imgs = normalize(images.to(device, non_blocking=True))
        noise = mask_noise(imgs.shape[0], core.num_patches, seed=cfg.train.seed, rank=rank, step=step, micro=micro).to(
            device
        )
        sync = (not ddp) or micro == accum - 1
        with nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
            with autocast(amp, device):
                loss, _, _ = ddp_model(imgs, noise=noise)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float() / accum
    bad = (~torch.isfinite(loss_sum)).to(torch.float64)
    local = torch.cat(
        [
            torch.stack([torch.nan_to_num(loss_sum.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0), bad]),
            torch.tensor(list(sums), dtype=torch.float64).to(device),
        ]
    )
    totals = _all_reduce(local).tolist()  # the step's one host sync
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if totals[1] > 0:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), True, totals[2:])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals[0] / world, False, totals[2:])

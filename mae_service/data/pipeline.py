"""Ray Data datasets over a :class:`~mae_service.data.source.Source`: read → decode → crop → uint8 ``[3, H, W]``.

**Plan (driver, pure numpy).** Per epoch ``e`` the shard order is a permutation seeded by ``(seed, e)``; the
shards, in that order, form one stream of all items, and rank ``r`` takes the stream's slice
``[r·n, (r+1)·n)`` with ``n = samples_per_rank(...)``. So every rank gets exactly ``n`` rows per epoch, ranks
never overlap, and only the stream's tail (``N - world·n`` items, different ones each epoch) is dropped. A
shard cut by a rank boundary is read by both ranks, each its part. Within a shard the items are visited in a
permutation seeded by ``(seed, e, shard)``. A *unit* is ``(epoch, shard, a, b)``: positions ``a..b`` of that
permutation. A rank's dataset is its units for all epochs in order, a Ray Data task per few units, with
``preserve_order`` so rows come out in the planned order; ``start_sample`` drops whole units and trims one,
so resuming decodes nothing it skips.

**Tasks (workers).** A unit's objects are fetched together by its format's reader (:mod:`mae_service.data.formats`;
loose files: concurrent GETs on a thread pool, one request per object on S3, decoded in order as they arrive; a tar
or Parquet row group: one read), decoded and
cropped with an RNG seeded by ``(seed, epoch, item id)``. A bad object is logged with its key and replaced by the
next good item of the same shard's permutation (cropped with the original item's RNG), so row counts stay exact;
``n_bad`` says how many were replaced for each row. A shard without any good item is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from mae_service.data import formats
from mae_service.data.decode import BadImageError, center_crop, item_rng, open_image, random_resized_crop
from mae_service.data.source import Source, samples_per_rank
from mae_service.data.storage import filesystem_for

logger = logging.getLogger(__name__)

CHUNK_ROWS = 32
"""Rows per block a task yields (keeps blocks small and streaming)."""
MIN_TASK_ROWS = 512
"""Consecutive units are grouped so a Ray Data task decodes at least this many rows: dispatching a task costs
~0.1-0.2 s of scheduling latency on a busy node, which short tasks cannot amortise."""
_SHARD_SALT, _ITEM_SALT = 0x5348, 0x4954
DECODE_DEVICES = ("cpu", "cuda")
"""``cpu``: the Ray Data tasks decode and crop; ``cuda``: they fetch bytes, the training workers decode them."""


# ---- planning (driver) --------------------------------------------------------------------------------------
def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, _SHARD_SALT]).permutation(num_shards)


def item_order(seed: int, epoch: int, shard_index: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, shard_index, _ITEM_SALT]).permutation(count)


def plan_epoch(
    counts: np.ndarray, seed: int, epoch: int, rank: int, world_size: int, per_rank: int
) -> list[tuple[int, int, int, int]]:
    """Units ``(epoch, shard, a, b)`` of one rank for one epoch, in order; their sizes sum to ``per_rank``."""
    order = shard_order(seed, epoch, len(counts))
    c = counts[order]
    ends = np.cumsum(c)
    starts = ends - c
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    units = []
    for j in np.nonzero((ends > lo) & (starts < hi))[0]:
        a, b = max(lo - starts[j], 0), min(hi - starts[j], c[j])
        units.append((epoch, int(order[j]), int(a), int(b)))
    return units


def plan_rank(
    counts: np.ndarray, *, seed: int, rank: int, world_size: int, per_rank: int, epochs: int, start_sample: int = 0
) -> np.ndarray:
    """All units of one rank over ``epochs`` epochs, skipping the first ``start_sample`` rows; int64 ``[U, 4]``."""
    total = per_rank * epochs
    if not 0 <= start_sample <= total:
        raise ValueError(
            f"start_sample={start_sample}: must be between 0 and {total} (= {epochs} epochs × "
            f"{per_rank} samples per rank)"
        )
    first_epoch, skip = divmod(start_sample, per_rank)
    units: list[tuple[int, int, int, int]] = []
    for e in range(first_epoch, epochs):
        for ep, s, a, b in plan_epoch(counts, seed, e, rank, world_size, per_rank):
            if skip >= b - a:
                skip -= b - a
                continue
            units.append((ep, s, a + skip, b))
            skip = 0
    return np.asarray(units, dtype=np.int64).reshape(-1, 4)


# ---- reading (workers) --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What a decode task needs; shipped to the workers once with the map function.

    ``src`` holds only the shards the units read (so a rank's job is ~1/world of the listing for one epoch):
    ``units[:, 1]`` indexes ``src.shards``, and ``shard_ids`` maps that back to the shard's index in the listing,
    which seeds its item order."""

    src: Source
    units: np.ndarray
    shard_ids: np.ndarray
    seed: int
    image_size: int
    train: bool
    raw: bool = False
    """Yield the encoded bytes (column ``data``, with ``item_id`` for the crop's RNG) instead of decoded crops: the
    training workers decode them on their GPUs (``data.decode_device=cuda``). Headers are still checked here."""


@functools.lru_cache(maxsize=8)
def _filesystem(uri: str, s3_endpoint: str | None) -> pafs.FileSystem:
    return filesystem_for(uri, s3_endpoint)[0]


def _decode(job: _Job, data: bytes, epoch: int, item_id: int) -> np.ndarray | bytes:
    if job.raw:
        open_image(data)  # header only: empty, unknown and oversized objects are replaced here, as when decoding
        return data
    if job.train:
        return random_resized_crop(data, job.image_size, item_rng(job.seed, epoch, item_id))
    return center_crop(data, job.image_size)


def _process_unit(job: _Job, fs: pafs.FileSystem, uid: int) -> Iterator[dict[str, np.ndarray]]:
    epoch, local, a, b = (int(v) for v in job.units[uid])
    shard, si = job.src.shards[local], int(job.shard_ids[local])
    order = item_order(job.seed, epoch, si, shard.count) if job.train else np.arange(shard.count)
    positions = order[a:b]
    reader = formats.get(job.src.fmt).reader(job.src, fs, shard)
    n, size = len(positions), job.image_size
    bad: set[int] = set()
    rows = 0
    chunk = min(n, CHUNK_ROWS)
    images = np.empty(chunk, object) if job.raw else np.empty((chunk, 3, size, size), np.uint8)
    labels = np.empty(chunk, np.int64)
    n_bad = np.zeros(chunk, np.int64)
    ids = np.empty(chunk, np.int64)
    for k, fut in enumerate(reader.iter(positions)):
        pos = int(positions[k])
        item_id = shard.item_id(pos)
        replaced, cursor = 0, a + k
        while True:
            try:
                data, label = fut.result()
                img = _decode(job, data, epoch, item_id)
                break
            except BadImageError as e:
                bad.add(pos)
                replaced += 1
                logger.warning(
                    "bad image %s skipped (%s); replacing it with another item of the same shard", reader.name(pos), e
                )
                while True:  # next item of this shard's order that is not known to be bad
                    cursor += 1
                    if cursor - (a + k) >= shard.count:
                        raise RuntimeError(
                            f"shard {shard.name()} of {job.src.uri!r} holds no decodable image "
                            f"({len(bad)} bad, e.g. {reader.name(next(iter(bad)))})"
                        ) from None
                    pos = int(order[cursor % shard.count])
                    if pos not in bad:
                        break
                fut = Future()
                try:
                    fut.set_result(reader.get(pos))
                except BadImageError as read_error:
                    fut.set_exception(read_error)
        j = rows % len(images)
        images[j], labels[j], n_bad[j], ids[j] = img, label, replaced, item_id
        rows += 1
        if j == len(images) - 1 or rows == n:
            m = j + 1
            out: dict[str, np.ndarray] = {"data" if job.raw else "image": images[:m].copy(), "label": labels[:m].copy()}
            if job.raw:
                out["item_id"] = ids[:m].copy()
            if job.train:
                out["epoch"] = np.full(m, epoch, np.int64)
                out["n_bad"] = n_bad[:m].copy()
            n_bad[:] = 0
            yield out


def _run_units(batch: dict[str, np.ndarray], job: _Job) -> Iterator[dict[str, np.ndarray]]:
    fs = _filesystem(job.src.uri, job.src.s3_endpoint)
    for uid in batch["id"]:
        yield from _process_unit(job, fs, int(uid))


# ---- datasets -----------------------------------------------------------------------------------------------
def _job(src: Source, units: np.ndarray, *, seed: int, image_size: int, train: bool, raw: bool = False) -> _Job:
    """The job of ``units``, carrying only the shards they read."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: must be ≥ 1")
    shard_ids, local = np.unique(units[:, 1], return_inverse=True)
    units = units.copy()
    units[:, 1] = local.reshape(-1)
    return _Job(
        src=dataclasses.replace(src, shards=[src.shards[int(i)] for i in shard_ids]),
        units=units,
        shard_ids=shard_ids,
        seed=int(seed),
        image_size=int(image_size),
        train=train,
        raw=raw,
    )


def _empty(job: _Job):
    import ray.data

    s = job.image_size
    cols = {"image": np.zeros((0, 3, s, s), np.uint8), "label": np.zeros(0, np.int64)}
    if job.raw:
        cols = {"data": np.empty(0, object), "label": np.zeros(0, np.int64), "item_id": np.zeros(0, np.int64)}
    if job.train:
        cols.update(epoch=np.zeros(0, np.int64), n_bad=np.zeros(0, np.int64))
    return ray.data.range(1).map_batches(lambda _: cols, batch_format="numpy")


def _dataset(job: _Job, decode_cpus: float, max_tasks: int | None = None):
    """Tasks of ≥ MIN_TASK_ROWS rows (whole units), rows in unit order; at most ``max_tasks`` at once."""
    import ray.data

    n = len(job.units)
    if n == 0:
        ds = _empty(job)
    else:
        rows = int((job.units[:, 3] - job.units[:, 2]).sum())
        per_task = max(1, MIN_TASK_ROWS * n // max(rows, 1))  # units per task
        ds = ray.data.range(n, override_num_blocks=-(-n // per_task)).map_batches(
            _run_units,  # type: ignore[arg-type]  # gets job= through fn_kwargs
            fn_kwargs={"job": job},
            batch_size=None,
            batch_format="numpy",
            num_cpus=decode_cpus,
            zero_copy_batch=True,
            compute=ray.data.TaskPoolStrategy(size=max_tasks) if max_tasks else None,
        )
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.execution_options.preserve_order = True
    # One block per yielded chunk (the default 128 MiB would hold a whole unit back until it is done).
    ctx.target_max_block_size = max(1 << 20, CHUNK_ROWS * 3 * job.image_size**2)
    from mae_service.data.idle_backoff import IdleBackoff  # imports Ray Data internals: only when Ray is in use

    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleBackoff]
    return ds


def ingest_options():
    """Ray Data execution options that keep the planned row order (for ``ray.train.DataConfig``)."""
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


def decode_tasks_per_rank(cluster_cpus: float, *, num_workers: int, cpus_per_worker: float, decode_cpus: float) -> int:
    """How many decode tasks each rank's stream may start at once: its equal part of the CPUs training leaves free,
    less one task's worth of headroom (at least one task).

    Each rank's dataset runs its own streaming executor, and each would otherwise size its task pool to every CPU
    that training leaves free. A decode task paused by backpressure (its rank's consumer is behind) keeps its CPU,
    and a task the executor has finished with can still hold its CPU for a while as the next one starts, so one
    rank's read-ahead can hold every CPU while another rank's next task waits for one, and that rank's training
    step, and through DDP every rank's, waits with it. Seen here: the demo (2 workers, 4 logical CPUs, 36 epochs)
    ran its first ~44 steps at ~230 img/s, then a task sat PENDING_NODE_ASSIGNMENT behind two running ones
    submitted by the other rank, and training crawled at ~8 img/s. The local Ray is sized for this
    (:func:`local_cpus_needed`)."""
    free = cluster_cpus - num_workers * cpus_per_worker
    return max(1, int(free / max(num_workers, 1) / decode_cpus + 1e-9) - 1)


def local_cpus_needed(*, num_workers: int, cpus_per_worker: float, decode_cpus: float) -> float:
    """Logical CPUs a local Ray needs so that no rank's decode tasks ever wait for a CPU: the workers', two decode
    tasks per rank (one running, one starting as it ends; :func:`decode_tasks_per_rank`), and one spare."""
    return num_workers * (cpus_per_worker + 2 * decode_cpus) + 1


def train_dataset(
    src: Source,
    *,
    rank: int,
    world_size: int,
    image_size: int,
    seed: int,
    batch_size: int,
    epochs: int,
    start_sample: int = 0,
    decode_cpus: float = 1.0,
    decode_device: str = "cpu",
    max_tasks: int | None = None,
):
    """This rank's training stream over all ``epochs``: columns ``image`` (uint8 ``[3, S, S]``), ``label``,
    ``epoch``, ``n_bad`` (int64); exactly ``samples_per_rank(src, world_size, batch_size)`` rows per epoch.

    Deterministic in ``seed``: same rows, same order, same crops, whichever workers decode them. Rows
    ``0..start_sample-1`` of the stream are skipped without being read.

    ``decode_device="cuda"``: the tasks only fetch (and check the headers of) the objects; columns ``data``
    (encoded bytes), ``item_id``, ``label``, ``epoch``, ``n_bad``, for ``mae_service.train.device_decode``.
    """
    job = train_job(
        src,
        rank=rank,
        world_size=world_size,
        image_size=image_size,
        seed=seed,
        batch_size=batch_size,
        epochs=epochs,
        start_sample=start_sample,
        decode_device=decode_device,
    )
    return _dataset(job, decode_cpus, max_tasks)


def train_job(
    src: Source,
    *,
    rank: int,
    world_size: int,
    image_size: int,
    seed: int,
    batch_size: int,
    epochs: int,
    start_sample: int = 0,
    decode_device: str = "cpu",
) -> _Job:
    """What :func:`train_dataset` ships to its decode tasks (no Ray): the rank's units and the shards they read."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: must be ≥ 1")
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"decode_device={decode_device!r}: allowed {', '.join(DECODE_DEVICES)}")
    per_rank = samples_per_rank(src, world_size, batch_size)
    counts = np.array([s.count for s in src.shards], np.int64)
    units = plan_rank(
        counts, seed=seed, rank=rank, world_size=world_size, per_rank=per_rank, epochs=epochs, start_sample=start_sample
    )
    return _job(src, units, seed=seed, image_size=image_size, train=True, raw=decode_device != "cpu")


def job_keys(job: _Job) -> list[str]:
    """The names of the items a job reads, in its order (for tests and benchmarks; no reads)."""
    out: list[str] = []
    for epoch, local, a, b in job.units:
        shard, si = job.src.shards[int(local)], int(job.shard_ids[int(local)])
        order = item_order(job.seed, int(epoch), si, shard.count) if job.train else np.arange(shard.count)
        out.extend(shard.name(int(p)) for p in order[a:b])
    return out


def eval_dataset(src: Source, *, image_size: int, decode_cpus: float = 1.0):
    """Every image once, in a fixed order (shard by shard): shorter side resized to ``image_size`` (bicubic),
    centre crop; columns ``image`` (uint8 ``[3, S, S]``) and ``label``. Bad objects are replaced as in training."""
    units = np.array([(0, i, 0, s.count) for i, s in enumerate(src.shards)], np.int64).reshape(-1, 4)
    return _dataset(_job(src, units, seed=0, image_size=image_size, train=False), decode_cpus)

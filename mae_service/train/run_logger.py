"""Rank 0's link to the run's MLflow record: metrics, reconstruction pictures, tags and system metrics.

Training never waits on tracking. The training thread only *enqueues* records (a metric batch, a PNG, a tag);
one background thread (:class:`_Sender`) delivers them in order, with bounded HTTP attempts (MLflow's own
``MLFLOW_HTTP_REQUEST_*`` settings, given defaults in the worker process when the user set none). While the
tracking store does not answer, records stay with the sender and are retried with back-off, so when it
returns every metric arrives (no gaps in ``loss``). The queue is bounded: a record that finds it full is set
aside for the spool instead of blocking the step, and sent after the queue drains.

:meth:`RunLogger.flush` runs before every checkpoint: it waits a bounded time (less when a delivery attempt made
after it began fails) and writes whatever is still undelivered to the run's spool beside its checkpoints
(:mod:`mae_service.train.spool`), so a resubmit replays it (:func:`replay_spool`) even if this process dies.
System metrics (CPU, memory, disk, network, GPU) are sampled by MLflow's monitors on a thread of their own,
every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10), logged at the current training step
through the same queue, and once more at :meth:`RunLogger.close`: every run that asks for them has some.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from mae_service.train.spool import Spool, SpoolError

if TYPE_CHECKING:
    from mae_service.model.mae import MaskedAutoencoder

logger = logging.getLogger(__name__)

HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # MLflow's default is 7 retries with back-off 2: minutes per request
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",  # seconds per request (default 120); a hung server costs at most this
}
"""MLflow's HTTP settings for rank 0's process (and the driver's end-of-run calls) when the user set none: one
request is bounded to about ``2 × 20 s``; retrying beyond that is the sender's job, not the training step's."""
FLUSH_TIMEOUT_S = 10.0
QUEUE_CAPACITY = 10_000
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
RETRY_MIN_S, RETRY_MAX_S = 2.0, 30.0


def bound_http_requests(environ: Any = None) -> None:
    """Give MLflow's HTTP settings (:data:`HTTP_DEFAULTS`) their bounded defaults where the user set none."""
    env = os.environ if environ is None else environ
    for key, value in HTTP_DEFAULTS.items():
        env.setdefault(key, value)


@contextmanager
def bounded_http() -> Iterator[None]:
    """:data:`HTTP_DEFAULTS` for the calls inside (where the user set none), then the environment as it was."""
    added = [k for k in HTTP_DEFAULTS if k not in os.environ]
    bound_http_requests()
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# ---- records and their delivery -----------------------------------------------------------------------------
def metrics_record(run_id: str, values: dict[str, float], step: int, ts: int | None = None) -> dict[str, Any]:
    ts = int(time.time() * 1000) if ts is None else ts
    return {"kind": "metrics", "run_id": run_id, "step": int(step), "ts": ts, "values": {k: float(v) for k, v in values.items()}}  # fmt: skip


def tag_record(run_id: str, key: str, value: str) -> dict[str, Any]:
    return {"kind": "tag", "run_id": run_id, "key": key, "value": str(value)}


def picture_record(run_id: str, path: str, png: bytes) -> dict[str, Any]:
    return {"kind": "picture", "run_id": run_id, "path": path, "png": base64.b64encode(png).decode()}


def is_transient(error: BaseException) -> bool:
    """Whether a failed delivery may succeed later (the store unreachable, timing out, overloaded or refusing the
    credentials), rather than the record being refused for good (a bad value, a deleted run)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return not 400 <= status < 500 or status in (401, 403, 408, 429)
    return True  # connection errors, HTTP errors of artifact uploads, OSError …


def _chunks(records: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive metric records of one run joined up to MLflow's batch limit; every other record alone."""
    i = 0
    while i < len(records):
        chunk, n = [records[i]], len(records[i].get("values", ()))
        i += 1
        if chunk[0]["kind"] == "metrics":
            while (
                i < len(records)
                and records[i]["kind"] == "metrics"
                and records[i]["run_id"] == chunk[0]["run_id"]
                and n + len(records[i]["values"]) <= MAX_METRICS_PER_BATCH
            ):
                n += len(records[i]["values"])
                chunk.append(records[i])
                i += 1
        yield chunk


def _send_chunk(client: Any, chunk: list[dict[str, Any]]) -> None:
    import tempfile

    from mlflow.entities import Metric

    first = chunk[0]
    if first["kind"] == "metrics":
        batch = [Metric(k, v, r["ts"], r["step"]) for r in chunk for k, v in r["values"].items()]
        if batch:
            client.log_batch(first["run_id"], metrics=batch, synchronous=True)
    elif first["kind"] == "tag":
        client.set_tag(first["run_id"], first["key"], first["value"], synchronous=True)
    elif first["kind"] == "picture":
        folder, _, name = first["path"].rpartition("/")
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, name)
            with open(local, "wb") as f:
                f.write(base64.b64decode(first["png"]))
            client.log_artifact(first["run_id"], local, artifact_path=folder or None)


def send(client: Any, chunk: list[dict[str, Any]]) -> int:
    """Deliver ``chunk`` (from :func:`_chunks`); returns how many records were refused for good (dropped, with a
    warning). Raises the error when the failure is :func:`transient <is_transient>`: nothing is dropped then."""
    try:
        _send_chunk(client, chunk)
        return 0
    except Exception as e:  # noqa: BLE001 - sorted below: transient (kept) or refused (dropped)
        if is_transient(e):
            raise
        if len(chunk) > 1:  # find the refused record; deliver the others
            return sum(send(client, [r]) for r in chunk)
        rec = chunk[0]
        logger.warning("MLflow refused a %s record (step %s), dropped: %s", rec["kind"], rec.get("step", "-"), e)
        return 1


def deliver_all(client: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deliver ``records`` in order; returns those left when a transient failure stopped it (empty: all sent)."""
    done = 0
    for chunk in _chunks(records):
        try:
            send(client, chunk)
        except Exception as e:  # noqa: BLE001 - transient: the rest waits
            logger.warning("MLflow unreachable, %d records not delivered: %s", len(records) - done, e)
            return records[done:]
        done += len(chunk)
    return []


# ---- the background sender ------------------------------------------------------------------------------------
class _Sender:
    """One thread delivering queued records in order. ``put`` never blocks on the network."""

    def __init__(self, client: Any, *, capacity: int = QUEUE_CAPACITY, where: str = ""):
        self._client = client
        self._where = where
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._capacity = capacity
        self._spilled: list[dict[str, Any]] = []  # found the queue full: for the spool, sent after the queue
        self._backlog: list[dict[str, Any]] = []  # taken by the thread, not delivered yet (mutated by it only)
        self._failed = 0  # the latest delivery attempt that failed
        self._online = True
        self._retry_s = RETRY_MIN_S
        self._next_try = 0.0
        self._kick = False
        self._closing = False
        self._attempt = 0  # delivery attempts started
        self._in_flight = False
        self._stuck = -1  # the attempt a flush already timed out on (a hung server): later flushes do not wait
        self.delivered = 0
        self.spilled = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) < self._capacity:
                self._queue.append(record)
            else:
                if not self.spilled:
                    logger.warning("MLflow queue full (%d records): further records go to the spool", self._capacity)
                self._spilled.append(record)
                self.spilled += 1
            self._cond.notify_all()

    def undelivered(self) -> list[dict[str, Any]]:
        """Everything not known to be delivered (the record in flight included)."""
        with self._cond:
            return [*self._backlog, *self._queue, *self._spilled]

    def flush(self, timeout: float, *, patient: bool = False) -> list[dict[str, Any]]:
        """Wait until everything queued is delivered, a delivery attempt begun after this call fails, or
        ``timeout`` s pass; returns what is still undelivered. Unless ``patient`` (the last flush), no wait while
        the attempt an earlier flush timed out on is still hanging."""
        deadline = time.monotonic() + timeout
        with self._cond:
            started = self._attempt  # an attempt in flight now does not count: it may have begun before a fault
            self._kick = True
            self._cond.notify_all()
            while (self._queue or self._spilled or self._backlog) and self._failed <= started:
                if self._in_flight and self._attempt == self._stuck and not patient:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    if self._in_flight:
                        self._stuck = self._attempt
                    break
                self._cond.wait(left)
        return self.undelivered()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)  # a request in flight may outlive this (bounded by MLflow's HTTP settings)

    def _take(self) -> bool:
        """Under the lock: wait until there is something to deliver now; False when closing."""
        while True:
            self._backlog.extend(self._queue)
            self._queue.clear()
            self._backlog.extend(self._spilled)
            self._spilled.clear()
            if self._closing:
                return False
            now = time.monotonic()
            if self._backlog and (self._online or self._kick or now >= self._next_try):
                self._kick = False
                return True
            self._cond.wait(None if not self._backlog else max(0.05, self._next_try - now))

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._take():
                    return
                chunk = next(_chunks(self._backlog))
                self._attempt += 1
                self._in_flight = True
            try:
                send(self._client, chunk)
            except Exception as e:  # noqa: BLE001 - transient: keep everything, try again later
                with self._cond:
                    self._in_flight = False
                    if self._online:
                        logger.warning(
                            "MLflow %s unreachable (%s): %d records held, retried in the background",
                            self._where,
                            _short(e),
                            len(self._backlog),
                        )
                    self._online = False
                    self._failed = self._attempt
                    self._next_try = time.monotonic() + self._retry_s
                    self._retry_s = min(2 * self._retry_s, RETRY_MAX_S)
                    self._cond.notify_all()
                continue
            with self._cond:
                self._in_flight = False
                del self._backlog[: len(chunk)]
                self.delivered += len(chunk)
                if not self._online:
                    logger.warning(
                        "MLflow %s answers again: sending the %d records held", self._where, len(self._backlog)
                    )
                self._online, self._retry_s = True, RETRY_MIN_S
                self._cond.notify_all()


def _short(e: BaseException, limit: int = 300) -> str:
    from mae_service.config.secrets import redact

    text = redact(str(e).replace("\n", " "))
    return text if len(text) <= limit else text[:limit] + "…"


# ---- system metrics -------------------------------------------------------------------------------------------
class _SystemSampler:
    """MLflow's system-metrics monitors sampled on a thread; each aggregate goes to ``emit`` (and one more at
    :meth:`close`, so a run shorter than the sampling interval still has a sample)."""

    def __init__(self, run_id: str, tracking_uri: str, emit: Any):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._mon = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)  # builds the monitors; no request
        self._prefix = "system/" + (f"{self._mon.node_id}/" if self._mon.node_id else "")
        self._emit = emit
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._mon.sampling_interval):
            with self._lock:
                self._mon.collect_metrics()
                n += 1
                if n >= self._mon.samples_before_logging:
                    self._publish()
                    n = 0

    def _publish(self) -> None:
        values = self._mon.aggregate_metrics()
        for monitor in self._mon.monitors:
            monitor.clear_metrics()
        if values:
            self._emit({self._prefix + k: v for k, v in values.items()})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        with self._lock:
            self._mon.collect_metrics()
            self._publish()


# ---- rank 0's logger ------------------------------------------------------------------------------------------
class RunLogger:
    """Logs into MLflow run ``run_id`` at ``tracking_uri`` (rank 0 only; other ranks hold no logger).

    ``spool``: where undelivered records are kept between checkpoints (None: in memory only). Records already in
    it (a previous rank 0 of this run was restarted) are sent first. ``recorded_through``: the last step already
    in MLflow (an interrupted submission of the run got that far; -1: none): metrics of steps up to it are not sent
    again."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        system_metrics: bool,
        spool: Spool | None = None,
        flush_timeout: float = FLUSH_TIMEOUT_S,
        recorded_through: int = -1,
    ):
        bound_http_requests()  # this process is a Ray Train worker: its MLflow requests are all ours
        import mlflow

        from mae_service.tracking.runs import sanitize_uri

        mlflow.set_tracking_uri(tracking_uri)
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri)
        self._spool, self._spooled = spool, False
        self.flush_timeout = flush_timeout
        self._step = 0
        self.recorded_through = recorded_through
        self._sender = _Sender(self.client, where=f"tracking server {sanitize_uri(tracking_uri)}")
        if spool is not None:
            try:
                held = spool.read()
            except SpoolError as e:
                logger.warning("%s; its records stay there for the next resubmit", e)
                held = []
            for rec in held:
                self._sender.put(rec)
            self._spooled = bool(held)
        self._system: _SystemSampler | None = None
        if system_metrics:
            try:
                self._system = _SystemSampler(run_id, tracking_uri, lambda v: self.metrics(v, self._step))
            except Exception as e:  # noqa: BLE001 - system metrics are a nicety; never fail a run for them
                logger.warning("system metrics disabled: %s", e)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Queue ``values`` at ``step`` (sent in the background; not when ``step`` is already recorded)."""
        self._step = max(self._step, step)
        if step <= self.recorded_through:
            return
        self._sender.put(metrics_record(self.run_id, values, step))

    def tag(self, key: str, value: str) -> None:
        """Queue tag ``key`` for the run."""
        self._sender.put(tag_record(self.run_id, key, value))

    def picture(
        self, model: MaskedAutoencoder, images: torch.Tensor, step: int, *, seed: int, dtype: torch.dtype | None = None
    ) -> None:
        """Queue the reconstruction grid of ``images`` (uint8), computed under autocast ``dtype`` (None: fp32), as
        ``reconstructions/step_XXXXXXXX.png``."""
        from mae_service.model.pictures import reconstruction_grid

        try:
            grid = reconstruction_grid(model, images, seed=seed, dtype=dtype)
            buf = io.BytesIO()
            grid.save(buf, format="PNG")
        except Exception as e:  # noqa: BLE001 - a picture must not kill training
            logger.warning("reconstruction picture at step %d not made: %s", step, e)
            return
        self._sender.put(picture_record(self.run_id, f"reconstructions/step_{step:08d}.png", buf.getvalue()))

    def flush(self, *, last: bool = False) -> int:
        """Wait (at most the flush timeout) for the queued records; write what is left to the spool (or delete the
        spool when nothing is). Returns how many records are undelivered. ``last``: the end of training, when a
        request still hanging from an earlier checkpoint is waited for too (up to the timeout)."""
        left = self._sender.flush(self.flush_timeout, patient=last)
        if self._spool is None:
            if left:
                logger.warning("%d MLflow records not delivered yet (held in memory, retried)", len(left))
            return len(left)
        try:
            if left:
                self._spool.write(left)
                self._spooled = True
                logger.warning(
                    "%d MLflow records not delivered yet: kept in %s (sent when the server answers, or by a "
                    "resubmit of the same command)",
                    len(left),
                    self._spool.uri,
                )
            elif self._spooled:
                self._spool.clear()
                self._spooled = False
        except SpoolError as e:
            logger.warning("%s; the records are still held in memory and retried", e)
        return len(left)

    def close(self) -> int:
        """The last system-metrics sample, a final flush, and the sender stopped; returns the records left (in the
        spool when there is one)."""
        if self._system is not None:
            try:
                self._system.close()
            except Exception as e:  # noqa: BLE001
                logger.warning("last system-metrics sample not taken: %s", e)
        left = self.flush(last=True)
        self._sender.close()
        if left and self._spool is None:
            logger.warning("%d MLflow records could not be delivered and are lost", left)
        return left


# ---- the driver's side: replaying a spool --------------------------------------------------------------------
def replay_spool(spool: Spool, tracking_uri: str) -> int:
    """Send the records of ``spool`` to the tracking store at ``tracking_uri``, then delete it; returns how many
    were sent. When the store stops answering, the spool is rewritten with what is left and
    :class:`~mae_service.tracking.runs.TrackingUnavailableError` names it."""
    import mlflow

    from mae_service.tracking.runs import TrackingUnavailableError, sanitize_uri

    records = spool.read()
    if not records:
        return 0
    with bounded_http():
        left = deliver_all(mlflow.MlflowClient(tracking_uri), records)
    if left:
        spool.write(left)
        raise TrackingUnavailableError(
            f"MLflow tracking server {sanitize_uri(tracking_uri)} stopped answering while {len(records)} spooled "
            f"records were replayed; {len(left)} are kept in {spool.uri}: resubmit the same command to finish the "
            "MLflow record"
        )
    spool.clear()
    logger.info("replayed %d MLflow records from %s", len(records), spool.uri)
    return len(records)

"""A Ray Data execution callback that keeps a scheduling loop with nothing to do from spinning (:class:`IdleBackoff`).

Owns: :class:`IdleBackoff`, registered on every dataset :mod:`mae_service.data.pipeline` builds. Imports Ray Data
internals at import time, so only the pipeline imports it, lazily.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback


class IdleBackoff(ExecutionCallback):
    """After a scheduling step that returned at once, pause :attr:`PAUSE_S` before the next.

    Ray Data's scheduling loop (Ray 2.60) blocks in ``ray.wait`` (up to 0.1 s) for task output, but when a task's
    output is ready and the consumer is behind (no output budget), ``ray.wait`` returns at once, nothing is read, and
    the loop goes round again without a pause: that thread takes a whole core, and the GIL, from the training step in
    the same worker process. Seen here, 2 workers on 2 cores: one rank's executor thread had used 10 of its 11
    minutes on CPU. A step that waited in ``ray.wait`` takes longer than :attr:`FAST_S` and is never paused; a pause of
    a few milliseconds between empty rounds costs the stream nothing (a batch of decoded rows lasts much longer)."""

    FAST_S = 0.02
    PAUSE_S = 0.01

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if now - self._last < self.FAST_S:
            time.sleep(self.PAUSE_S)
        self._last = time.perf_counter()

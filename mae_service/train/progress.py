"""One progress bar on the driver for the steps rank 0 trains: step, loss, img/s, ETA.

The workers' own output is hidden unless ``-v`` (:func:`mae_service.runtime.quiet_output`), so rank 0 posts each
step to a small Ray actor (:class:`Board`, a fire-and-forget call) and a thread of the driver draws the bar from
it while ``trainer.fit()`` runs. At a terminal the bar redraws in place; elsewhere (a Ray job's log, CI) it prints
a line every tenth of the run. Nothing here can stop training: a lost update is a bar that lags.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import Any


class Board:
    """The latest step a run's rank 0 reported (a Ray actor on the driver's node)."""

    def __init__(self) -> None:
        self.state: dict[str, float] = {}

    def update(self, state: dict[str, float]) -> None:
        self.state = state

    def get(self) -> dict[str, float]:
        return self.state


class ProgressBar:
    """``with ProgressBar(total, start) as handle:`` — pass ``handle`` to the workers; rank 0 calls
    :func:`post`. The bar closes (and stops its thread) when the block ends."""

    def __init__(self, total: int, start: int = 0, *, poll_s: float = 0.5):
        self.total, self.start, self.poll_s = total, start, poll_s
        self.handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Any:
        import ray

        self.handle = ray.remote(num_cpus=0)(Board).remote()
        self._thread = threading.Thread(target=self._draw, name="mae-progress", daemon=True)
        self._thread.start()
        return self.handle

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _draw(self) -> None:
        import ray
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        try:  # a terminal that reports 0 columns (a pty nobody sized) would get a bar of width 0: nothing shown
            sized = tty and os.get_terminal_size(sys.stderr.fileno()).columns > 0
        except OSError:
            sized = False
        size = shutil.get_terminal_size()  # COLUMNS / LINES, else the terminal's size, else 80 × 24
        bar = tqdm(
            total=self.total,
            initial=self.start,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=sized,
            ncols=None if sized else size.columns,
            nrows=None if sized else size.lines,  # tqdm hides a bar below row 0 too
            mininterval=0.5,
            disable=not tty,  # off a terminal: only the lines printed below
        )
        shown, next_line = self.start, self.start
        while True:
            stopping = self._stop.wait(self.poll_s)
            try:
                state = ray.get(self.handle.get.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a bar that lags never stops training
                state = {}
            step = int(state.get("step", shown))
            if step > shown:
                bar.update(step - shown)
                shown = step
                bar.set_postfix_str(f"loss {state.get('loss', float('nan')):.4f}, {state.get('ips', 0):.1f} img/s")
                if not tty and (step >= next_line or step == self.total):
                    print(
                        f"train: step {step}/{self.total}, loss {state.get('loss', float('nan')):.4f}", file=sys.stderr
                    )
                    next_line = step + max(1, self.total // 10)
            if stopping:
                break
        bar.close()


def post(handle: Any, step: int, loss: float, images_per_s: float) -> None:
    """Rank 0: report ``step`` to the driver's bar (fire-and-forget)."""
    if handle is None:
        return
    try:
        handle.update.remote({"step": step, "loss": loss, "ips": images_per_s})
    except Exception:  # noqa: BLE001 - the bar is a nicety
        pass

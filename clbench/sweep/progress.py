"""The sweep's progress lines: one per started / finished run, and a summary line every
``every`` seconds while runs are going (the heartbeat), through the ``clbench`` logger.

On a terminal a bar of finished runs with the sweep's ETA (:mod:`clbench.progress`) stays
below the lines; the heartbeat line carries the same ETA for logs and CI."""

from __future__ import annotations

import logging
import math
import threading
import time

from clbench.progress import format_duration, progress
from clbench.sweep.jobs import JobResult
from clbench.sweep.plan import RunSpec
from clbench.sweep.state import inspect_run

log = logging.getLogger(__name__)


class Progress:
    """Lines stamped with the seconds since the sweep began; safe to call from threads."""

    def __init__(self, total: int, every: float = 30.0) -> None:
        self.total, self.every = total, every
        self.finished = 0
        self.began = time.perf_counter()
        self._lock = threading.Lock()
        # the lines below are the sweep's own, so the shared one only draws a terminal bar
        self._bar = progress(
            total, "sweep", unit="runs", every=math.inf, start_line=False, end_line=False
        )
        if total <= 0:  # nothing to run: no bar waiting for a run that never comes
            self._bar.close()

    def _say(self, line: str) -> None:
        with self._lock:
            log.info(f"[{time.perf_counter() - self.began:7.1f}s] {line}")

    def started(self, label: str) -> None:
        self._say(f"start   {label}")

    def done(self, result: JobResult) -> None:
        self.finished += 1
        count = f"{self.finished}/{self.total}"
        if result.state == "done":
            faa = f"FAA {result.faa:.2f}, " if result.faa is not None else ""
            self._say(f"done    {result.label} ({faa}{result.seconds:.0f}s) [{count}]")
        else:
            self._say(f"{result.state:<7} {result.label}: {result.error or ''} [{count}]")
        self._bar.update(1)
        if self.finished >= self.total:
            self._bar.close()

    def eta(self) -> str:
        """``, ETA 12m30s`` from the runs finished so far; empty before the first one."""
        seconds = self._bar.eta()
        return f", ETA {format_duration(seconds)}" if seconds is not None else ""

    def heartbeat(self, specs: list[RunSpec]) -> None:
        states = [inspect_run(spec) for spec in specs]
        running = [
            f"{spec.label} {state.finished}/{state.total or '?'}"
            for spec, state in zip(specs, states)
            if state.state == "running"
        ]
        waiting = sum(state.state == "pending" for state in states)
        self._say(
            f"progress: {self.finished}/{self.total} finished, {len(running)} running"
            + (f" ({', '.join(running)})" if running else "")
            + f", {waiting} waiting{self.eta()}"
        )

"""Progress of the phases that can take a while: never minutes of silence.

``progress(total, label)`` tracks one phase (loading a backbone, encoding a token cache, an
evaluation pass, a feature pass, validating a sweep, a download). What it shows depends on
where standard error goes:

* a terminal: a bar with counts, rate and ETA, redrawn in place on stderr at most every
  0.2 s (and every second from a heartbeat thread, so a single long step still shows its
  elapsed time); when the phase ends the bar is erased and the end line is logged;
* anything else (CI, a pipe, a log file): a line when the phase starts, one every
  ``every`` seconds (30 by default) with counts, rate and ETA, and one at the end.

A phase over within :data:`ANNOUNCE_AFTER_S` (1 s) prints no line at all: its start line
waits that long, so quick phases (a small evaluation, a cached backbone) add no noise and
bad input stays a one-line error. Lines go through the ``clbench.progress`` logger to
stderr (``to_stdout`` for a command's header), so ``--quiet`` (the ``clbench`` logger at
WARNING) silences bars and lines alike. Nothing here imports torch: the CLI uses it before
the heavy imports.

::

    with progress(len(examples), "building the token cache", unit="sentences") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

    for batch in track(loader, "computing features", unit="batches"):
        ...
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from clbench.logs import TO_STDERR

__all__ = [
    "Progress",
    "close_all",
    "counted",
    "format_duration",
    "importing",
    "progress",
    "track",
]

log = logging.getLogger(__name__)

DEFAULT_EVERY_S = 30.0
ANNOUNCE_AFTER_S = 1.0  # a phase still running after this long gets its start line
BAR_REFRESH_S = 0.2  # at most this often a bar is redrawn by update()
BAR_HEARTBEAT_S = 1.0  # the heartbeat thread redraws a bar this often
BAR_WIDTH = 20
ERASE_LINE = "\r\033[K"

T = TypeVar("T")
Detail = str | Callable[[], str] | None


def format_duration(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``: short enough for a bar, exact enough for a log."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# Terminal bars in the order they started: only the innermost draws (an evaluation inside
# a training epoch, say), and a log line erases whatever bar is on the line first. One
# re-entrant lock guards every bar: the heartbeat threads, the caller and the log filter
# (which runs inside log calls made while holding it) never wait on each other.
_bars: list[Progress] = []
_open: set[Progress] = set()
_lock = threading.RLock()


class _EraseBarBeforeLine(logging.Filter):
    """On the clbench handlers while a bar is drawn: a log line would otherwise be glued
    to the end of the bar. The bar comes back at its next redraw."""

    def filter(self, record: logging.LogRecord) -> bool:
        with _lock:
            for bar in _bars:
                bar._erase()
        return True


_eraser = _EraseBarBeforeLine()


def _push_bar(bar: Progress) -> None:
    with _lock:
        for other in _bars:
            other._erase()
        if not _bars:
            for handler in logging.getLogger("clbench").handlers:
                handler.addFilter(_eraser)
        _bars.append(bar)


def _pop_bar(bar: Progress) -> None:
    with _lock:
        if bar in _bars:
            _bars.remove(bar)
        if not _bars:
            for handler in logging.getLogger("clbench").handlers:
                handler.removeFilter(_eraser)


class Progress:
    """One phase's progress; see the module docstring. Use :func:`progress` to make one.

    total: items the phase will process (None: unknown, e.g. one long call).
    label: what the phase does, as the user should read it ("loading backbone X").
    unit: what is counted ("items", "batches", "MB").
    scale: counts are divided by it for display (2**20 shows bytes as MB).
    every: seconds between lines when stderr is not a terminal (inf: none).
    start_line / end_line: whether the phase announces its start / logs its end line (off
        for a phase another line already reports, e.g. the per-epoch line; such a phase
        stays silent unless it is slow enough for a periodic line, or on a terminal).
    announce_after: the start line waits this long (None: :data:`ANNOUNCE_AFTER_S`); a
        phase that ends before gets no end line either (unless it has no start line).
    to_stdout: log the lines to stdout (a command's header) instead of stderr.
    tty: draw a bar (None: when the stream is a terminal).
    stream: where the bar goes (None: ``sys.stderr`` as it is at drawing time).
    clock: the time source (tests pass a fake one).
    heartbeat: a thread that keeps the bar's clock moving and emits the periodic lines
        while the phase makes no update (one long call); off in tests with a fake clock.
    """

    def __init__(
        self,
        total: float | None,
        label: str,
        *,
        unit: str = "items",
        scale: float = 1.0,
        every: float = DEFAULT_EVERY_S,
        start_line: bool = True,
        end_line: bool = True,
        announce_after: float | None = None,
        to_stdout: bool = False,
        tty: bool | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ) -> None:
        self.total, self.label, self.unit, self.scale = total, label, unit, scale
        self.every, self.start_line, self.end_line = every, start_line, end_line
        self.announce_after = ANNOUNCE_AFTER_S if announce_after is None else announce_after
        self._extra = {} if to_stdout else TO_STDERR
        self._start_pending = start_line  # no start line yet (it waits announce_after)
        self.done: float = 0
        self.detail = ""
        self._stream = stream
        self._clock = clock
        self._closed = False
        self._drawn = False
        self.enabled = log.isEnabledFor(logging.INFO)
        self.tty = self.enabled and (self._output().isatty() if tty is None else tty)
        self.began = clock()
        self._last_line = self.began
        self._last_draw = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.enabled:
            self._closed = True
            return
        with _lock:
            _open.add(self)
        if self.tty:
            _push_bar(self)
            self._draw(self.began)
        else:
            self._announce(self.began)
        if heartbeat:
            self._thread = threading.Thread(
                target=self._beat, name=f"clbench-progress {label}", daemon=True
            )
            self._thread.start()

    # -- what callers use ------------------------------------------------------------
    def update(self, count: float = 1, detail: Detail = None) -> None:
        """``count`` more items done; ``detail`` (text, or a function called only when
        something is drawn, e.g. for a running loss) is shown after the counts."""
        self.advance_to(self.done + count, detail)

    def advance_to(self, done: float, detail: Detail = None) -> None:
        """Set the count to ``done`` (for callbacks that report a running total)."""
        self.done = done
        if self._closed:
            return
        now = self._clock()
        if self.tty:
            if now - self._last_draw >= BAR_REFRESH_S:
                self._set_detail(detail)
                self._draw(now)
            return
        if self._start_pending:
            self._announce(now)
        if now - self._last_line >= self.every:
            self._set_detail(detail)
            self._periodic(now)

    def tick(self) -> None:
        """Redraw the bar, or log the periodic line when one is due (no progress made)."""
        if self._closed:
            return
        now = self._clock()
        if self.tty:
            self._draw(now)
        else:
            self._announce(now)
            self._periodic(now)

    def elapsed(self) -> float:
        return self._clock() - self.began

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None while it cannot be estimated."""
        elapsed = self.elapsed()
        if not self.total or self.done <= 0 or elapsed <= 0:
            return None
        return max(self.total - self.done, 0) * elapsed / self.done

    def finish(self, message: str | None = None) -> None:
        """End the phase: erase the bar, then log ``message``, or the end line when
        ``end_line`` (and the phase lasted long enough to be announced). Idempotent."""
        if not self._close():
            return
        if message is not None:
            self._log(message)
            return
        long_enough = self.elapsed() >= self.announce_after
        if self.end_line and (long_enough or not self.start_line):
            if not self.tty and self._start_pending:  # ended before a tick announced it
                self._log(self._start_text())
            self._log(self._end_text())

    def close(self) -> None:
        """End the phase without an end line (it failed, or another line reports it)."""
        self._close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.finish()
        else:
            self.close()

    # -- text --------------------------------------------------------------------------
    def _count(self, value: float) -> str:
        if self.scale != 1:
            return f"{value / self.scale:.1f}"
        return str(int(value)) if float(value).is_integer() else f"{value:g}"

    def _rate(self, elapsed: float) -> str:
        if elapsed <= 0 or self.done <= 0:
            return ""
        rate = self.done / self.scale / elapsed
        shown = f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"
        return f"{shown} {self.unit}/s"

    def _counts(self) -> str:
        if self.total is None:
            return f"{self._count(self.done)} {self.unit}" if self.done else ""
        percent = 100 * self.done / self.total if self.total else 100.0
        return f"{self._count(self.done)}/{self._count(self.total)} {self.unit} ({percent:.0f}%)"

    def _start_text(self) -> str:
        if self.total is None:
            return f"{self.label} ..."
        return f"{self.label} ({self._count(self.total)} {self.unit}) ..."

    def _periodic_text(self, now: float) -> str:
        elapsed = now - self.began
        parts = [self._counts(), f"{format_duration(elapsed)} elapsed", self._rate(elapsed)]
        eta = self.eta()
        if eta:  # not while unknown, nor at 100 %
            parts.append(f"ETA {format_duration(eta)}")
        parts.append(self.detail)
        return f"{self.label}: " + ", ".join(part for part in parts if part)

    def _end_text(self) -> str:
        elapsed = self.elapsed()
        if self.total is None and not self.done:
            return f"{self.label}: done in {format_duration(elapsed)}"
        rate = self._rate(elapsed)
        return (
            f"{self.label}: {self._count(self.done)} {self.unit} in {format_duration(elapsed)}"
            + (f" ({rate})" if rate else "")
        )

    def _bar_text(self, now: float) -> str:
        elapsed = now - self.began
        bar = ""
        if self.total:
            filled = max(0, min(BAR_WIDTH, int(BAR_WIDTH * self.done / self.total)))
            bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] "
        eta = self.eta()
        timing = format_duration(elapsed) + (f" ETA {format_duration(eta)}" if eta else "")
        parts = [self._counts(), timing, self._rate(elapsed), self.detail]
        return f"{self.label} {bar}" + "  ".join(part for part in parts if part)

    def _set_detail(self, detail: Detail) -> None:
        if detail is not None:
            self.detail = detail() if callable(detail) else detail

    # -- output ------------------------------------------------------------------------
    def _log(self, line: str) -> None:
        log.info(line, extra=self._extra)

    def _announce(self, now: float) -> None:
        """The start line, once the phase has run for ``announce_after`` seconds."""
        with _lock:
            if self._start_pending and not self._closed and now - self.began >= self.announce_after:
                self._start_pending = False
                self._log(self._start_text())

    def _periodic(self, now: float) -> None:
        with _lock:  # the caller and the heartbeat thread: one line, not two
            if self._closed or now - self._last_line < self.every:
                return
            self._last_line = now
            self._log(self._periodic_text(now))

    def _output(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _write(self, text: str) -> None:
        try:
            self._output().write(text)
            self._output().flush()
        except (OSError, ValueError):  # a closed stream must not break the phase
            pass

    def _draw(self, now: float) -> None:
        with _lock:
            if self._closed or not _bars or _bars[-1] is not self:
                return
            self._last_draw = now
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self._write(ERASE_LINE + self._bar_text(now)[:width])
            self._drawn = True

    def _erase(self) -> None:
        with _lock:
            if self._drawn:
                self._drawn = False
                self._write(ERASE_LINE)

    # -- lifecycle ---------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self._next_beat()):
            try:
                self.tick()
            except Exception:  # progress must never break the phase it reports
                return

    def _next_beat(self) -> float:
        """Seconds to the heartbeat's next tick: the bar's redraw, the pending start line,
        or (at most 5 s late) the periodic line."""
        if self.tty:
            return BAR_HEARTBEAT_S
        if self._start_pending:
            return max(0.01, self.announce_after - self.elapsed())
        return min(self.every, 5.0)

    def _close(self) -> bool:
        """Stop the heartbeat and erase the bar; False when already closed (or quiet)."""
        with _lock:
            if self._closed:
                return False
            self._closed = True
            _open.discard(self)
            if self.tty:
                self._erase()
                _pop_bar(self)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        return True


def progress(total: float | None, label: str, **options: Any) -> Progress:
    """A started :class:`Progress`, to use as a context manager: the end line when the
    block ends normally; when it raises, only the bar is erased."""
    return Progress(total, label, **options)


def track(
    items: Iterable[T], label: str, total: float | None = None, **options: Any
) -> Iterator[T]:
    """``items``, with one :meth:`Progress.update` per item (``total`` default:
    ``len(items)`` when it has one)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with progress(total, label, **options) as bar:
        yield from counted(items, bar)


def counted(items: Iterable[T], bar: Progress) -> Iterator[T]:
    """``items``, with one ``bar.update()`` per item: for an iterator handed to a library
    call inside ``with progress(...) as bar:``, which then ends the bar even if the call
    raises (a :func:`track` generator left half-consumed ends only when collected)."""
    for item in items:
        yield item
        bar.update()


def importing(what: str) -> contextlib.AbstractContextManager[Any]:
    """``WHAT: importing torch and Avalanche ...`` on stdout at once, as the first line of
    a command's header, then every 30 s and at the end: the heavy imports take half a
    minute on a small CPU, a minute under load. Nothing when they are done already (a
    second call in one process)."""
    if "avalanche.training" in sys.modules and "clbench.runner" in sys.modules:
        return contextlib.nullcontext()
    return progress(
        None, f"{what}: importing torch and Avalanche", to_stdout=True, announce_after=0
    )


def close_all() -> None:
    """Close every phase still open (a run that raised mid-epoch): no bar or heartbeat
    thread outlives the run that started it."""
    with _lock:
        still_open = list(_open)
    for bar in still_open:
        bar.close()

"""run.log: a run's console output (standard output and error together, in order), kept
in its folder beside the results.

While a run executes, ``sys.stdout`` and ``sys.stderr`` are replaced by tees that write to
the console as before and to one shared sink, so the two streams interleave in the file
exactly as they were written. A run builds its backbone and scenario before its folder
exists (bad input then writes nothing), so the sink holds those lines in memory until
:meth:`ConsoleLog.keep_in` names the file; a run that never gets a folder keeps nothing.
A resumed run appends to the file, after a header line that says when and where.

A terminal's progress bar is redrawn in place with ``\\r``; those redraws are left out
of the file (the phase's end line follows them), so the file reads as the same run's
output on a pipe. Only what goes through ``sys.stdout`` / ``sys.stderr`` is kept: clbench's
log lines, ``print``, warnings, tracebacks the run loop records; not what C code writes
to the file descriptors directly. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

RUN_LOG = "run.log"
BAR_REDRAW = "\r"  # how a terminal bar (clbench's, tqdm's) starts each redraw or erase


class _Sink:
    """Where both tees write: a buffer until the run folder exists, then the file.

    One lock for both streams (and for the progress heartbeat threads), so lines keep the
    order in which they were written. Each write is flushed: a run killed with -9 keeps
    everything it printed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: io.StringIO | None = io.StringIO()
        self._file: TextIO | None = None

    def write(self, text: str) -> None:
        if not text or text.startswith(BAR_REDRAW):
            return
        with self._lock:
            try:
                if self._file is not None:
                    self._file.write(text)
                    self._file.flush()
                elif self._buffer is not None:
                    self._buffer.write(text)
            except (OSError, ValueError):  # a full disk must not break the run
                pass

    def open(self, path: Path, header: str) -> None:
        with self._lock:
            if self._file is not None:
                return
            self._file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
            self._file.write(header)
            if self._buffer is not None:
                self._file.write(self._buffer.getvalue())
                self._buffer = None
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._buffer = None


class _Tee:
    """A text stream that writes to ``stream`` and copies to the sink; everything else
    (``isatty``, ``fileno``, ``encoding``) is the stream's, so progress bars still know
    whether they draw on a terminal."""

    def __init__(self, stream: TextIO, sink: _Sink) -> None:
        self._stream = stream
        self._sink = sink

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._sink.write(text)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ConsoleLog:
    """The console of one run, copied into the run's ``run.log`` (see the module)."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._stdout: _Tee | None = None
        self._stderr: _Tee | None = None
        self._originals: tuple[TextIO, TextIO] | None = None

    def start(self) -> None:
        self._originals = (sys.stdout, sys.stderr)
        self._stdout = _Tee(sys.stdout, self._sink)
        self._stderr = _Tee(sys.stderr, self._sink)
        sys.stdout, sys.stderr = self._stdout, self._stderr

    def keep_in(self, folder: Path, header: str) -> None:
        """From now on write into ``folder/run.log`` (appended), after ``header`` and what
        was printed since :meth:`start`."""
        self._sink.open(folder / RUN_LOG, header if header.endswith("\n") else header + "\n")

    def note(self, text: str) -> None:
        """Into the file only (a traceback the console shows anyway once it propagates)."""
        self._sink.write(text if text.endswith("\n") else text + "\n")

    def stop(self) -> None:
        """Give the streams back (unless someone replaced them meanwhile) and close the file."""
        if self._originals is not None:
            if sys.stdout is self._stdout:
                sys.stdout = self._originals[0]
            if sys.stderr is self._stderr:
                sys.stderr = self._originals[1]
            self._originals = None
        self._sink.close()


@contextlib.contextmanager
def saved_console() -> Iterator[ConsoleLog]:
    """A started :class:`ConsoleLog`, stopped on the way out whatever happens."""
    console = ConsoleLog()
    console.start()
    try:
        yield console
    finally:
        console.stop()

"""clbench's log output: library code logs through :mod:`logging`, this module decides
where the lines go.

Every module logs to a child of the ``clbench`` logger (``logging.getLogger(__name__)``).
As transformers does for its own logger, importing clbench gives that logger one handler
at INFO, so a plain script sees the same progress lines as ``clbench run``: the bare
message, on standard output, or on standard error for records logged with
``extra=TO_STDERR`` (the per-epoch lines) and for warnings and errors. Silence it with
``logging.getLogger("clbench").setLevel(logging.WARNING)`` or the CLI's ``--quiet``;
``--verbose`` adds the DEBUG lines. A caller that wants its own handlers calls
``use_own_handlers()``.
"""

from __future__ import annotations

import logging
import sys

ROOT = "clbench"
TO_STDERR = {"clbench_stream": "stderr"}


class _LineHandler(logging.Handler):
    """Writes each record's message as one line; the stream is looked up at emit time, so
    pytest's capture and redirected ``sys.stdout`` see it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            to_stderr = (
                record.levelno >= logging.WARNING
                or getattr(record, "clbench_stream", "") == "stderr"
            )
            stream = sys.stderr if to_stderr else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never break a run
            self.handleError(record)


_handler = _LineHandler()
_handler.setFormatter(logging.Formatter("%(message)s"))


def _install() -> None:
    logger = logging.getLogger(ROOT)
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    """The CLI's ``--quiet`` (warnings and errors only) / ``--verbose`` (DEBUG too)."""
    _install()
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.getLogger(ROOT).setLevel(level)


def use_own_handlers() -> None:
    """Remove clbench's handler and let records propagate to the caller's logging setup."""
    logger = logging.getLogger(ROOT)
    logger.removeHandler(_handler)
    logger.propagate = True


_install()

"""The ``clbench`` command: one module per command group, assembled here.

run      list, run, show, tree, download: what a single run needs
report   table, plot, report: read run folders only (no torch)
sweep    sweep: a grid of runs, locally or on Ray

Every command module adds its sub-parsers with ``add_parsers`` and sets the function that
runs it as the ``handler`` default; :func:`main` parses, dispatches and turns a
:class:`~clbench.errors.UsageError` into one line on stderr and exit code 2. Nothing here
imports torch: ``clbench --help``, ``list``, ``show``, the reporting commands and the
refusal of bad input start as fast as Python (names, presets and options come from the
catalog, :mod:`clbench.catalog`; :mod:`clbench.cli.preflight` checks a run with it).
Torch is imported when a run or a download really starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from clbench import logs
from clbench.cli import report, run, sweep
from clbench.errors import UsageError

EXAMPLES = """examples:
  clbench list strategies
  clbench run --strategy l2p --scenario fewrel-offline --seed 1
  clbench run -s seq-ft -c digits-offline --preset quick --set lr=0.01
  clbench run --strategy my_methods.py:MyStrategy --scenario fewrel-offline
  clbench run --resume results/fewrel-offline/l2p/minilm-l6_seed1_20260101-120000
  clbench show results/fewrel-offline/l2p/minilm-l6_seed1_20260101-120000
"""


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose`` before the command, as ``clbench --help`` shows them."""
    group = parser.add_argument_group("log output").add_mutually_exclusive_group()
    group.add_argument(
        "--quiet",
        action="store_true",
        help="only warnings and errors: no progress lines (the command's output stays)",
    )
    group.add_argument("--verbose", action="store_true", help="also the debug lines")


def _accept_verbosity(command: argparse.ArgumentParser) -> None:
    """The same flags after the command (``clbench run ... --quiet``), left out of the
    command's help and usage. SUPPRESS as default: a flag given before the command is not
    reset by the command's parser. (Not a mutually exclusive group: argparse would leave
    a gap in the usage line for it; given both, --quiet wins.)"""
    for flag in ("--quiet", "--verbose"):
        command.add_argument(
            flag, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clbench",
        description="Prompt-based continual learning on frozen pretrained transformers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbosity(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run.add_parsers(commands)
    report.add_parsers(commands)
    sweep.add_parsers(commands)
    for command in commands.choices.values():
        _accept_verbosity(command)
    return parser


@contextlib.contextmanager
def _verbosity(quiet: bool, verbose: bool) -> Iterator[None]:
    """The log level for one call, restored afterwards (a notebook or a test calling
    ``main`` twice gets its own level back)."""
    logger = logging.getLogger(logs.ROOT)
    before = logger.level
    if quiet or verbose:
        logs.set_verbosity(quiet=quiet, verbose=verbose)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _environment_restored(name: str) -> Iterator[None]:
    """--data-root reaches the scenarios through $CLBENCH_DATA; restore it afterwards so
    that an in-process call (a notebook, a test) leaves the caller's environment as it was."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _verbosity(args.quiet, args.verbose), _environment_restored("CLBENCH_DATA"):
        try:
            return int(args.handler(args))
        except UsageError as error:
            print(f"clbench: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130


__all__ = ["build_parser", "main"]

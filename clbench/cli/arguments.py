"""Arguments more than one command takes, and the parsing of comma lists."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def comma_list(values: list[str] | None) -> list[str]:
    """``--x a,b --x c`` -> [a, b, c]."""
    items = (item.strip() for value in values or [] if value for item in value.split(","))
    return [item for item in items if item]


def results_root() -> Path:
    """``$CLBENCH_RESULTS``, else ./results."""
    return Path(os.environ.get("CLBENCH_RESULTS", "results"))


def add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, help="where data sets live (also $CLBENCH_DATA)")


def add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def use_data_root(data_root: Path | None) -> None:
    """``--data-root`` reaches the scenarios through $CLBENCH_DATA (``main`` restores it)."""
    if data_root is not None:
        os.environ["CLBENCH_DATA"] = str(data_root)

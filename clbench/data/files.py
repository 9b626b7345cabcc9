"""Small helpers for data files: where the repository and the data root are, reading JSON,
finding a file. Torch-free: ``clbench list`` probes for data with them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clbench.errors import DataNotFoundError, UsageError

# The repository root (clbench/data/ sits two levels inside it): data shipped beside a
# checkout, in ../shared/data, is looked up from here.
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """``$CLBENCH_DATA``, else ``~/.cache/clbench/data``: never the working directory."""
    env = os.environ.get("CLBENCH_DATA")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "clbench" / "data"


def read_json(path: Path) -> Any:
    """The parsed file; malformed JSON is a UsageError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from error


def find_data_file(explicit: str | None, candidates: Sequence[Path], what: str, how: str) -> Path:
    """``explicit`` if given (it must exist), else the first existing candidate; a missing
    file is a DataNotFoundError listing every place looked in, then ``how`` to get it."""
    searched = [Path(explicit).expanduser()] if explicit is not None else list(candidates)
    for path in searched:
        if path.is_file():
            return path
    raise DataNotFoundError(
        f"{what} not found (looked in: {', '.join(str(p) for p in searched)}); {how}"
    )

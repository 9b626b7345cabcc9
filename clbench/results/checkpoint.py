"""``checkpoint.pt``: the strategy state after the last finished experience.

The one module of :mod:`clbench.results` that imports torch, so that reading run folders
(tables, plots, ``clbench tree``) never does. The checkpoint is written before the
progress record that refers to it (see :meth:`RunFolder.append_record`): progress never
claims an experience whose state is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clbench.fileio import atomic_write_with
from clbench.results.folder import RunFolder

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(folder: RunFolder) -> Path:
    return folder.path / CHECKPOINT


def save_checkpoint(folder: RunFolder, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically: a killed run keeps the previous checkpoint whole."""
    atomic_write_with(checkpoint_path(folder), lambda path: _save(payload, path))


def _save(payload: dict[str, Any], path: Path) -> None:
    # Through an open file, not the path: torch names the archive inside the zip after a
    # path's file name (here a random temporary one), but "archive" for a stream, so the
    # same state always gives the same bytes.
    with open(path, "wb") as stream:
        torch.save(payload, stream)


def load_checkpoint(folder: RunFolder) -> dict[str, Any]:
    # weights_only=False: the payload holds the strategy's own state (option dicts, class
    # statistics, the progress record), written by this package, not tensors alone
    return torch.load(checkpoint_path(folder), map_location="cpu", weights_only=False)

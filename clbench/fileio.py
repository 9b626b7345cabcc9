"""Atomic file writes: the one helper every writer in clbench uses.

A file is written under a temporary name in its own folder, flushed to disk and renamed
over the target, so a killed process leaves the old version or the new one, never half of
one (results, token caches, split files, download notes and archives alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# mkstemp creates files readable by their owner only; a written file gets the permissions
# open() would give it (a shared data root or results folder stays readable by others).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block
    ends without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        os.chmod(temporary, _FILE_MODE)
        yield temporary
        with open(temporary, "rb+") as stream:  # the bytes reach the disk before the rename
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, payload: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def atomic_write_with(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary_path)`` (e.g. ``lambda p: torch.save(obj, p)``), then rename."""
    with atomic_path(path) as temporary:
        write(temporary)

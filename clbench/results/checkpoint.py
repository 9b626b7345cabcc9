"""``checkpoint.pt``: the strategy state after the last finished experience.

The one module of :mod:`clbench.results` that imports torch, so that reading run folders
(tables, plots, ``clbench tree``) never does. The checkpoint is written before the
progress record that refers to it (see :meth:`RunFolder.append_record`): progress never
claims an experience whose state is missing.

Run folders are shared, so a checkpoint is read with ``torch.load(weights_only=True)``:
tensors and plain data (dicts, lists, tuples, strings, numbers, booleans, None) only,
never an arbitrary pickled object, whose loading could run code. Saving checks the same
rule, so a strategy whose state holds anything else fails at its first checkpoint rather
than leaving one that cannot be resumed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from clbench.errors import UsageError
from clbench.fileio import atomic_write_bytes
from clbench.results.folder import RunFolder

CHECKPOINT = "checkpoint.pt"


class CheckpointError(UsageError):
    """A checkpoint that is not one clbench wrote: tampered with, foreign or damaged. It is
    refused without running anything in it (the CLI prints it on one line, exit code 2)."""


def checkpoint_path(folder: RunFolder) -> Path:
    return folder.path / CHECKPOINT


def save_checkpoint(folder: RunFolder, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically: a killed run keeps the previous checkpoint whole.

    Raises TypeError, before writing, when ``payload`` holds more than tensors and plain
    data (a strategy's ``extra_state`` returning an object, say).
    """
    # Into a stream, not to a path: torch names the archive inside the zip after a path's
    # file name (a temporary one here), but "archive" for a stream, so the same state
    # always gives the same bytes.
    stream = io.BytesIO()
    torch.save(payload, stream)
    data = stream.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TypeError(
            "a checkpoint holds tensors and plain data only (dict, list, tuple, str, int, "
            "float, bool, None), so that it loads with weights_only=True; this state holds "
            f"{_refused_object(error)}: return plain data from state_dict / extra_state"
        ) from None
    atomic_write_bytes(checkpoint_path(folder), data)


def load_checkpoint(folder: RunFolder) -> dict[str, Any]:
    """The payload of ``folder``'s checkpoint; :class:`CheckpointError` for a file that
    holds anything but tensors and plain data (nothing in it runs) or is not a checkpoint."""
    path = checkpoint_path(folder)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: it holds {_refused_object(error)}, and a clbench "
            "checkpoint holds tensors and plain data only, so it was tampered with or "
            "comes from elsewhere (nothing in it was run)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        # torch's messages for a damaged archive are several lines: keep the first
        detail = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: not a readable clbench checkpoint ({type(error).__name__}: {detail})"
        ) from None
    if not isinstance(payload, dict) or not {"strategy", "finished_experiences"} <= set(payload):
        raise CheckpointError(f"{path}: not a clbench checkpoint (no strategy state in it)")
    return payload


def _refused_object(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, from its message ("Trying to load
    unsupported GLOBAL posix.system ..."), as one short phrase."""
    for line in str(error).splitlines():
        if "GLOBAL" in line:
            words = line.split()
            name = words[words.index("GLOBAL") + 1] if words[-1] != "GLOBAL" else ""
            return f"a reference to {name.rstrip('.,')}" if name else "a reference to code"
        if line.strip().startswith("Unsupported"):  # e.g. a plain pickle's opcodes
            return f"data a weights-only load does not read ({line.strip().rstrip('.')})"
    return "an object that is not a tensor or plain data"

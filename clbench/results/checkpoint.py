"""``checkpoint.pt``: the strategy state after the last finished experience.

The one module of :mod:`clbench.results` that imports torch, so that reading run folders
(tables, plots, ``clbench tree``) never does. The checkpoint is written before the
progress record that refers to it (see :meth:`RunFolder.append_record`): progress never
claims an experience whose state is missing.

The strategy's query cache grows with every input seen while the rest of the state stays
the same size, so the run loop's checkpoints hold it incrementally: beside
``checkpoint.pt``, ``query_cache/part-NNNN.pt`` holds what changed in the cache up to
finished experience NNNN + 1 since the previous part (entries added, keys dropped), and
``checkpoint.pt`` lists the parts it goes with ("query_cache_parts"). Each file is written
atomically, a part before the checkpoint that lists it; a part a killed run wrote but no
checkpoint lists is never read, and the redone experience writes it again.
:func:`load_checkpoint` reads the listed parts back into the strategy state, so a caller
sees one state either way (checkpoints made before holding the whole cache still load).

The rest of the state holds much that never changes once written: a finished task's
prompt slot or adapter, the class statistics of classes already learnt (HiDe-Prompt's
covariances are ~2.4 MB a class on ViT-B). So every tensor of at least
``BLOB_MIN_BYTES`` is kept once, content-addressed, in ``blobs/<digest>.pt`` beside the
checkpoint, which refers to it by digest ("blobs" lists them): a checkpoint writes only
the tensors whose content is new. Blobs are written before the checkpoint that lists them;
those the new checkpoint no longer lists are removed after it is written (a killed run
leaves at most unlisted ones, removed at its next checkpoint).

Run folders are shared, so a checkpoint is read with ``torch.load(weights_only=True)``:
tensors and plain data (dicts, lists, tuples, strings, numbers, booleans, None) only,
never an arbitrary pickled object, whose loading could run code. Saving checks the same
rule, so a strategy whose state holds anything else fails at its first checkpoint rather
than leaving one that cannot be resumed.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clbench.errors import UsageError
from clbench.fileio import atomic_write_bytes
from clbench.query_cache import QueryCache
from clbench.results.folder import RunFolder

CHECKPOINT = "checkpoint.pt"
QUERY_CACHE_PARTS = "query_cache"  # the folder of the query-cache parts, beside CHECKPOINT
PART_FORMAT = "clbench query-cache part"
BLOBS = "blobs"  # the folder of the content-addressed tensors, beside CHECKPOINT
BLOB_FORMAT = "clbench checkpoint blob"
BLOB_REFERENCE = "__clbench_blob__"  # {BLOB_REFERENCE: digest} stands for a blob's tensor
# smaller tensors stay in checkpoint.pt: a file each would cost more than it saves
BLOB_MIN_BYTES = 16 * 1024


class CheckpointError(UsageError):
    """A checkpoint that is not one clbench wrote: tampered with, foreign or damaged. It is
    refused without running anything in it (the CLI prints it on one line, exit code 2)."""


def checkpoint_path(folder: RunFolder) -> Path:
    return folder.path / CHECKPOINT


@dataclass(frozen=True)
class CheckpointWrite:
    """What one :func:`save_checkpoint` wrote: bytes (checkpoint.pt, the new query-cache
    part and the new blobs together) and wall seconds (serialising, checking, writing)."""

    bytes_written: int
    seconds: float


def query_cache_part_path(folder: RunFolder, name: str) -> Path:
    return folder.path / QUERY_CACHE_PARTS / name


def blob_path(folder: RunFolder, digest: str) -> Path:
    return folder.path / BLOBS / f"{digest}.pt"


def save_checkpoint(
    folder: RunFolder, payload: dict[str, Any], *, query_cache: QueryCache | None = None
) -> CheckpointWrite:
    """Write ``payload`` atomically: a killed run keeps the previous checkpoint whole.

    With ``query_cache`` (the run loop's case; ``payload["strategy"]`` then leaves the
    cache out, see ``CLStrategy.state_dict``), what changed in the cache since the last
    save goes to a new part file, named after ``payload["finished_experiences"]``, and the
    checkpoint lists every part it needs. Raises TypeError, before writing, when
    ``payload`` holds more than tensors and plain data (a strategy's ``extra_state``
    returning an object, say).
    """
    began = time.perf_counter()
    written = 0
    part: bytes | None = None
    if query_cache is not None:
        parts = list(query_cache.saved_parts)
        changes = query_cache.changes()
        if len(changes["keys"]) or len(changes["dropped"]):
            name = f"part-{int(payload['finished_experiences']) - 1:04d}.pt"
            if name in parts:
                raise RuntimeError(f"query-cache part {name} is saved already")
            part = _serialise({"format": PART_FORMAT, **changes})
            parts.append(name)
        payload = {**payload, "query_cache_parts": parts}
    blobs: dict[str, torch.Tensor] = {}
    payload = _externalise(payload, blobs)
    if blobs:
        payload["blobs"] = sorted(blobs)
    data = _serialise(payload)  # checked before anything is written
    new_blobs = {d: t for d, t in blobs.items() if not blob_path(folder, d).is_file()}
    # a tensor and a string: nothing a weights-only load refuses, so not checked again
    serialised = {d: _tensor_bytes(t) for d, t in new_blobs.items()}
    for digest, blob in serialised.items():
        atomic_write_bytes(blob_path(folder, digest), blob)
        written += len(blob)
    if part is not None:
        atomic_write_bytes(query_cache_part_path(folder, parts[-1]), part)
        written += len(part)
    atomic_write_bytes(checkpoint_path(folder), data)
    written += len(data)
    if query_cache is not None:
        query_cache.mark_saved(parts)
    _remove_unlisted_blobs(folder, set(blobs))
    return CheckpointWrite(written, time.perf_counter() - began)


def _externalise(value: Any, blobs: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor of at least BLOB_MIN_BYTES replaced by a reference to
    its digest, the tensors collected in ``blobs`` (digest -> tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() * value.element_size() < BLOB_MIN_BYTES:
            return value
        digest = tensor_digest(value)
        blobs[digest] = value
        return {BLOB_REFERENCE: digest}
    if isinstance(value, dict):
        return {key: _externalise(item, blobs) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_externalise(item, blobs) for item in value)
    return value


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    stream = io.BytesIO()
    torch.save({"format": BLOB_FORMAT, "tensor": tensor}, stream)
    return stream.getvalue()


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of the tensor's dtype, shape and values (not its storage or strides)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    hasher.update(flat.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def _remove_unlisted_blobs(folder: RunFolder, listed: set[str]) -> None:
    """Blobs the checkpoint just written does not list: older versions of what changed,
    or what a killed run wrote for a checkpoint it never finished."""
    directory = folder.path / BLOBS
    if not directory.is_dir():
        return
    for path in directory.glob("*.pt"):
        if path.stem not in listed:
            path.unlink(missing_ok=True)


def _internalise(value: Any, folder: RunFolder, listed: set[str]) -> Any:
    """The inverse of :func:`_externalise`: each reference read back from its blob."""
    if isinstance(value, dict):
        if set(value) == {BLOB_REFERENCE}:
            return _load_blob(folder, str(value[BLOB_REFERENCE]), listed)
        return {key: _internalise(item, folder, listed) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_internalise(item, folder, listed) for item in value)
    return value


def _load_blob(folder: RunFolder, digest: str, listed: set[str]) -> torch.Tensor:
    path = blob_path(folder, digest)
    if digest not in listed:
        raise CheckpointError(
            f"{checkpoint_path(folder)}: refers to blob {digest} it does not list"
        )
    blob = _load_safely(path)
    if not isinstance(blob, dict) or blob.get("format") != BLOB_FORMAT:
        raise CheckpointError(f"{path}: not a clbench checkpoint blob")
    tensor = blob["tensor"]
    if not isinstance(tensor, torch.Tensor) or tensor_digest(tensor) != digest:
        raise CheckpointError(f"{path}: its content does not match its name (damaged)")
    return tensor


def _serialise(payload: Any) -> bytes:
    """``payload`` as torch.save bytes, checked to load with weights_only=True."""
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
    return data


def load_checkpoint(folder: RunFolder) -> dict[str, Any]:
    """The payload of ``folder``'s checkpoint, its blobs read back in place, with the
    query-cache parts it lists read into ``payload["strategy"]["query_cache"]`` (``{"parts", "part_names"}``, which
    ``CLStrategy.load_state_dict`` replays); :class:`CheckpointError` for a file that
    holds anything but tensors and plain data (nothing in it runs) or is not a
    checkpoint, the parts included."""
    path = checkpoint_path(folder)
    payload = _load_safely(path)
    if not isinstance(payload, dict) or not {"strategy", "finished_experiences"} <= set(payload):
        raise CheckpointError(f"{path}: not a clbench checkpoint (no strategy state in it)")
    # checkpoints made before blobs existed hold every tensor themselves
    listed = {str(d) for d in payload.pop("blobs", ())}
    if listed:
        payload = _internalise(payload, folder, listed)
    names = payload.get("query_cache_parts")
    if names is not None:
        parts = []
        for name in names:
            part_path = query_cache_part_path(folder, str(name))
            part = _load_safely(part_path)
            if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
                raise CheckpointError(f"{part_path}: not a clbench query-cache part")
            parts.append(part)
        payload["strategy"]["query_cache"] = {"parts": parts, "part_names": list(names)}
    return payload


def _load_safely(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, every failure one CheckpointError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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

"""Downloading, verifying and extracting data sets into the data root.

Every file we fetch is a :class:`Resource`: a URL, the file name it gets on disk and a
checksum that was published or cross-checked elsewhere. The rules (DESIGN.md: "real data
is downloaded or read from a data root with checksums"):

* a download streams into a temporary file *in the target folder* and becomes visible
  only by an atomic rename (:func:`clbench.fileio.atomic_path`) after its checksum
  matched, so a killed or corrupt download never leaves a file that a later run would
  take for the real one;
* a dropped connection is retried a few times with exponential back-off, resuming with an
  HTTP ``Range`` request when the server allows it (ImageNet-R is 2 GB);
* a file already present and verified is not downloaded again; the verification is
  remembered in a small ``<file>.verified`` note (size, mtime, checksum), so a run does not
  re-hash 2 GB every time it starts;
* archives are extracted into a temporary folder beside the target, with every member
  checked (no absolute paths, no ``..``, no links or devices), then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from clbench.errors import DataNotFoundError
from clbench.fileio import atomic_path, atomic_write_text
from clbench.logs import TO_STDERR
from clbench.progress import Progress, counted, progress

if TYPE_CHECKING:
    from clbench.scenario import ScenarioSpec

log = logging.getLogger(__name__)

# Bounded: three retries with 1 s, 2 s, 4 s pauses, then a clean failure. Tests pass a
# tiny back-off instead of waiting.
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
ANNOUNCED_BYTES = 256 << 20  # hashing a file this large gets a start and an end line
USER_AGENT = "clbench-data-download/1"

ProgressCallback = Callable[[int, "int | None"], None]


def _status_line(message: str) -> None:
    """Where status lines go unless the caller passes ``log=``: stderr, as progress."""
    log.info(message, extra=TO_STDERR)


class DownloadError(DataNotFoundError):
    """A download failed for good (after the retries): the message names the URL."""


class ChecksumMismatchError(DownloadError):
    """The bytes arrived but are not the published file; nothing was kept."""


class UnsafeArchiveError(DataNotFoundError):
    """An archive member would land outside the target folder, or is a link or device."""


@dataclass(frozen=True)
class Resource:
    """One file to fetch. At least one checksum is required: we never keep unverified data."""

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not (self.md5 or self.sha256):
            raise ValueError(f"resource {self.filename} has no checksum (md5 or sha256)")
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"resource file name {self.filename!r} must be a plain name")

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, expected hex digest); sha256 preferred when both are known."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        assert self.md5 is not None
        return "md5", self.md5.lower()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MB blocks (never the whole file at once); a
    file of :data:`ANNOUNCED_BYTES` or more says so (a 2 GB archive takes a while)."""
    path = Path(path)
    digest = hashlib.new(algorithm)
    size = path.stat().st_size
    large = size >= ANNOUNCED_BYTES
    label = f"  checking the {algorithm} of {path.name}"
    with (
        path.open("rb") as handle,
        progress(size, label, unit="MB", scale=2**20, start_line=large, end_line=large) as bar,
    ):
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


# ------------------------------------------------------------------ verification notes


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_note(path: Path, algorithm: str, digest: str) -> None:
    """Remember a verification; only a shortcut, so a read-only folder just goes without."""
    stat = path.stat()
    note = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, algorithm: digest}
    with contextlib.suppress(OSError):
        atomic_write_text(_note_path(path), json.dumps(note))


def _note_matches(path: Path, algorithm: str, digest: str) -> bool:
    """True when the note says this very file (same size and mtime) had this checksum."""
    try:
        note = json.loads(_note_path(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return (
        note.get("size") == stat.st_size
        and note.get("mtime_ns") == stat.st_mtime_ns
        and note.get(algorithm) == digest
    )


def is_verified(path: Path, resource: Resource, *, rehash: bool = False) -> bool:
    """Whether ``path`` is the resource's file (checked by its note, or by hashing it)."""
    path = Path(path)
    if not path.is_file():
        return False
    algorithm, expected = resource.checksum
    if not rehash and _note_matches(path, algorithm, expected):
        return True
    if file_digest(path, algorithm) != expected:
        return False
    _write_note(path, algorithm, expected)
    return True


# ----------------------------------------------------------------------------- download


def download(
    resource: Resource,
    folder: Path,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """``folder/resource.filename``, downloaded and verified unless already there.

    A present file that fails verification is re-downloaded (it was corrupt or stale);
    a failed download raises :class:`DownloadError` / :class:`ChecksumMismatchError` and
    leaves nothing behind in ``folder``.
    """
    folder = Path(folder)
    target = folder / resource.filename
    if is_verified(target, resource):
        return target
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    say = log or _status_line
    if target.exists():
        say(f"{target} does not match its checksum: downloading it again")
    say(f"downloading {resource.url} -> {target}")
    if progress is None:  # a 2 GB download should not look like a hang
        progress = print_progress()
    algorithm, expected = resource.checksum
    try:
        # The part file keeps its name through the retries, so a retry resumes it; it is
        # renamed over the target only once its checksum matched, and removed otherwise.
        with atomic_path(target) as part:
            failures = _fetch_with_retries(
                resource.url, part, retries, backoff_s, timeout_s, progress, say
            )
            if failures is not None:
                raise DownloadError(
                    f"could not download {resource.url} ({len(failures)} attempts: "
                    f"{'; '.join(dict.fromkeys(failures))}). Without internet access, fetch "
                    f"the file elsewhere and put it at {target} (it must have {algorithm} "
                    f"{expected})"
                )
            actual = file_digest(part, algorithm)
            if actual != expected:
                raise ChecksumMismatchError(
                    f"{resource.url} downloaded, but its {algorithm} is {actual}, expected "
                    f"{expected}: the file was corrupted on the way or changed at the source; "
                    f"nothing was kept in {folder}. Try again, or fetch {resource.filename} "
                    f"by hand and put it there"
                )
        _note_path(target).unlink(missing_ok=True)
        _write_note(target, algorithm, expected)
        return target
    finally:
        if isinstance(progress, DownloadProgress):
            progress.close()
        if created and not any(folder.iterdir()):
            folder.rmdir()  # leave no trace of a failed first download


def _fetch_with_retries(
    url: str,
    part: Path,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    progress: ProgressCallback | None,
    say: Callable[[str], None],
) -> list[str] | None:
    """None once ``part`` holds the whole body; else the reason of every failed attempt."""
    part.unlink(missing_ok=True)
    failures: list[str] = []
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout_s, progress)
            return None
        except urllib.error.HTTPError as error:
            failures.append(f"HTTP {error.code} {error.reason}")
            if error.code == 416:  # our partial file is not a prefix it can resume: restart
                part.unlink(missing_ok=True)
            elif error.code < 500:  # 404, 403: asking again will not help; 5xx might
                break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            failures.append(f"{type(error).__name__}: {reason}")
        if attempt < retries:
            pause = backoff_s * 2**attempt
            say(f"  download interrupted ({failures[-1]}); retrying in {pause:g}s")
            time.sleep(pause)
    part.unlink(missing_ok=True)
    return failures


class IncompleteDownload(OSError):
    """The connection closed before Content-Length bytes arrived (retryable)."""


def _fetch_once(url: str, part: Path, timeout_s: float, progress: ProgressCallback | None) -> None:
    """Append to ``part`` from where it stops (``Range``), or restart when refused."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        resumed = have > 0 and response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        expected_total = have + int(length) if length is not None else None
        received = have
        with part.open("ab" if resumed else "wb") as sink:
            while chunk := response.read(CHUNK_BYTES):
                sink.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, expected_total)
    # urllib returns a short body without complaint when the peer closes early
    if expected_total is not None and received < expected_total:
        raise IncompleteDownload(f"connection closed after {received} of {expected_total} bytes")


class DownloadProgress:
    """A :data:`ProgressCallback`: :mod:`clbench.progress`'s bar, or a line every 30 s
    (MB, rate, ETA), and a line when a file is complete. A count that goes back starts
    the next file's bar (one callback serves a scenario's files in a row); :func:`download`
    calls :meth:`close` when a file ends, so a failed download leaves no bar behind."""

    def __init__(self, label: str = "  downloading") -> None:
        self.label = label
        self._bar: Progress | None = None
        self._received = 0

    def __call__(self, received: int, total: int | None) -> None:
        if self._bar is None or received < self._received:
            self.close()
            self._bar = progress(total, self.label, unit="MB", scale=2**20, start_line=False)
        self._received = received
        self._bar.advance_to(received)
        if total is not None and received >= total:
            self._bar.finish()
            self._bar = None

    def close(self) -> None:
        """End the current file's bar without an end line (the download failed)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._received = 0


def print_progress(prefix: str = "  ") -> ProgressCallback:
    """The progress callback of ``clbench download`` and of :func:`download` by default."""
    return DownloadProgress(f"{prefix}downloading")


# ---------------------------------------------------------------------------- extraction


def _check_member_name(name: str, archive: Path) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder; "
            "refusing to extract (delete the file and download it again)"
        )


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    _check_member_name(member.name, archive)
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} is a link or special file; refusing to extract"
        )


def _unpack_tar(archive: Path, staging: Path) -> None:
    with tarfile.open(archive) as tar:
        # listing the members reads the whole archive: quiet unless slow
        with progress(None, f"  listing {archive.name}", start_line=False, end_line=False):
            members = tar.getmembers()
        for member in members:
            _check_member(member, archive)
        # extractall walks its members once, so an iterator over them counts the files
        label = f"  extracting {archive.name}"
        with progress(len(members), label, unit="files", start_line=False) as bar:
            # Python >= 3.12 (and patched 3.10 / 3.11) also apply the "data" filter
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=counted(members, bar), filter="data")  # noqa: S202
            else:  # every member was checked above
                tar.extractall(staging, members=counted(members, bar))  # noqa: S202


def _unpack_zip(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            _check_member_name(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} is a link; refusing to extract"
                )
        members = bundle.infolist()
        label = f"  extracting {archive.name}"
        with progress(len(members), label, unit="files", start_line=False) as bar:
            # every member name was checked above
            bundle.extractall(staging, members=counted(members, bar))


def extract_tar(archive: Path, destination: Path, top_level: str) -> Path:
    """Extract ``archive`` so that its folder ``top_level`` becomes ``destination``.

    Everything goes into a temporary folder beside ``destination`` first; only a complete
    extraction is renamed into place, so an interrupted one is never mistaken for data.
    Returns ``destination``.
    """
    return _extract(archive, destination, top_level, _unpack_tar, "tar")


def extract_zip(archive: Path, destination: Path, top_level: str) -> Path:
    """:func:`extract_tar` for a zip archive (members checked the same way)."""
    return _extract(archive, destination, top_level, _unpack_zip, "zip")


def _extract(
    archive: Path,
    destination: Path,
    top_level: str,
    unpack: Callable[[Path, Path], None],
    kind: str,
) -> Path:
    archive, destination = Path(archive), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{os.getpid()}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        try:
            unpack(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise DataNotFoundError(
                f"{archive} is not a readable {kind} archive ({error}); delete it and "
                "download it again"
            ) from error
        extracted = staging / top_level
        if not extracted.is_dir():
            found = sorted(p.name for p in staging.iterdir())
            raise DataNotFoundError(
                f"{archive} has no top-level folder {top_level!r} (found: {', '.join(found)}); "
                "it is not the expected archive"
            )
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(extracted, destination)
        return destination
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------- completion marks


def mark_complete(folder: Path, source: Resource) -> None:
    """Write ``folder/.clbench-complete`` naming the verified archive it came from."""
    algorithm, digest = source.checksum
    atomic_write_text(
        Path(folder) / ".clbench-complete", json.dumps({"source": source.url, algorithm: digest})
    )


def is_complete(folder: Path, source: Resource) -> bool:
    """Whether ``folder`` holds a finished extraction of exactly this archive."""
    algorithm, digest = source.checksum
    try:
        marker = json.loads((Path(folder) / ".clbench-complete").read_text())
    except (OSError, ValueError):
        return False
    return marker.get(algorithm) == digest


def download_and_extract(
    resource: Resource,
    folder: Path,
    top_level: str,
    destination: Path,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The archive in ``folder`` (downloaded if needed), extracted to ``destination`` once."""
    if is_complete(destination, resource):
        return destination
    archive = download(
        resource, folder, retries=retries, backoff_s=backoff_s, progress=progress, log=log
    )
    (log or _status_line)(f"extracting {archive} -> {destination}")
    extract_tar(archive, destination, top_level)
    mark_complete(destination, resource)
    return destination


# ------------------------------------------------------------------------ clbench list


@dataclass(frozen=True)
class DataStatus:
    """Whether a scenario's data is on this machine (for ``clbench list``), and where."""

    present: bool
    location: Path
    how_to_get: str = ""
    downloadable: bool = True  # False for licensed data the user must supply


def data_marker(name: str, spec: ScenarioSpec | None, options_type: type) -> str:
    """`` [data: ...]`` for ``clbench list``: present / missing under the data root.

    ``spec`` is the scenario's registered :class:`~clbench.scenario.ScenarioSpec` (its
    ``data_status`` probes for the data; a scenario without one needs no data files:
    bundled, or generated); ``options_type`` its options dataclass
    (:func:`clbench.registry.options_class`), probed with the default options.
    """
    if spec is None or spec.data_status is None:
        return " [data: built in]"
    from clbench.data.files import default_data_root

    try:
        status = spec.data_status(options_type(), default_data_root())
    except Exception as error:  # a listing must not fail on one scenario's probe
        return f" [data: unknown ({type(error).__name__})]"
    if status.present:
        return f" [data: present in {status.location}]"
    if not status.downloadable:
        return f" [data: missing; licensed, `clbench download {name}` says where to put it]"
    return f" [data: missing; `clbench download {name}`]"

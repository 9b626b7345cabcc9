"""Data sets published as one checksummed archive (CIFAR-100, ImageNet-R, CUB-200-2011).

Each has a folder under the data root holding the archive and its extraction::

    <data_root>/<folder>/<archive>        downloaded, md5 checked
    <data_root>/<folder>/<extracted>/     the archive's top folder, extracted once

:class:`ArchiveData` holds what differs between them (names, URL, checksum) and answers
what a scenario and ``clbench download`` / ``list`` ask: where the data goes, whether it
is there, how to get it, and "fetch it if missing and allowed, else refuse".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from clbench.data.download import (
    DataStatus,
    ProgressCallback,
    Resource,
    download_and_extract,
    is_complete,
)
from clbench.errors import DataNotFoundError


class ArchiveOptions(Protocol):
    """The options of a scenario on archive data: where to fetch from, and whether to."""

    download: bool
    url: str
    md5: str


Opts = TypeVar("Opts", bound=ArchiveOptions)


@dataclass(frozen=True)
class ArchiveData:
    """One archive data set.

    title: how messages name it ("CIFAR-100").
    scenario: the scenario name ``clbench download`` takes.
    folder_name: its folder under the data root.
    archive / top_level: the archive's file name, and the one folder at its top.
    extracted: the name that folder gets in ``folder_name``.
    url / md5: the published source (the options may name a mirror and its md5).
    size: said in the how-to-get line of a large download (``"2.1 GB"``).
    """

    title: str
    scenario: str
    folder_name: str
    archive: str
    top_level: str
    extracted: str
    url: str
    md5: str
    size: str = ""

    def folder(self, data_root: Path) -> Path:
        return Path(data_root) / self.folder_name

    def resource(self, options: ArchiveOptions) -> Resource:
        return Resource(self.archive, options.url, md5=options.md5)

    def how_to_get(self, folder: Path) -> str:
        size = f", {self.size}" if self.size else ""
        return (
            f"run `clbench download {self.scenario}` (it fetches {self.url}{size}, md5 "
            f"{self.md5}), or put {self.archive} in {folder} by hand; set $CLBENCH_DATA or "
            "--data-root to use another data root"
        )

    def status(self, options: ArchiveOptions, data_root: Path) -> DataStatus:
        """Present when the extraction of exactly this archive finished (its marker)."""
        folder = self.folder(data_root)
        extracted = folder / self.extracted
        return DataStatus(
            is_complete(extracted, self.resource(options)), extracted, self.how_to_get(folder)
        )

    def fetch(
        self,
        options: ArchiveOptions,
        data_root: Path,
        log: Callable[[str], None] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Download (if needed), verify and extract; returns the extracted folder."""
        folder = self.folder(data_root)
        return download_and_extract(
            self.resource(options),
            folder,
            self.top_level,
            folder / self.extracted,
            log=log,
            progress=progress,
        )

    def ensure(
        self,
        options: Opts,
        data_root: Path,
        fetch: Callable[[Opts, Path], object] | None = None,
    ) -> Path:
        """The extracted folder, fetched first when missing (``fetch``, default
        :meth:`fetch`) unless the options forbid downloads: then a DataNotFoundError
        that says where it looked and how to get the data."""
        status = self.status(options, data_root)
        if not status.present:
            if not options.download:
                raise DataNotFoundError(
                    f"{self.title} not found (looked in: {status.location}); {status.how_to_get}"
                )
            (fetch or self.fetch)(options, data_root)
        return status.location

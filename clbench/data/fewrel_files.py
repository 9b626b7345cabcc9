"""Where the FewRel files are looked for, and whether they are there.

Torch-free, so that ``clbench list`` can ask the FewRel scenarios' data probes without
importing their module (scenarios/relation_extraction.py reads, checks and downloads the
files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from clbench.data.download import DataStatus
from clbench.data.files import REPO_ROOT

FEWREL_HOW_TO_GET = (
    "FewRel is MIT-licensed: download data/val_wiki.json (and data/pid2name.json for the "
    "relation names) from https://github.com/thunlp/FewRel and put it in one of those "
    "places, or pass --set scenario.data_file=PATH"
)
FEWREL_FULL_FILES = ("train_wiki.json", "val_wiki.json")  # 64 + 16 = 80 relations


class FewRelFileOptions(Protocol):
    """What the probes read of a FewRel scenario's options."""

    data_file: str | None


def fewrel_candidates(filename: str, data_root: Path) -> list[Path]:
    """Where a FewRel file is looked for: the data root, then the copy beside the repository."""
    return [
        Path(data_root) / "fewrel" / filename,
        REPO_ROOT.parent / "shared" / "data" / "fewrel" / filename,
    ]


def fewrel_offline_data_status(options: FewRelFileOptions, data_root: Path) -> DataStatus:
    candidates = (
        [Path(options.data_file).expanduser()]
        if options.data_file
        else fewrel_candidates("val_wiki.json", data_root)
    )
    found = next((path for path in candidates if path.is_file()), candidates[0])
    return DataStatus(found.is_file(), found, FEWREL_HOW_TO_GET)


def fewrel_data_status(options: FewRelFileOptions, data_root: Path) -> DataStatus:
    if options.data_file:
        path = Path(options.data_file).expanduser()
        return DataStatus(path.is_file(), path, FEWREL_HOW_TO_GET)
    found = [
        next((p for p in fewrel_candidates(name, data_root) if p.is_file()), None)
        for name in FEWREL_FULL_FILES
    ]
    location = Path(data_root) / "fewrel"
    how = "run `clbench download fewrel` (MIT license, from github.com/thunlp/FewRel)"
    return DataStatus(all(found), location, how)

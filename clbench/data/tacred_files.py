"""Where the user's TACRED files go, and whether they are there.

TACRED is licensed (LDC2018T24): clbench never downloads it, it only says where to put
it. Torch-free, so that ``clbench list`` can ask the probe without importing the scenario
module (scenarios/tacred.py reads and converts the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from clbench.data.download import DataStatus
from clbench.errors import DataNotFoundError

TACRED_FILES = ("train.json", "dev.json", "test.json")


class TACREDFileOptions(Protocol):
    """What the probe reads of the TACRED scenario's options."""

    data_file: str | None


def tacred_license_note(folder: Path) -> str:
    return (
        "TACRED is distributed by the Linguistic Data Consortium (LDC2018T24, "
        "https://catalog.ldc.upenn.edu/LDC2018T24) under a license that forbids "
        "redistribution, so clbench cannot download it. With access, copy the release's "
        f"data/json/train.json, dev.json and test.json into {folder} (or pass --set "
        "scenario.data_file=PATH for one JSON file, or a folder holding those three)"
    )


def find_tacred_files(data_file: str | None, default_folder: Path) -> list[Path]:
    """The JSON file(s) to read; a missing one explains the license and where to put it."""
    if data_file is not None:
        path = Path(data_file).expanduser()
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise DataNotFoundError(
                f"TACRED data {path} not found (looked in: {path}); "
                f"{tacred_license_note(default_folder)}"
            )
        folder = path
    else:
        folder = default_folder
    expected = [folder / name for name in TACRED_FILES]
    missing = [p for p in expected if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"TACRED files missing: {', '.join(str(p) for p in missing)} (looked in: {folder}); "
            f"{tacred_license_note(default_folder)}"
        )
    return expected


def tacred_data_status(options: TACREDFileOptions, data_root: Path) -> DataStatus:
    folder = Path(data_root) / "tacred"
    try:
        files = find_tacred_files(options.data_file, folder)
    except DataNotFoundError:
        location = Path(options.data_file).expanduser() if options.data_file else folder
        return DataStatus(False, location, tacred_license_note(folder), downloadable=False)
    return DataStatus(True, files[0].parent if len(files) > 1 else files[0], "")

"""Where CUB-200-2011 lies under the data root (or in a user's folder), and whether it is there.

Torch-free, so that ``clbench list`` can ask the probe without importing the scenario
module (scenarios/split_cub200.py reads the images and the official split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from clbench.data.archive import ArchiveData
from clbench.data.download import DataStatus

SCENARIO = "split-cub200"
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_TOP_LEVEL = "CUB_200_2011"
METADATA = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")

CUB = ArchiveData(
    title="CUB-200-2011",
    scenario=SCENARIO,
    folder_name="cub200",
    archive="CUB_200_2011.tgz",
    top_level=CUB_TOP_LEVEL,
    extracted=CUB_TOP_LEVEL,
    url=CUB_URL,
    md5=CUB_MD5,
    size="1.1 GB",
)


class CUBFileOptions(Protocol):
    """What the probe reads of the scenario's options."""

    data_folder: str | None
    download: bool
    url: str
    md5: str


def cub_data_status(options: CUBFileOptions, data_root: Path) -> DataStatus:
    if options.data_folder is not None:
        folder = Path(options.data_folder).expanduser()
        present = all((folder / name).is_file() for name in METADATA)
        how = f"give an extracted {CUB_TOP_LEVEL} folder (with {', '.join(METADATA)})"
        return DataStatus(present, folder, how)
    return CUB.status(options, data_root)

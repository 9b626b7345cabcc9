"""Split CUB-200: the 200 bird species of CUB-200-2011 in 10 tasks x 20 classes, the
split HiDe-Prompt and NoRGa report.

The official train / test split (``train_test_split.txt``: 5,994 / 5,794 images); class
id = species number - 1 (``image_class_labels.txt``), names from ``classes.txt``. The
class order is split-cifar100's: ``seed`` is NoRGa's ``random.seed(seed)`` shuffle,
``natural`` HiDe-Prompt's 0..199. JPEGs are decoded per item in the DataLoader workers;
training images get RandomResizedCrop(scale=(0.05, 1)) + flip (HiDe-Prompt's transform).

Source: the Caltech data repository's CUB_200_2011.tgz (1.1 GB), with the md5 that
torchvision-style loaders (Avalanche's CUB200 among them) publish for it; or an already
extracted ``CUB_200_2011`` folder given as ``data_folder``. Layout under the data root::

    cub200/CUB_200_2011.tgz     the archive (md5 checked)
    cub200/CUB_200_2011/        extracted: images/, images.txt, classes.txt, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.config import Options, option
from clbench.data.cub_files import (  # torch-free: `clbench list` probes with them
    CUB,
    CUB_MD5,
    CUB_URL,
    SCENARIO,
    cub_data_status,
)
from clbench.data.download import ProgressCallback
from clbench.data.images import ImageFileDataset
from clbench.data.splits import (
    TaskSplitOptions,
    announce,
    increment_option,
    initial_classes_option,
    protocol_line,
    task_sizes_option,
)
from clbench.data.vision import (
    ClassOrder,
    Normalization,
    class_order_seed_option,
    image_scenario,
    normalize_option,
    require_vision_encoder,
    resolve_class_order,
    vit_transforms,
)
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import Scenario, ScenarioSpec, default_data_root

CUB_CLASSES = 200


@dataclass
class SplitCUB200Options(TaskSplitOptions, Options):
    num_experiences: int = option(10, "number of tasks (must divide the 200 classes)")
    task_sizes: list[int] = task_sizes_option()
    initial_classes: int = initial_classes_option()
    increment: int = increment_option()
    class_order: ClassOrder = option(
        "seed", "seed: random.seed(seed) shuffle of the classes (NoRGa); natural: 0..199 (HiDe)"
    )
    class_order_seed: int = class_order_seed_option()
    augment: bool = option(
        True, "RandomResizedCrop(scale=(crop_scale_min, 1)) + flip for training images"
    )
    normalize: Normalization = normalize_option()
    crop_scale_min: float = option(0.05, "smallest crop area fraction (HiDe-Prompt's 0.05)")
    data_folder: str | None = option(
        None, "an extracted CUB_200_2011 folder to use as it is (instead of the data root's)"
    )
    download: bool = option(True, "download the data into the data root when it is missing")
    url: str = option(CUB_URL, "where to download CUB_200_2011.tgz from")
    md5: str = option(CUB_MD5, "md5 of the archive at url")


# ------------------------------------------------------------------------------ data


def fetch_cub(
    options: SplitCUB200Options,
    data_root: Path,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """The archive, downloaded (if needed), verified and extracted; a user's folder is
    only checked."""
    status = cub_data_status(options, data_root)
    if options.data_folder is not None:
        if not status.present:
            raise DataNotFoundError(
                f"CUB-200-2011 not found (looked in: {status.location}); {status.how_to_get}"
            )
        return status.location
    return CUB.fetch(options, data_root, log=log, progress=progress)


def _read_table(path: Path, columns: int) -> dict[str, list[str]]:
    """``id value ...`` lines -> {id: [value, ...]} (CUB's metadata files)."""
    if not path.is_file():
        raise DataNotFoundError(f"CUB-200-2011 file {path} not found; it is not a CUB folder")
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise DataNotFoundError(f"{path}:{number}: expected {columns} fields: {line!r}")
        table[parts[0]] = parts[1:]
    return table


@dataclass(frozen=True)
class CUBListing:
    """The official split: image paths (under images/) and class ids, per side."""

    train_files: list[str]
    train_labels: list[int]
    test_files: list[str]
    test_labels: list[int]
    class_names: list[str]


def read_cub(folder: Path) -> CUBListing:
    """The metadata of an extracted CUB_200_2011 folder, checked against its images."""
    images = _read_table(folder / "images.txt", 2)
    labels = _read_table(folder / "image_class_labels.txt", 2)
    is_train = _read_table(folder / "train_test_split.txt", 2)
    classes = _read_table(folder / "classes.txt", 2)
    if not (images.keys() == labels.keys() == is_train.keys()):
        raise DataNotFoundError(
            f"{folder}: images.txt, image_class_labels.txt and train_test_split.txt list "
            "different image ids"
        )
    numbers = sorted(int(c) for c in classes)
    if numbers != list(range(1, len(numbers) + 1)):
        raise DataNotFoundError(f"{folder}/classes.txt: class ids are not 1..{len(numbers)}")
    split: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for image_id in sorted(images, key=int):
        path, label = images[image_id][0], int(labels[image_id][0])
        if not 1 <= label <= len(numbers):
            raise DataNotFoundError(f"{folder}: image {image_id} has no class {label}")
        if not (folder / "images" / path).is_file():
            raise DataNotFoundError(
                f"{folder / 'images' / path} is missing; delete {folder} and extract the "
                "archive again"
            )
        files, ids = split[is_train[image_id][0] == "1"]
        files.append(path)
        ids.append(label - 1)
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
    names = [classes[str(n)][0].split(".", 1)[-1] for n in numbers]
    return CUBListing(*split[True], *split[False], class_names=names)


# ----------------------------------------------------------------------------- protocol


def check_cub_options(options: SplitCUB200Options) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    options.task_split(CUB_CLASSES, SCENARIO)
    resolve_class_order(options.class_order, CUB_CLASSES, 0, options.class_order_seed)
    if not 0 < options.crop_scale_min <= 1:
        raise UsageError(f"crop_scale_min must be in (0, 1] (got {options.crop_scale_min})")


def describe_cub(options: SplitCUB200Options) -> str:
    return (
        f"{protocol_line(options, CUB_CLASSES, SCENARIO)}; official split, 5,994 train / "
        "5,794 test images"
    )


@SCENARIOS.register(
    SCENARIO,
    "CUB-200-2011 (200 bird species), 10 tasks x 20 classes, official train/test split; "
    "downloads 1.1 GB",
    spec=ScenarioSpec(
        default_backbone="vit-b16-in21k",
        modality="vision",
        family="vision",
        data_status=cub_data_status,
        download=fetch_cub,
        check_options=check_cub_options,
        describe=describe_cub,
    ),
)
def split_cub200(options: SplitCUB200Options, encoder: Any, seed: int) -> Scenario:
    check_cub_options(options)
    size = require_vision_encoder(encoder, SCENARIO)
    if options.data_folder is not None:
        folder = fetch_cub(options, default_data_root())
    else:
        folder = CUB.ensure(options, default_data_root())
    listing = read_cub(folder)
    # the real data has 200 classes; a smaller folder (a test's) must still split
    tasks = options.task_split(len(listing.class_names), SCENARIO)
    class_order = resolve_class_order(
        options.class_order, len(listing.class_names), seed, options.class_order_seed
    )
    images = folder / "images"
    train = ImageFileDataset(images, listing.train_files, listing.train_labels)
    test = ImageFileDataset(images, listing.test_files, listing.test_labels)
    train_transform, eval_transform = vit_transforms(
        size,
        encoder,
        options.normalize,
        augment=options.augment,
        crop_scale=(options.crop_scale_min, 1.0),
    )
    announce(SCENARIO, tasks)
    return image_scenario(
        SCENARIO,
        train=train,
        test=test,
        class_order=class_order,
        tasks=tasks,
        transforms=(train_transform, eval_transform),
        class_names=listing.class_names,
        data_folder=str(folder),
        class_order_kind=options.class_order,
        seed=seed,
        encoder=encoder,
    )

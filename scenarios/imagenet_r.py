"""ImageNet-R: 200 classes, 30,000 images, 10 tasks x 20 classes, 80/20 split.

Public codebases split ImageNet-R differently (one moves files on its first run with
whatever seed it had). Ours is a pure function of the set of image paths: per class, the
sorted paths are shuffled by an RNG seeded with (split seed, class), and 20 % go to the
test set, with the rounding spread over the classes (largest remainders) so the totals are
exactly 24,000 / 6,000. The split is written to ``split-80-20.json`` beside the images
the first time and read back afterwards; a split file that does not match the images
present is an error, never silently redone.

Layout under the data root::

    imagenet-r/imagenet-r.tar        the official archive (md5 checked)
    imagenet-r/images/<wnid>/*.jpg   extracted (the archive's top folder imagenet-r/)
    imagenet-r/split-80-20.json      the written-down split

JPEG decoding, RandomResizedCrop(size, scale=(0.05, 1)) and the flip run per item in the
DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.config import Options, option
from clbench.data.archive import ArchiveData
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
from clbench.fileio import atomic_write_text
from clbench.registry import SCENARIOS
from clbench.scenario import Scenario, ScenarioSpec, default_data_root

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
# The md5 that torchvision-style loaders (torch-uncertainty, datamaestro and others)
# publish for this URL; the archive is 2.1 GB.
IMAGENET_R_MD5 = "a61312130a589d0ca1a8fca1f2bd3337"
IMAGENET_R_ARCHIVE = "imagenet-r.tar"
IMAGENET_R_TOP_LEVEL = "imagenet-r"
IMAGENET_R_CLASSES = 200

SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPLIT_FILE = "split-80-20.json"
SPLIT_FORMAT = "clbench-imagenet-r-split/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

IMAGENET_R = ArchiveData(
    title="ImageNet-R",
    scenario="imagenet-r",
    folder_name="imagenet-r",
    archive=IMAGENET_R_ARCHIVE,
    top_level=IMAGENET_R_TOP_LEVEL,
    extracted="images",
    url=IMAGENET_R_URL,
    md5=IMAGENET_R_MD5,
    size="2.1 GB",
)


@dataclass
class ImageNetROptions(TaskSplitOptions, Options):
    num_experiences: int = option(10, "number of tasks (must divide the 200 classes)")
    task_sizes: list[int] = task_sizes_option()
    initial_classes: int = initial_classes_option()
    increment: int = increment_option()
    class_order: ClassOrder = option(
        "seed", "seed: random.seed(seed) shuffle of the classes; natural: sorted WordNet ids"
    )
    class_order_seed: int = class_order_seed_option()
    augment: bool = option(
        True,
        "RandomResizedCrop(scale=(crop_scale_min, 1)) + flip for training (false: test transform)",
    )
    normalize: Normalization = normalize_option()
    crop_scale_min: float = option(0.05, "smallest crop area fraction of RandomResizedCrop")
    download: bool = option(True, "download the data into the data root when it is missing")
    url: str = option(IMAGENET_R_URL, "where to download imagenet-r.tar from")
    md5: str = option(IMAGENET_R_MD5, "md5 of the archive at url")


def fetch_imagenet_r(
    options: ImageNetROptions,
    data_root: Path,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Download (if needed), verify, extract, and write the split file; returns the folder."""
    images = IMAGENET_R.fetch(options, data_root, log=log, progress=progress)
    folder = IMAGENET_R.folder(data_root)
    load_or_write_split(folder / SPLIT_FILE, list_image_files(images))
    return folder


# ------------------------------------------------------------------------------ split


def list_image_files(images: Path) -> list[str]:
    """Sorted ``wnid/file`` paths of every image in a class folder (order-independent)."""
    files = []
    for class_dir in os.scandir(images):
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        for entry in os.scandir(class_dir.path):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                files.append(f"{class_dir.name}/{entry.name}")
    if not files:
        raise DataNotFoundError(f"no images found under {images}/<class>/")
    return sorted(files)


def listing_digest(files: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


def _test_counts(class_sizes: dict[str, int], test_fraction: float) -> dict[str, int]:
    """round(f * total) test items, spread as f * n_c per class by largest remainders."""
    quotas = {c: test_fraction * n for c, n in class_sizes.items()}
    counts = {c: math.floor(q) for c, q in quotas.items()}
    missing = round(test_fraction * sum(class_sizes.values())) - sum(counts.values())
    by_remainder = sorted(quotas, key=lambda c: (-(quotas[c] - counts[c]), c))
    for c in by_remainder[:missing]:
        counts[c] += 1
    return counts


def make_split(
    files: Sequence[str], test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> dict[str, list[str]]:
    """Stratified train/test split of ``wnid/file`` paths; a function of the set only."""
    by_class: dict[str, list[str]] = {}
    for path in sorted(set(files)):
        by_class.setdefault(path.split("/", 1)[0], []).append(path)
    counts = _test_counts({c: len(m) for c, m in by_class.items()}, test_fraction)
    train, test = [], []
    for wnid in sorted(by_class):
        members = by_class[wnid]
        # str seeds hash the same on every platform and Python run (unlike hash())
        random.Random(f"{seed}/{wnid}").shuffle(members)
        test.extend(members[: counts[wnid]])
        train.extend(members[counts[wnid] :])
    return {"train": sorted(train), "test": sorted(test)}


def load_or_write_split(split_file: Path, files: Sequence[str]) -> dict[str, Any]:
    """The split written beside the data, created on first use and checked on reuse."""
    digest = listing_digest(files)
    if split_file.is_file():
        try:
            split = json.loads(split_file.read_text())
            recorded = (split["format"], split["listing_sha256"], split["train"], split["test"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataNotFoundError(
                f"split file {split_file} is unreadable ({error}); delete it to write it again"
            ) from error
        if recorded[0] != SPLIT_FORMAT:
            raise DataNotFoundError(f"{split_file} is not a clbench ImageNet-R split file")
        if recorded[1] != digest:
            raise DataNotFoundError(
                f"split file {split_file} was written for another set of images "
                f"({split.get('num_files')} files; {len(files)} are present now). Restore the "
                f"images (delete {split_file.parent / 'images'} and run `clbench download "
                "imagenet-r`), or delete the split file to split the present images anew"
            )
        return split
    parts = make_split(files)
    split = {
        "format": SPLIT_FORMAT,
        "note": "ImageNet-R train/test split made by clbench (scenarios/imagenet_r.py)",
        "seed": SPLIT_SEED,
        "test_fraction": TEST_FRACTION,
        "num_files": len(files),
        "listing_sha256": digest,
        "counts": {"train": len(parts["train"]), "test": len(parts["test"])},
        **parts,
    }
    atomic_write_text(split_file, json.dumps(split, indent=0))
    return split


# -------------------------------------------------------------------------- class names


def read_class_names(images: Path, wnids: Sequence[str]) -> list[str]:
    """Names from the archive's README.txt ("n01443537 goldfish" lines) where it has them."""
    names: dict[str, str] = {}
    readme = images / "README.txt"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            match = re.match(r"^\s*(n\d{8})\s+(.+?)\s*$", line)
            if match:
                names[match.group(1)] = match.group(2)
    return [names.get(w, w) for w in wnids]


def check_imagenet_r_options(options: ImageNetROptions) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    options.task_split(IMAGENET_R_CLASSES, "imagenet-r")
    resolve_class_order(options.class_order, IMAGENET_R_CLASSES, 0, options.class_order_seed)
    if not 0 < options.crop_scale_min <= 1:
        raise UsageError(f"crop_scale_min must be in (0, 1] (got {options.crop_scale_min})")


def describe_imagenet_r(options: ImageNetROptions) -> str:
    return (
        f"{protocol_line(options, IMAGENET_R_CLASSES, 'imagenet-r')}; 30,000 images, "
        "24,000 train / 6,000 test (fixed 80/20 split file)"
    )


@SCENARIOS.register(
    "imagenet-r",
    "ImageNet-R (200 classes), 10 tasks x 20 classes, fixed 80/20 split file; downloads 2.1 GB",
    spec=ScenarioSpec(
        default_backbone="vit-b16-in21k",
        modality="vision",
        family="vision",
        data_status=IMAGENET_R.status,
        download=fetch_imagenet_r,
        check_options=check_imagenet_r_options,
        describe=describe_imagenet_r,
    ),
)
def imagenet_r(options: ImageNetROptions, encoder: Any, seed: int) -> Scenario:
    check_imagenet_r_options(options)
    size = require_vision_encoder(encoder, "imagenet-r")
    data_root = default_data_root()
    folder = IMAGENET_R.folder(data_root)
    images = IMAGENET_R.ensure(options, data_root, fetch=fetch_imagenet_r)
    split = load_or_write_split(folder / SPLIT_FILE, list_image_files(images))
    wnids = sorted({path.split("/", 1)[0] for path in split["train"] + split["test"]})
    # the real archive has 200 classes; a smaller archive (a test's) must still split
    tasks = options.task_split(len(wnids), "imagenet-r")
    class_order = resolve_class_order(
        options.class_order, len(wnids), seed, options.class_order_seed
    )
    class_id = {w: i for i, w in enumerate(wnids)}

    def dataset(paths: list[str]) -> ImageFileDataset:
        return ImageFileDataset(images, paths, [class_id[p.split("/", 1)[0]] for p in paths])

    train, test = dataset(split["train"]), dataset(split["test"])
    train_transform, eval_transform = vit_transforms(
        size,
        encoder,
        options.normalize,
        augment=options.augment,
        crop_scale=(options.crop_scale_min, 1.0),
    )
    announce("imagenet-r", tasks)
    return image_scenario(
        "imagenet-r",
        train=train,
        test=test,
        class_order=class_order,
        tasks=tasks,
        transforms=(train_transform, eval_transform),
        class_names=read_class_names(images, wnids),
        data_folder=str(images),
        class_order_kind=options.class_order,
        seed=seed,
        encoder=encoder,
        extra_details={"split_file": str(folder / SPLIT_FILE), "wnids": wnids},
    )

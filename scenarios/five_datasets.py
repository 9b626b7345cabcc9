"""5-datasets: SVHN, MNIST, CIFAR-10, notMNIST and Fashion-MNIST, one task each.

The order and label offsets are those of the prompt papers' code (DualPrompt's PyTorch
port, on which HiDe-Prompt and NoRGa build): SVHN 0-9, MNIST 10-19, CIFAR-10 20-29,
notMNIST 30-39, Fashion-MNIST 40-49, each data set's own train / test split, no class
shuffle. ``datasets=`` reorders them or leaves some out. Images keep their own size in
memory (uint8; grey ones one channel, expanded to three per item); the ViT transforms
resize them per item, in the DataLoader workers (train: RandomResizedCrop(scale=(0.05,
1)) + flip, as HiDe-Prompt's build_transform does for every data set).

Sources (the files and md5s of torchvision's datasets module):

* SVHN: http://ufldl.stanford.edu/housenumbers/ train_32x32.mat, test_32x32.mat
* MNIST: https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's first mirror)
* CIFAR-10: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
* Fashion-MNIST: http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/
* notMNIST: nobody publishes a checksum. The papers' code downloads notMNIST.zip from
  the Adversarial Continual Learning repository; clbench takes that file (or its
  extracted ``notMNIST/`` folder) from the data root, and downloads it only with an md5
  given by the user (``notmnist_md5``). :func:`notmnist_how_to` says so when it is missing.

Layout under the data root::

    5-datasets/svhn/{train,test}_32x32.mat
    5-datasets/mnist/*-ubyte.gz, 5-datasets/fashion-mnist/*-ubyte.gz
    5-datasets/cifar10/cifar-10-python.tar.gz and cifar-10-batches-py/
    5-datasets/notmnist/notMNIST.zip (optional) and notMNIST/{Train,Test}/{A..J}/*.png
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.config import Options, option
from clbench.data.download import (
    ProgressCallback,
    download,
    download_and_extract,
    extract_zip,
)
from clbench.data.five_datasets_files import (  # torch-free: `clbench list` probes with them
    CIFAR10_TOP_LEVEL,
    FOLDER,
    MNIST_FILES,
    NOTMNIST_URL,
    SCENARIO,
    SOURCES,
    data_status,
    notmnist_folder,
    notmnist_how_to,
    resources,
    source_present,
)
from clbench.data.image_formats import (
    ImagesAndLabels,
    load_cifar_batches,
    load_class_folders,
    load_idx_pair,
    load_svhn_mat,
    unpickle_cifar,
)
from clbench.data.images import StackedImages
from clbench.data.splits import (
    TaskSplit,
    TaskSplitOptions,
    announce,
    increment_option,
    initial_classes_option,
    split_details,
    task_sizes_option,
)
from clbench.data.vision import (
    Normalization,
    class_incremental_with_transforms,
    normalize_option,
    require_vision_encoder,
    vit_transforms,
)
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import Scenario, ScenarioSpec, default_data_root

CLASSES_PER_DATASET = 10
PAPER_ORDER = ("svhn", "mnist", "cifar10", "notmnist", "fashion-mnist")


NOTMNIST_CLASSES = tuple("ABCDEFGHIJ")


@dataclass
class FiveDatasetsOptions(TaskSplitOptions, Options):
    num_experiences: int | None = option(None, "number of equal tasks (default: one per data set)")
    task_sizes: list[int] = task_sizes_option()
    initial_classes: int = initial_classes_option()
    increment: int = increment_option()
    datasets: list[str] = option(
        list(PAPER_ORDER), f"the data sets in task order, any of {', '.join(PAPER_ORDER)}"
    )
    augment: bool = option(
        True, "RandomResizedCrop(scale=(crop_scale_min, 1)) + flip for training images"
    )
    normalize: Normalization = normalize_option()
    crop_scale_min: float = option(0.05, "smallest crop area fraction (HiDe-Prompt's 0.05)")
    download: bool = option(True, "download missing data into the data root")
    mirror: str = option(
        "", "URL prefix serving <data set>/<file> for every file (default: the publishers)"
    )
    notmnist_url: str = option(NOTMNIST_URL, "where notMNIST.zip comes from (with notmnist_md5)")
    notmnist_md5: str = option(
        "", "md5 of notMNIST.zip; no source publishes one, so it is fetched only with yours"
    )


# ------------------------------------------------------------------------------- files


def fetch_source(
    key: str,
    folder: Path,
    options: FiveDatasetsOptions,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Download (and extract) one source; notMNIST without an md5 is explained, not fetched."""
    if key == "cifar10":
        extracted = folder / CIFAR10_TOP_LEVEL
        resource = resources(key, options)[0]
        download_and_extract(
            resource, folder, CIFAR10_TOP_LEVEL, extracted, log=log, progress=progress
        )
        return
    if key == "notmnist":
        fetch_notmnist(folder, options, log=log, progress=progress)
        return
    for resource in resources(key, options):
        download(resource, folder, log=log, progress=progress)


def fetch_notmnist(
    folder: Path,
    options: FiveDatasetsOptions,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    extracted = notmnist_folder(folder)
    if (extracted / "Train").is_dir() and (extracted / "Test").is_dir():
        return
    zipped = folder / "notMNIST.zip"
    checks = resources("notmnist", options)
    if checks:  # the user's md5: verify a present file, or download one
        zipped = download(checks[0], folder, log=log, progress=progress)
    elif not zipped.is_file():
        raise DataNotFoundError(
            f"notMNIST not found (looked in: {folder}); {notmnist_how_to(folder)}"
        )
    extract_zip(zipped, extracted, "notMNIST")


def fetch(
    options: FiveDatasetsOptions,
    data_root: Path,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Every selected source, fetched and verified; notMNIST last, as it may need a
    manual step (its error then comes after the others are in place)."""
    check_sources(options)
    root = Path(data_root) / FOLDER
    for key in sorted(options.datasets, key=lambda k: k == "notmnist"):
        fetch_source(key, root / key, options, log=log, progress=progress)
    return root


# ------------------------------------------------------------------------------ loading


def load_source(key: str, folder: Path) -> tuple[ImagesAndLabels, ImagesAndLabels, list[str]]:
    """(train, test, class names) of one source, labels 0..9."""
    if key == "svhn":
        train = load_svhn_mat(folder / "train_32x32.mat", SCENARIO)
        test = load_svhn_mat(folder / "test_32x32.mat", SCENARIO)
    elif key in ("mnist", "fashion-mnist"):
        train = load_idx_pair(folder / MNIST_FILES[0], folder / MNIST_FILES[1], SCENARIO)
        test = load_idx_pair(folder / MNIST_FILES[2], folder / MNIST_FILES[3], SCENARIO)
    elif key == "cifar10":
        batches = folder / CIFAR10_TOP_LEVEL
        names = [f"data_batch_{i}" for i in range(1, 6)]
        train = load_cifar_batches(batches, names, "labels", "CIFAR-10", SCENARIO)
        test = load_cifar_batches(batches, ["test_batch"], "labels", "CIFAR-10", SCENARIO)
        meta = unpickle_cifar(batches / "batches.meta", "CIFAR-10", SCENARIO)
        return train, test, list(meta["label_names"])
    else:
        train = load_class_folders(notmnist_folder(folder) / "Train", NOTMNIST_CLASSES, SCENARIO)
        test = load_class_folders(notmnist_folder(folder) / "Test", NOTMNIST_CLASSES, SCENARIO)
        return train, test, list(NOTMNIST_CLASSES)
    return train, test, list(SOURCES[key].class_names)


def _check_labels(key: str, folder: Path, parts: tuple[ImagesAndLabels, ...]) -> None:
    for _, labels in parts:
        present = sorted(set(labels.tolist()))
        if present != list(range(CLASSES_PER_DATASET)):
            raise DataNotFoundError(
                f"{SOURCES[key].title} in {folder} has the labels {present}, not 0..9; "
                f"delete {folder} and run `clbench download {SCENARIO}` again"
            )


# ----------------------------------------------------------------------------- protocol


def check_sources(options: FiveDatasetsOptions) -> None:
    """The options that say what to fetch (``clbench download`` checks these too)."""
    unknown = [key for key in options.datasets if key not in SOURCES]
    if unknown or not options.datasets or len(set(options.datasets)) != len(options.datasets):
        raise UsageError(
            f"scenario {SCENARIO}: datasets must name each of {', '.join(PAPER_ORDER)} at "
            f"most once (got {','.join(options.datasets) or 'none'})"
        )
    if options.notmnist_md5 and not re.fullmatch(r"[0-9a-fA-F]{32}", options.notmnist_md5):
        raise UsageError(f"notmnist_md5 must be 32 hex digits (got {options.notmnist_md5!r})")


def check_options(options: FiveDatasetsOptions) -> None:
    """The checks that need no data: run before a run folder exists."""
    check_sources(options)
    task_split(options)
    if not 0 < options.crop_scale_min <= 1:
        raise UsageError(f"crop_scale_min must be in (0, 1] (got {options.crop_scale_min})")


def task_split(options: FiveDatasetsOptions) -> TaskSplit:
    """One task per data set unless the split options say otherwise."""
    num_classes = CLASSES_PER_DATASET * len(options.datasets)
    if options.num_experiences is None and not (options.task_sizes or options.initial_classes):
        return TaskSplit((CLASSES_PER_DATASET,) * len(options.datasets))
    return options.task_split(num_classes, SCENARIO)


def describe(options: FiveDatasetsOptions) -> str:
    titles = ", ".join(SOURCES[k].title for k in options.datasets if k in SOURCES)
    try:
        split = task_split(options).describe()
    except UsageError as error:
        return f"{titles}; the options give no split ({error})"
    return f"{CLASSES_PER_DATASET * len(options.datasets)} classes, {split}: {titles}"


@SCENARIOS.register(
    SCENARIO,
    "SVHN, MNIST, CIFAR-10, notMNIST, Fashion-MNIST as 5 tasks x 10 classes (the prompt "
    "papers' order); downloads 0.45 GB, notMNIST user-supplied",
    spec=ScenarioSpec(
        default_backbone="vit-b16-in21k",
        modality="vision",
        family="vision",
        data_status=data_status,
        download=fetch,
        check_options=check_options,
        describe=describe,
    ),
)
def five_datasets(options: FiveDatasetsOptions, encoder: Any, seed: int) -> Scenario:
    check_options(options)
    tasks = task_split(options)
    size = require_vision_encoder(encoder, SCENARIO)
    root = default_data_root() / FOLDER
    missing = [k for k in options.datasets if not source_present(k, root / k, options)]
    if missing and not options.download:
        raise DataNotFoundError(
            f"5-datasets: {', '.join(SOURCES[k].title for k in missing)} not found (looked "
            f"in: {root}); {data_status(options, default_data_root()).how_to_get}"
        )
    for key in sorted(missing, key=lambda k: k == "notmnist"):
        fetch_source(key, root / key, options)
    if "notmnist" in options.datasets:  # a zip put in place by hand is extracted once
        fetch_notmnist(root / "notmnist", options)
    train_parts: list[ImagesAndLabels] = []
    test_parts: list[ImagesAndLabels] = []
    class_names: list[str] = []
    per_dataset: dict[str, dict[str, int]] = {}
    for index, key in enumerate(options.datasets):
        train, test, names = load_source(key, root / key)
        _check_labels(key, root / key, (train, test))
        offset = CLASSES_PER_DATASET * index
        train_parts.append((train[0], train[1] + offset))
        test_parts.append((test[0], test[1] + offset))
        class_names.extend(f"{SOURCES[key].title} {name}" for name in names)
        per_dataset[key] = {"train": len(train[1]), "test": len(test[1])}
    train_set, test_set = StackedImages(train_parts), StackedImages(test_parts)
    train_transform, eval_transform = vit_transforms(
        size,
        encoder,
        options.normalize,
        augment=options.augment,
        crop_scale=(options.crop_scale_min, 1.0),
    )
    class_order = list(range(len(class_names)))  # the data sets' order is the task order
    announce(SCENARIO, tasks)
    benchmark, classes = class_incremental_with_transforms(
        train_set, test_set, class_order, tasks, train_transform, eval_transform
    )
    return Scenario(
        name=SCENARIO,
        benchmark=benchmark,
        classes_per_experience=classes,
        class_names=class_names,
        modality="vision",
        details={
            **split_details(tasks),
            "data_folder": str(root),
            "datasets": list(options.datasets),
            "class_order": class_order,
            "seed": seed,
            "counts": {"train": len(train_set), "test": len(test_set)},
            "per_dataset": per_dataset,
            "input_size": tuple(encoder.input_size),
            "train_transform": repr(train_transform),
            "eval_transform": repr(eval_transform),
        },
    )

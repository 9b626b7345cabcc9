"""Split CIFAR-100: 100 classes in 10 tasks of 10 (REFERENCE.md, "Scenario protocols").

The class order is NoRGa's (``random.seed(seed); random.shuffle(list(range(100)))``: task 1
for seed 42 is 42, 41, 91, 9, 65, 50, 1, 70, 15, 78); ``class_order=natural`` gives the
0..99 order of HiDe-Prompt's scripts. Images stay uint8 in memory (150 MB for the training
set); resizing to the backbone's input and the augmentation run per item, in the
DataLoader's worker processes, through Avalanche transform groups ("train" augments,
"eval" does Resize(256/224 x size) + CenterCrop(size), as for ImageNet).

The vision helpers here (transforms, transform-group benchmark, encoder check) serve
``imagenet_r.py`` too.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from clbench.config import Options, option
from clbench.download import DataStatus, Resource, download_and_extract, is_complete
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import (
    Scenario,
    TensorClassificationDataset,
    default_data_root,
    seeded_class_order,
    split_into_tasks,
)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # published with torchvision's CIFAR100
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_TOP_LEVEL = "cifar-100-python"
CIFAR100_CLASSES = 100

ClassOrder = Literal["seed", "natural"]
CLASS_ORDERS: tuple[str, ...] = ("seed", "natural")


# --------------------------------------------------------------------- shared vision bits


def require_vision_encoder(encoder: Any, scenario: str) -> tuple[int, int]:
    """The encoder's (height, width); a text backbone is refused before any data work."""
    if getattr(encoder, "modality", None) != "vision" or not hasattr(encoder, "input_size"):
        raise UsageError(
            f"scenario {scenario} needs a vision backbone, e.g. vit-b16-in21k or "
            f"vit-tiny-random (got a {getattr(encoder, 'modality', None) or type(encoder).__name__}"
            " backbone)"
        )
    return int(encoder.input_size[1]), int(encoder.input_size[2])


def check_task_count(num_classes: int, num_experiences: int, scenario: str) -> None:
    if num_experiences < 1 or num_classes % num_experiences:
        raise UsageError(
            f"scenario {scenario}: cannot split {num_classes} classes into {num_experiences} "
            f"equal tasks (num_experiences must divide {num_classes})"
        )


def resolve_class_order(kind: str, num_classes: int, seed: int) -> list[int]:
    if kind == "seed":
        return seeded_class_order(num_classes, seed)
    if kind == "natural":
        return list(range(num_classes))
    raise UsageError(f"unknown class_order {kind!r}; expected one of {', '.join(CLASS_ORDERS)}")


def vit_train_transform(
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.08, 1.0),
) -> Any:
    """RandomResizedCrop(size, scale) + horizontal flip, on uint8 [3, H, W] tensors."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def vit_eval_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Any:
    """Resize the short side to 256/224 of the input size, then a centre crop (ImageNet's)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(round(min(size) * 256 / 224), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def class_incremental_with_transforms(
    train: Any,
    test: Any,
    class_order: Sequence[int],
    num_experiences: int,
    train_transform: Any,
    eval_transform: Any,
) -> tuple[Any, list[list[int]]]:
    """:func:`clbench.scenario.class_incremental`, with Avalanche transform groups.

    Avalanche switches every experience's dataset to its "train" group in
    ``strategy.train`` and to "eval" in ``strategy.eval``; the test datasets start in
    "eval" so that indexing them directly never augments.
    """
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.benchmarks.utils.transform_groups import TransformGroups

    def groups() -> TransformGroups:
        return TransformGroups({"train": train_transform, "eval": eval_transform})

    classes = split_into_tasks(class_order, num_experiences)
    benchmark = class_incremental_benchmark(
        {
            "train": as_classification_dataset(train, transform_groups=groups()),
            "test": as_classification_dataset(test, transform_groups=groups()).eval(),
        },
        class_order=list(class_order),
        num_experiences=num_experiences,
    )
    return benchmark, classes


# ------------------------------------------------------------------------------ CIFAR


@dataclass
class SplitCIFAR100Options(Options):
    num_experiences: int = option(10, "number of tasks (must divide the 100 classes)")
    class_order: ClassOrder = option(
        "seed",
        "seed: random.seed(seed) shuffle of the classes (NoRGa's scripts); "
        "natural: 0..99 (HiDe-Prompt's scripts)",
    )
    augment: bool = option(
        True, "RandomResizedCrop + flip on training images (false: the test transform)"
    )
    download: bool = option(True, "download the data into the data root when it is missing")
    url: str = option(CIFAR100_URL, "where to download cifar-100-python.tar.gz from")
    md5: str = option(CIFAR100_MD5, "md5 of the archive at url")


@dataclass(frozen=True)
class CIFAR100Arrays:
    train_images: Tensor  # uint8 [50000, 3, 32, 32]
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]


def cifar100_folder(data_root: Path) -> Path:
    return Path(data_root) / "cifar100"


def _cifar100_resource(options: SplitCIFAR100Options) -> Resource:
    return Resource(CIFAR100_ARCHIVE, options.url, md5=options.md5)


def cifar100_how_to_get(folder: Path) -> str:
    return (
        f"run `clbench download split-cifar100` (it fetches {CIFAR100_URL}, md5 "
        f"{CIFAR100_MD5}), or put {CIFAR100_ARCHIVE} in {folder} by hand; set $CLBENCH_DATA "
        "or --data-root to use another data root"
    )


def cifar100_data_status(options: SplitCIFAR100Options, data_root: Path) -> DataStatus:
    folder = cifar100_folder(data_root)
    extracted = folder / CIFAR100_TOP_LEVEL
    return DataStatus(
        is_complete(extracted, _cifar100_resource(options)), extracted, cifar100_how_to_get(folder)
    )


def fetch_cifar100(
    options: SplitCIFAR100Options, data_root: Path, log: Any = None, progress: Any = None
) -> Path:
    """Download (if needed), verify and extract; returns the folder with train/test/meta."""
    folder = cifar100_folder(data_root)
    return download_and_extract(
        _cifar100_resource(options),
        folder,
        CIFAR100_TOP_LEVEL,
        folder / CIFAR100_TOP_LEVEL,
        log=log,
        progress=progress,
    )


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataNotFoundError(
            f"CIFAR-100 file {path} not found; delete {path.parent} and run "
            "`clbench download split-cifar100` again"
        )
    try:
        # The python-pickle format is how CIFAR ships; the archive was checksum-verified.
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataNotFoundError(
            f"CIFAR-100 file {path} is corrupt ({error}); delete {path.parent} and run "
            "`clbench download split-cifar100` again"
        ) from error


def load_cifar100(folder: Path) -> CIFAR100Arrays:
    """The python-format CIFAR-100 in ``folder`` (files train, test, meta)."""
    folder = Path(folder)
    meta = _unpickle(folder / "meta")
    arrays = {}
    for split in ("train", "test"):
        raw = _unpickle(folder / split)
        try:
            images = np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(raw["fine_labels"], dtype=np.int64)
        except (KeyError, ValueError) as error:
            raise DataNotFoundError(
                f"CIFAR-100 file {folder / split} is not in the python CIFAR-100 format "
                f"({error}); delete {folder} and download it again"
            ) from error
        if len(images) != len(labels):
            raise DataNotFoundError(f"{folder / split}: {len(images)} images, {len(labels)} labels")
        arrays[split] = (torch.from_numpy(images.copy()), torch.from_numpy(labels))
    return CIFAR100Arrays(
        *arrays["train"], *arrays["test"], class_names=list(meta["fine_label_names"])
    )


def check_cifar100_options(options: SplitCIFAR100Options) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    check_task_count(CIFAR100_CLASSES, options.num_experiences, "split-cifar100")
    resolve_class_order(options.class_order, CIFAR100_CLASSES, 0)


@SCENARIOS.register(
    "split-cifar100",
    "CIFAR-100, 10 tasks x 10 classes, seeded class order (class_order=natural for HiDe's); "
    "downloads 161 MB",
)
def split_cifar100(options: SplitCIFAR100Options, encoder: Any, seed: int) -> Scenario:
    # Bad options and a wrong backbone are refused before any download.
    check_cifar100_options(options)
    class_order = resolve_class_order(options.class_order, CIFAR100_CLASSES, seed)
    size = require_vision_encoder(encoder, "split-cifar100")
    data_root = default_data_root()
    status = cifar100_data_status(options, data_root)
    if not status.present:
        if not options.download:
            raise DataNotFoundError(
                f"CIFAR-100 not found (looked in: {status.location}); {status.how_to_get}"
            )
        fetch_cifar100(options, data_root)
    data = load_cifar100(status.location)
    if sorted(set(data.train_labels.tolist())) != list(range(CIFAR100_CLASSES)):
        raise DataNotFoundError(f"{status.location}/train does not hold all 100 classes")
    eval_transform = vit_eval_transform(size, encoder.mean, encoder.std)
    train_transform = (
        vit_train_transform(size, encoder.mean, encoder.std) if options.augment else eval_transform
    )
    train = TensorClassificationDataset(data.train_images, data.train_labels)
    test = TensorClassificationDataset(data.test_images, data.test_labels)
    benchmark, classes = class_incremental_with_transforms(
        train, test, class_order, options.num_experiences, train_transform, eval_transform
    )
    return Scenario(
        name="split-cifar100",
        benchmark=benchmark,
        classes_per_experience=classes,
        class_names=data.class_names,
        modality="vision",
        details={
            "data_folder": str(status.location),
            "class_order": class_order,
            "class_order_kind": options.class_order,
            "seed": seed,
            "counts": {"train": len(train), "test": len(test)},
            "input_size": tuple(encoder.input_size),
            "train_transform": repr(train_transform),
            "eval_transform": repr(eval_transform),
        },
    )


split_cifar100.default_backbone = "vit-b16-in21k"
split_cifar100.data_status = cifar100_data_status
split_cifar100.download = fetch_cifar100
split_cifar100.check_options = check_cifar100_options

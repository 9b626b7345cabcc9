"""Split CIFAR-100: 100 classes in 10 tasks of 10 (REFERENCE.md, "Scenario protocols").

The class order is NoRGa's (``random.seed(seed); random.shuffle(list(range(100)))``: task 1
for seed 42 is 42, 41, 91, 9, 65, 50, 1, 70, 15, 78); ``class_order=natural`` gives the
0..99 order of HiDe-Prompt's scripts. Images stay uint8 in memory (150 MB for the training
set); resizing to the backbone's input and the augmentation run per item, in the
DataLoader's worker processes (:mod:`clbench.data.vision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from clbench.config import Options, option
from clbench.data.archive import ArchiveData
from clbench.data.image_formats import load_cifar_batches, unpickle_cifar
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
from clbench.errors import DataNotFoundError
from clbench.registry import SCENARIOS
from clbench.scenario import (
    Scenario,
    ScenarioSpec,
    TensorClassificationDataset,
    default_data_root,
)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # published with torchvision's CIFAR100
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_TOP_LEVEL = "cifar-100-python"
CIFAR100_CLASSES = 100

CIFAR100 = ArchiveData(
    title="CIFAR-100",
    scenario="split-cifar100",
    folder_name="cifar100",
    archive=CIFAR100_ARCHIVE,
    top_level=CIFAR100_TOP_LEVEL,
    extracted=CIFAR100_TOP_LEVEL,
    url=CIFAR100_URL,
    md5=CIFAR100_MD5,
)


@dataclass
class SplitCIFAR100Options(TaskSplitOptions, Options):
    num_experiences: int = option(10, "number of tasks (must divide the 100 classes)")
    task_sizes: list[int] = task_sizes_option()
    initial_classes: int = initial_classes_option()
    increment: int = increment_option()
    class_order: ClassOrder = option(
        "seed",
        "seed: random.seed(seed) shuffle of the classes (NoRGa's scripts); "
        "natural: 0..99 (HiDe-Prompt's scripts)",
    )
    class_order_seed: int = class_order_seed_option()
    augment: bool = option(
        True, "RandomResizedCrop + flip on training images (false: the test transform)"
    )
    normalize: Normalization = normalize_option()
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


def load_cifar100(folder: Path) -> CIFAR100Arrays:
    """The python-format CIFAR-100 in ``folder`` (files train, test, meta)."""
    folder = Path(folder)
    meta = unpickle_cifar(folder / "meta", "CIFAR-100", "split-cifar100")
    train = load_cifar_batches(folder, ["train"], "fine_labels", "CIFAR-100", "split-cifar100")
    test = load_cifar_batches(folder, ["test"], "fine_labels", "CIFAR-100", "split-cifar100")
    return CIFAR100Arrays(*train, *test, class_names=list(meta["fine_label_names"]))


def check_cifar100_options(options: SplitCIFAR100Options) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    options.task_split(CIFAR100_CLASSES, "split-cifar100")
    resolve_class_order(options.class_order, CIFAR100_CLASSES, 0, options.class_order_seed)


def describe_cifar100(options: SplitCIFAR100Options) -> str:
    order = "seeded class order" if options.class_order == "seed" else "classes 0..99 in order"
    if options.class_order_seed >= 0:
        order = f"the class order of seed {options.class_order_seed}"
    return (
        f"{protocol_line(options, CIFAR100_CLASSES, 'split-cifar100')}, {order}; "
        "500 train / 100 test images per class"
    )


@SCENARIOS.register(
    "split-cifar100",
    "CIFAR-100, 10 tasks x 10 classes, seeded class order (class_order=natural for HiDe's); "
    "downloads 161 MB",
    spec=ScenarioSpec(
        default_backbone="vit-b16-in21k",
        modality="vision",
        family="vision",
        data_status=CIFAR100.status,
        download=CIFAR100.fetch,
        check_options=check_cifar100_options,
        describe=describe_cifar100,
    ),
)
def split_cifar100(options: SplitCIFAR100Options, encoder: Any, seed: int) -> Scenario:
    # Bad options and a wrong backbone are refused before any download.
    check_cifar100_options(options)
    tasks = options.task_split(CIFAR100_CLASSES, "split-cifar100")
    class_order = resolve_class_order(
        options.class_order, CIFAR100_CLASSES, seed, options.class_order_seed
    )
    size = require_vision_encoder(encoder, "split-cifar100")
    folder = CIFAR100.ensure(options, default_data_root())
    data = load_cifar100(folder)
    if sorted(set(data.train_labels.tolist())) != list(range(CIFAR100_CLASSES)):
        raise DataNotFoundError(f"{folder}/train does not hold all 100 classes")
    train_transform, eval_transform = vit_transforms(
        size, encoder, options.normalize, augment=options.augment
    )
    train = TensorClassificationDataset(data.train_images, data.train_labels)
    test = TensorClassificationDataset(data.test_images, data.test_labels)
    announce("split-cifar100", tasks)
    return image_scenario(
        "split-cifar100",
        train=train,
        test=test,
        class_order=class_order,
        tasks=tasks,
        transforms=(train_transform, eval_transform),
        class_names=data.class_names,
        data_folder=str(folder),
        class_order_kind=options.class_order,
        seed=seed,
        encoder=encoder,
    )

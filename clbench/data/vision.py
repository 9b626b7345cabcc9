"""Vision pieces the image scenarios share: the backbone check, class orders, the ViT
train / eval transforms and the class-incremental benchmark with transform groups.

Images stay uint8 in memory; resizing and augmentation run per item, in the DataLoader's
worker processes, through Avalanche transform groups ("train" augments, "eval" does
Resize(256/224 x size) + CenterCrop(size), as for ImageNet).

Input normalisation is a scenario option (``normalize``). The default feeds the backbone
what its weights were trained with (its own mean / std); the authors' codes do not, and
their numbers were made with what they do (fidelity-prompt-family.md H25, L11, C10):
HiDe-Prompt, NoRGa and hier-OT normalise CIFAR-100 with CIFAR-100's own mean / std and
leave ImageNet-R, CUB-200 and 5-datasets in [0, 1]; L2P / DualPrompt (JAX) use [0, 1];
CODA-Prompt's mean 0 / std 1 is [0, 1] too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from clbench.config import option
from clbench.data.splits import TaskSplit, added_option, split_details
from clbench.errors import UsageError
from clbench.scenario import Scenario, seeded_class_order, split_into_tasks

ClassOrder = Literal["seed", "natural"]
CLASS_ORDERS: tuple[str, ...] = ("seed", "natural")


def require_vision_encoder(
    encoder: Any, scenario: str, examples: str = "vit-b16-in21k or vit-tiny-random"
) -> tuple[int, int]:
    """The encoder's (height, width); a text backbone is refused before any data work."""
    if getattr(encoder, "modality", None) != "vision" or not hasattr(encoder, "input_size"):
        raise UsageError(
            f"scenario {scenario} needs a vision backbone, e.g. {examples} "
            f"(got a {getattr(encoder, 'modality', None) or type(encoder).__name__} backbone)"
        )
    return int(encoder.input_size[1]), int(encoder.input_size[2])


def class_order_seed_option() -> Any:
    """The seed of ``class_order=seed``'s shuffle when it is not the run's own: one class
    order for every training seed (an authors' label tree follows one order)."""
    return added_option(
        -1,
        "class_order=seed: shuffle the classes with this seed instead of the run's --seed "
        "(-1), so that every training seed keeps one class order",
    )


def resolve_class_order(kind: str, num_classes: int, seed: int, order_seed: int = -1) -> list[int]:
    """``seed``: NoRGa's ``random.seed(seed)`` shuffle (of ``order_seed`` when >= 0);
    ``natural``: 0..n-1 (HiDe's)."""
    if order_seed != -1 and (kind != "seed" or order_seed < 0):
        raise UsageError(
            f"class_order_seed={order_seed} needs class_order=seed and a seed >= 0 (-1: the "
            "run's seed)"
        )
    if kind == "seed":
        return seeded_class_order(num_classes, seed if order_seed < 0 else order_seed)
    if kind == "natural":
        return list(range(num_classes))
    raise UsageError(f"unknown class_order {kind!r}; expected one of {', '.join(CLASS_ORDERS)}")


Normalization = Literal["backbone", "cifar100", "none"]
NORMALIZATIONS: tuple[str, ...] = ("backbone", "cifar100", "none")
# CIFAR-100's training-set statistics, as HiDe-Prompt's / NoRGa's datasets.py write them
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
Statistics = tuple[Sequence[float], Sequence[float]]


NORMALIZE_HELP = (
    "input normalisation: backbone = the backbone's own mean / std (what its weights "
    "were trained with); cifar100 = CIFAR-100's mean / std; none = pixels in [0, 1]"
)


def normalize_option() -> Any:
    """The ``normalize`` option every image scenario of the papers declares: anything but
    the backbone's statistics is an authors'-code quirk there (tables mark it)."""
    return option(
        "backbone",
        NORMALIZE_HELP,
        quirk="the authors' codes normalise per data set, not per backbone: HiDe-Prompt / "
        "NoRGa / hier-OT datasets.py use cifar100 on CIFAR-100 and none on ImageNet-R, "
        "CUB-200 and 5-datasets; L2P / DualPrompt (JAX norm_01) and CODA-Prompt use none",
    )


def input_statistics(normalization: str, encoder: Any) -> Statistics | None:
    """(mean, std) to normalise [0, 1] pixels with; None: leave them in [0, 1]."""
    if normalization == "backbone":
        return tuple(encoder.mean), tuple(encoder.std)
    if normalization == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    if normalization == "none":
        return None
    raise UsageError(
        f"unknown normalize {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}"
    )


def _to_model_input(statistics: Statistics | None) -> list[Any]:
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToDtype(torch.float32, scale=True)]  # uint8 -> [0, 1]
    if statistics is not None:
        steps.append(v2.Normalize(list(statistics[0]), list(statistics[1])))
    return steps


def vit_train_transform(
    size: tuple[int, int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Any:
    """RandomResizedCrop(size, scale) + horizontal flip, on uint8 [3, H, W] tensors
    (``mean`` None: the pixels stay in [0, 1])."""
    from torchvision.transforms import v2

    statistics = None if mean is None or std is None else (mean, std)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_model_input(statistics),
        ]
    )


def vit_eval_transform(
    size: tuple[int, int], mean: Sequence[float] | None, std: Sequence[float] | None
) -> Any:
    """Resize the short side to 256/224 of the input size, then a centre crop (ImageNet's)."""
    from torchvision.transforms import v2

    statistics = None if mean is None or std is None else (mean, std)
    return v2.Compose(
        [
            v2.Resize(round(min(size) * 256 / 224), antialias=True),
            v2.CenterCrop(size),
            *_to_model_input(statistics),
        ]
    )


def vit_transforms(
    size: tuple[int, int],
    encoder: Any,
    normalization: str,
    *,
    augment: bool,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> tuple[Any, Any]:
    """(train, eval) transforms of an image scenario; without ``augment`` the training
    images get the eval transform."""
    statistics = input_statistics(normalization, encoder)
    mean, std = statistics if statistics is not None else (None, None)
    eval_transform = vit_eval_transform(size, mean, std)
    if not augment:
        return eval_transform, eval_transform
    return vit_train_transform(size, mean, std, crop_scale), eval_transform


def class_incremental_with_transforms(
    train: Any,
    test: Any,
    class_order: Sequence[int],
    tasks: int | TaskSplit,
    train_transform: Any,
    eval_transform: Any,
) -> tuple[Any, list[list[int]]]:
    """:func:`clbench.scenario.class_incremental`, with Avalanche transform groups
    (``tasks``: a number of equal tasks or a :class:`~clbench.data.splits.TaskSplit`).

    Avalanche switches every experience's dataset to its "train" group in
    ``strategy.train`` and to "eval" in ``strategy.eval``; the test datasets start in
    "eval" so that indexing them directly never augments.
    """
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.benchmarks.utils.transform_groups import TransformGroups

    def groups() -> TransformGroups:
        return TransformGroups({"train": train_transform, "eval": eval_transform})

    classes = split_into_tasks(class_order, tasks)
    benchmark = class_incremental_benchmark(
        {
            "train": as_classification_dataset(train, transform_groups=groups()),
            "test": as_classification_dataset(test, transform_groups=groups()).eval(),
        },
        class_order=list(class_order),
        num_classes_per_exp=[len(c) for c in classes],
    )
    return benchmark, classes


def image_scenario(
    name: str,
    *,
    train: Any,
    test: Any,
    class_order: Sequence[int],
    tasks: TaskSplit,
    transforms: tuple[Any, Any],
    class_names: list[str],
    data_folder: str,
    class_order_kind: str,
    seed: int,
    encoder: Any,
    extra_details: dict[str, Any] | None = None,
) -> Scenario:
    """The :class:`Scenario` of an image data set split class-incrementally, with the
    details every image scenario records (``extra_details`` follow the data folder)."""
    train_transform, eval_transform = transforms
    benchmark, classes = class_incremental_with_transforms(
        train, test, class_order, tasks, train_transform, eval_transform
    )
    return Scenario(
        name=name,
        benchmark=benchmark,
        classes_per_experience=classes,
        class_names=class_names,
        modality="vision",
        details={
            **split_details(tasks),
            "data_folder": data_folder,
            **(extra_details or {}),
            "class_order": class_order,
            "class_order_kind": class_order_kind,
            "seed": seed,
            "counts": {"train": len(train), "test": len(test)},
            "input_size": tuple(encoder.input_size),
            "train_transform": repr(train_transform),
            "eval_transform": repr(eval_transform),
        },
    )

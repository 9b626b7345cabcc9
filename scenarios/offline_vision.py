"""Small vision scenarios that need no download (smoke runs, tests, CI)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clbench.config import Options, option
from clbench.data.splits import (
    TaskSplitOptions,
    added_option,
    announce,
    increment_option,
    initial_classes_option,
    protocol_line,
    split_details,
    task_sizes_option,
)
from clbench.data.vision import (
    NORMALIZE_HELP,
    Normalization,
    input_statistics,
    require_vision_encoder,
)
from clbench.errors import UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import (
    Scenario,
    ScenarioSpec,
    TensorClassificationDataset,
    class_incremental,
    seeded_class_order,
)

# The train/test split never moves with the run seed: runs with different seeds must be
# scored on the same test images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


DIGITS_CLASSES = 10


@dataclass
class DigitsOptions(TaskSplitOptions, Options):
    num_experiences: int = option(5, "number of tasks (10 classes split equally)")
    task_sizes: list[int] = task_sizes_option()
    initial_classes: int = initial_classes_option()
    increment: int = increment_option()
    # recorded only when set (config.json and sweep identities of earlier runs stay); no
    # paper runs on digits, so [0, 1] pixels are a plain setting here, not a quirk
    normalize: Normalization = added_option("backbone", NORMALIZE_HELP)
    train_per_class: int = added_option(
        0,
        "training images per class, the first ones of the fixed 80% split (0: all of "
        "them, 141-146); the test images stay whole",
    )


def check_digits_options(options: DigitsOptions) -> None:
    """The split checks (the 10 classes are known): run before a run folder exists."""
    options.task_split(DIGITS_CLASSES, "digits-offline")
    if options.train_per_class < 0:
        raise UsageError(
            f"train_per_class must be 0 (all) or a positive count, got {options.train_per_class}"
        )


def describe_digits(options: DigitsOptions) -> str:
    line = protocol_line(options, DIGITS_CLASSES, "digits-offline") + ", 80/20 split per class"
    if options.train_per_class:
        line += f", {options.train_per_class} training images per class"
    return line


class Normalise:
    """uint8 [C, H, W] -> float, scaled to [0, 1] then standardised per channel (mean 0 /
    std 1: left in [0, 1]).

    A class rather than a lambda so DataLoader workers can pickle it.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float().div(255.0).expand(len(self.mean), -1, -1) - self.mean) / self.std


def stratified_split(
    labels: Sequence[int], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Train / test indices with ``round(test_fraction * n_c)`` test items per class c."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        cut = round(test_fraction * len(members))
        test.extend(members[:cut])
        train.extend(members[cut:])
    return sorted(train), sorted(test)


def first_per_class(indices: Sequence[int], labels: Sequence[int], per_class: int) -> list[int]:
    """The first ``per_class`` of ``indices`` of each class (all of them for 0), in order."""
    if per_class == 0:
        return list(indices)
    taken: dict[int, int] = {}
    subset = []
    for i in indices:
        if taken.get(labels[i], 0) < per_class:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            subset.append(i)
    return subset


def resize_images(images: np.ndarray, size: tuple[int, int]) -> Tensor:
    """[N, h, w] grey images in [0, 1] -> uint8 [N, 1, H, W], resized once (bilinear).

    One channel is stored and expanded to three per item by :class:`Normalise`: at
    224 x 224 that is 90 MB instead of 1 GB of float RGB.
    """
    x = torch.from_numpy(images).float().unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


@SCENARIOS.register(
    "digits-offline",
    "scikit-learn's bundled 8x8 digits (1797 images, 10 classes), 5 tasks x 2 classes; offline",
    spec=ScenarioSpec(
        default_backbone="vit-tiny-random",
        modality="vision",
        family="vision",
        protocol="digits",
        check_options=check_digits_options,
        describe=describe_digits,
        # The random tiny ViT's pooled feature barely moves with the image (per-item
        # spread ~0.15 of a unit-scale LayerNorm output); with the digits' zero background
        # kept at 0 a linear read-out separates the ten digits better (ridge on the frozen
        # features: 86% vs 69% with the backbone's [-1, 1]), and a head trained for one
        # epoch finds it. Only here: quick on a pretrained backbone keeps its statistics.
        preset_options={"quick": {"normalize": "none"}},
    ),
)
def digits_offline(options: DigitsOptions, encoder: Any, seed: int) -> Scenario:
    from sklearn.datasets import load_digits

    tasks = options.task_split(DIGITS_CLASSES, "digits-offline")
    size = require_vision_encoder(encoder, "digits-offline", examples="vit-tiny-random")
    digits = load_digits()
    labels = [int(y) for y in digits.target]
    # pixel values are 0..16 in the bundled data
    images = resize_images(digits.images / 16.0, size)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    train_idx = first_per_class(train_idx, labels, options.train_per_class)
    # normalize=none: [0, 1], whose zero background the random tiny ViT separates better
    statistics = input_statistics(options.normalize, encoder) or ((0.0,) * 3, (1.0,) * 3)
    transform = Normalise(*statistics)
    targets = torch.tensor(labels, dtype=torch.long)

    def dataset(indices: list[int]) -> TensorClassificationDataset:
        index = torch.tensor(indices, dtype=torch.long)
        return TensorClassificationDataset(images[index], targets[index], transform)

    train, test = dataset(train_idx), dataset(test_idx)
    class_order = seeded_class_order(DIGITS_CLASSES, seed)
    announce("digits-offline", tasks)
    benchmark, classes = class_incremental(train, test, class_order, tasks)
    return Scenario(
        name="digits-offline",
        benchmark=benchmark,
        classes_per_experience=classes,
        class_names=[str(c) for c in range(DIGITS_CLASSES)],
        modality="vision",
        details={
            **split_details(tasks),
            "source": "sklearn.datasets.load_digits (UCI optical digits, bundled)",
            "split_seed": DIGITS_SPLIT_SEED,
            "test_fraction": DIGITS_TEST_FRACTION,
            "class_order": class_order,
            "seed": seed,
            "counts": {"train": len(train_idx), "test": len(test_idx)},
            "normalize": options.normalize,
            "input_size": tuple(encoder.input_size),
        },
    )

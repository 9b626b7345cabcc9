"""What a run needs to know about a scenario, and the helpers that build one."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from clbench.data.files import default_data_root  # noqa: F401  (torch-free; also from here)
from clbench.data.splits import TaskSplit, check_task_count
from clbench.metrics import FAMILY_METRICS

if TYPE_CHECKING:
    from clbench.data.download import DataStatus, ProgressCallback

Modality = Literal["vision", "text"]
Family = Literal["vision", "relation-extraction"]

# What the tables report for each family lives beside the metrics (torch-free, so that
# the tables can default old runs to it): FAMILY_METRICS is re-exported here.


class DataProbe(Protocol):
    """``data_status(options, data_root)``: whether a scenario's data is on this machine."""

    def __call__(self, options: Any, data_root: Path, /) -> DataStatus: ...


class DataFetcher(Protocol):
    """``download(options, data_root, log=..., progress=...)``: fetch and verify the data;
    returns where it lies. ``log`` receives status lines, ``progress`` byte counts."""

    def __call__(
        self,
        options: Any,
        data_root: Path,
        /,
        log: Callable[[str], None] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Path: ...


@dataclass(frozen=True)
class ScenarioSpec:
    """What travels with a scenario's registered name (as timm's pretrained config does
    with a model's): read by the run loop, ``clbench list`` / ``download`` and, through
    config.json, the tables, so that nobody special-cases a scenario name.

    default_backbone: the backbone a run uses when ``--backbone`` is not given.
    modality / family: input kind, and the kind of task (which metrics the papers report).
    protocol: the paper protocol whose published numbers this scenario is compared with
        (``fewrel`` for ``fewrel-offline``); defaults to the scenario's own name.
    data_status(options, data_root) -> DataStatus: whether the data is on this machine;
        None for data that is built in or generated.
    download(options, data_root): fetch and verify the data (``clbench download``).
    check_options(options): the checks that need no data, run before a run folder exists.
    describe(options) -> str: the protocol those options give, in a line for ``clbench
        list`` ("100 classes, 10 tasks x 10"; the task split included), read without data.
    preset_options: scenario options that a strategy preset of that name sets on this
        scenario, e.g. ``{"quick": {"normalize": "none"}}``: what a smoke run of this
        scenario needs, said once by the scenario instead of in every strategy's preset;
        a strategy preset's own ``scenario.<option>`` keys and the user's --set win.
    """

    default_backbone: str
    modality: Modality
    family: Family
    protocol: str = ""
    data_status: DataProbe | None = None
    download: DataFetcher | None = None
    check_options: Callable[[Any], None] | None = None
    describe: Callable[[Any], str] | None = None
    preset_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        return FAMILY_METRICS[self.family]


@dataclass
class Scenario:
    """An Avalanche benchmark plus its description.

    benchmark: Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream``.
    classes_per_experience: the class ids of each experience, in stream order (lists,
        sorted; Avalanche itself gives sets).
    class_names: name of each class id.
    """

    name: str
    benchmark: Any
    classes_per_experience: list[list[int]]
    class_names: list[str]
    modality: Literal["vision", "text"]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_experiences(self) -> int:
        return len(self.classes_per_experience)

    def summary(self) -> str:
        lines = [f"{self.name}: {self.num_experiences} experiences, {self.num_classes} classes"]
        for index, (train, test) in enumerate(
            zip(self.benchmark.train_stream, self.benchmark.test_stream)
        ):
            classes = self.classes_per_experience[index]
            lines.append(
                f"  experience {index}: {len(classes)} classes, {len(train.dataset)} train / "
                f"{len(test.dataset)} test items: {', '.join(self.class_names[c] for c in classes)}"
            )
        return "\n".join(lines)


def seeded_class_order(num_classes: int, seed: int) -> list[int]:
    """``random.seed(seed); random.shuffle(list(range(n)))``, as NoRGa's scripts do."""
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    return order


def split_into_tasks(class_order: Sequence[int], tasks: int | TaskSplit) -> list[list[int]]:
    """The class ids of each task: ``class_order`` cut into consecutive parts, ``tasks``
    equal ones (an int) or those of a :class:`~clbench.data.splits.TaskSplit`."""
    if not isinstance(tasks, TaskSplit):
        check_task_count(len(class_order), tasks)
        tasks = TaskSplit((len(class_order) // tasks,) * tasks)
    return tasks.cut(class_order)


def class_incremental(
    train: Any,
    test: Any,
    class_order: Sequence[int],
    tasks: int | TaskSplit,
) -> tuple[Any, list[list[int]]]:
    """A class-incremental Avalanche benchmark from two classification datasets.

    ``train`` / ``test`` are anything ``avalanche.benchmarks.utils.as_classification_dataset``
    takes (a dataset with a ``targets`` list); the order is used as given; ``tasks`` is
    a number of equal tasks or a :class:`~clbench.data.splits.TaskSplit`.
    """
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    classes = split_into_tasks(class_order, tasks)
    benchmark = class_incremental_benchmark(
        {"train": as_classification_dataset(train), "test": as_classification_dataset(test)},
        class_order=list(class_order),
        num_classes_per_exp=[len(c) for c in classes],
    )
    return benchmark, classes


class TensorClassificationDataset(torch.utils.data.Dataset):
    """Items (x, y) from a tensor of inputs and a tensor of labels, with ``targets``."""

    def __init__(self, inputs: Tensor, labels: Tensor, transform: Any = None) -> None:
        if len(inputs) != len(labels):
            raise ValueError("inputs and labels differ in length")
        self.inputs = inputs
        self.labels = labels.long()
        self.targets = self.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.inputs[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

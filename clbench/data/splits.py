"""How a scenario's classes are cut into tasks: the options every scenario takes for it,
their checks, and the rule that picks a split when none is given.

Three ways to ask, the first being the papers' protocols:

* ``num_experiences = n``: n equal tasks (n must divide the classes);
* ``task_sizes = 4,3,3``: the classes of each task, in stream order;
* ``initial_classes = B`` with ``increment = C``: B classes first, then tasks of C (the
  "B50-Inc10" protocols of PILOT / PyCIL).

Where the task count is left to the scenario (a relation file of unknown size), it is
chosen, and the run prints the choice: the most tasks (at most 10) that divide the
classes with at least two per task, else, when no count divides them (17 relations),
the most tasks with at least two classes each, as equal as they can be, larger first.

Every check here needs the class count only, so a scenario that knows it (100 CIFAR
classes) runs them in ``ScenarioSpec.check_options``, before any data is read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clbench.errors import UsageError

log = logging.getLogger(__name__)

# An automatic task count is at most this (RP-CRE / CRL use 10 tasks), with at least
# MIN_AUTO_TASK_SIZE classes in each task.
MAX_AUTO_EXPERIENCES = 10
MIN_AUTO_TASK_SIZE = 2

# Metadata of an option added after runs were recorded (the split options among them):
# ``to_dict`` (config.json) leaves it out while it has its default, so a run that does not
# use it records the very configuration it recorded before the option existed (its
# table row, its setting, ``clbench run --resume`` stay the same).
OMIT_AT_DEFAULT = "clbench_omit_at_default"


def added_option(default: Any, help: str) -> Any:
    """:func:`clbench.config.option` for an option recorded only when it is set."""
    metadata = {"help": help, "symbol": None, OMIT_AT_DEFAULT: True}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def task_sizes_option() -> Any:
    return added_option([], "classes of each task in stream order, e.g. 4,3,3 (uneven tasks)")


def initial_classes_option() -> Any:
    return added_option(
        0, "B: classes of the first task, then tasks of `increment` (B50-Inc10: 50, 10)"
    )


def increment_option() -> Any:
    return added_option(0, "C: classes of each task after the first (with initial_classes)")


@dataclass(frozen=True)
class TaskSplit:
    """The number of classes of each task, in stream order, and how it was chosen.

    rule: ``equal`` (num_experiences), ``task_sizes``, ``base`` (initial_classes /
    increment) or ``automatic``; reason: why an automatic split is the one it is.
    """

    sizes: tuple[int, ...]
    rule: str = "equal"
    unit: str = "classes"
    reason: str = ""

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    @property
    def is_equal(self) -> bool:
        return len(set(self.sizes)) == 1

    def describe(self) -> str:
        """``10 tasks x 10 classes``; ``3 tasks of 4, 3, 3 classes``; ``B50-Inc10: ...``."""
        if self.is_equal:
            counts = f"{self.num_tasks} tasks x {self.sizes[0]} {self.unit}"
        else:
            counts = f"{self.num_tasks} tasks of {', '.join(map(str, self.sizes))} {self.unit}"
        if self.rule == "base" and self.num_tasks > 1:
            return f"B{self.sizes[0]}-Inc{self.sizes[-1]}: {counts}"
        return counts

    def cut(self, class_order: Sequence[int]) -> list[list[int]]:
        """The class ids of each task: ``class_order`` cut into consecutive parts (sorted)."""
        if len(class_order) != self.num_classes:
            raise UsageError(
                f"a split of {self.num_classes} {self.unit} was given an order of "
                f"{len(class_order)}"
            )
        parts, start = [], 0
        for size in self.sizes:
            parts.append(sorted(class_order[start : start + size]))
            start += size
        return parts


class TaskSplitOptions:
    """Mixin of a scenario's options dataclass that declares ``num_experiences`` and,
    beside it, ``task_sizes: list[int] = task_sizes_option()``, ``initial_classes: int =
    initial_classes_option()`` and ``increment: int = increment_option()``.

    Not a dataclass itself: its annotations are for type checkers and add no fields, so
    each scenario lists the split options where it lists its task count.
    """

    num_experiences: int | None
    task_sizes: list[int]
    initial_classes: int
    increment: int

    def to_dict(self) -> dict[str, Any]:
        """The options as config.json records them: :func:`added_option` fields only
        when they differ from their default."""
        values: dict[str, Any] = dataclasses.asdict(self)  # type: ignore[call-overload]
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if field.metadata.get(OMIT_AT_DEFAULT) and values[field.name] == _default(field):
                del values[field.name]
        return values

    def default_experiences(self) -> int | None:
        """The declared default of ``num_experiences``: beside ``task_sizes`` that value
        is no conflict (it was most likely not chosen)."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if field.name == "num_experiences" and field.default is not dataclasses.MISSING:
                return field.default
        return None

    def task_split(
        self, num_classes: int, scenario: str, *, unit: str = "classes", automatic: bool = False
    ) -> TaskSplit:
        """:func:`resolve_task_split` for these options."""
        return resolve_task_split(
            num_classes,
            num_experiences=self.num_experiences,
            task_sizes=self.task_sizes,
            initial_classes=self.initial_classes,
            increment=self.increment,
            scenario=scenario,
            unit=unit,
            automatic=automatic,
            default_experiences=self.default_experiences(),
        )

    def check_split_shape(self, scenario: str, *, unit: str = "classes") -> None:
        """:func:`check_split_shape` for these options (for data whose size is unknown)."""
        check_split_shape(
            num_experiences=self.num_experiences,
            task_sizes=self.task_sizes,
            initial_classes=self.initial_classes,
            increment=self.increment,
            scenario=scenario,
            unit=unit,
            default_experiences=self.default_experiences(),
        )


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def balanced_sizes(num_classes: int, num_tasks: int) -> tuple[int, ...]:
    """``num_tasks`` sizes that differ by at most one and add up, the larger first."""
    size, extra = divmod(num_classes, num_tasks)
    return tuple(size + 1 if i < extra else size for i in range(num_tasks))


def check_task_count(
    num_classes: int, num_experiences: int, scenario: str | None = None, *, unit: str = "classes"
) -> None:
    """The one "classes divide into equal tasks" check; ``scenario`` names the scenario in
    the message (as its options' checks do), ``unit`` what is split ("relations"). A
    count that does not divide is answered with the uneven split to ask for instead."""
    if num_experiences >= 1 and num_classes % num_experiences == 0:
        return
    hint = ""
    if 1 <= num_experiences <= num_classes:
        sizes = ",".join(map(str, balanced_sizes(num_classes, num_experiences)))
        hint = f"; for {num_experiences} uneven tasks set scenario.task_sizes={sizes}"
    if scenario is None:
        raise UsageError(
            f"cannot split {num_classes} {unit} into {num_experiences} equal experiences{hint}"
        )
    raise UsageError(
        f"scenario {scenario}: cannot split {num_classes} {unit} into {num_experiences} "
        f"equal tasks (num_experiences must divide {num_classes}){hint}"
    )


def automatic_split(num_classes: int, scenario: str, unit: str = "classes") -> TaskSplit:
    """The most tasks (<= 10) that divide the classes with >= 2 each; else the most tasks
    with >= 2 each, as equal as they can be (its ``reason`` says which)."""
    for count in range(MAX_AUTO_EXPERIENCES, 1, -1):
        if num_classes % count == 0 and num_classes // count >= MIN_AUTO_TASK_SIZE:
            reason = f"automatic: the most tasks <= {MAX_AUTO_EXPERIENCES} that divide them"
            return TaskSplit((num_classes // count,) * count, "automatic", unit, reason)
    for count in range(MAX_AUTO_EXPERIENCES, 1, -1):
        if num_classes // count >= MIN_AUTO_TASK_SIZE:
            reason = (
                f"automatic: no task count from {MAX_AUTO_EXPERIENCES} down to 2 divides "
                f"{num_classes}; set scenario.num_experiences or scenario.task_sizes to choose"
            )
            return TaskSplit(balanced_sizes(num_classes, count), "automatic", unit, reason)
    raise UsageError(
        f"scenario {scenario}: {num_classes} {unit} are too few for 2 tasks of "
        f">= {MIN_AUTO_TASK_SIZE} {unit}; set scenario.num_experiences (1 for a single task)"
    )


def announce(scenario: str, split: TaskSplit) -> None:
    """Log a split other than the equal tasks of ``num_experiences``, so the run shows it."""
    if split.rule != "equal":
        reason = f" ({split.reason})" if split.reason else ""
        log.info(f"{scenario}: {split.num_classes} {split.unit} in {split.describe()}{reason}")


def protocol_line(
    options: TaskSplitOptions, num_classes: int, scenario: str, *, unit: str = "classes"
) -> str:
    """``100 classes, 10 tasks x 10 classes`` for ``clbench list``; options that cannot
    split them say so instead of failing the listing."""
    try:
        split = options.task_split(num_classes, scenario, unit=unit, automatic=True)
    except UsageError as error:
        return f"{num_classes} {unit}; the options give no split ({error})"
    return f"{num_classes} {unit}, {split.describe()}"


def check_split_shape(
    *,
    num_experiences: int | None,
    task_sizes: Sequence[int],
    initial_classes: int,
    increment: int,
    scenario: str,
    unit: str = "classes",
    default_experiences: int | None = None,
) -> None:
    """What is wrong with the split options whatever the class count."""
    where = f"scenario {scenario}"
    base = initial_classes != 0 or increment != 0
    if task_sizes and base:
        raise UsageError(
            f"{where}: task_sizes and initial_classes / increment are two ways to give the "
            "same split; set one of them"
        )
    if task_sizes and any(size < 1 for size in task_sizes):
        raise UsageError(
            f"{where}: every task needs at least one of the {unit} (task_sizes="
            f"{','.join(map(str, task_sizes))})"
        )
    if base and (initial_classes < 1 or increment < 1):
        raise UsageError(
            f"{where}: initial_classes and increment go together and must be >= 1 (got "
            f"initial_classes={initial_classes}, increment={increment}; B50-Inc10 is "
            "initial_classes=50, increment=10)"
        )
    if num_experiences is not None and num_experiences < 1:
        raise UsageError(f"{where}: num_experiences must be at least 1 (got {num_experiences})")
    if task_sizes:
        _check_agrees(num_experiences, default_experiences, len(task_sizes), "task_sizes", where)


def _check_agrees(
    num_experiences: int | None, default: int | None, tasks: int, given: str, where: str
) -> None:
    """A num_experiences the user set must agree with the split it sits beside."""
    if num_experiences is not None and num_experiences not in (default, tasks):
        raise UsageError(
            f"{where}: num_experiences={num_experiences} disagrees with {given} ({tasks} "
            "tasks); leave num_experiences out"
        )


def resolve_task_split(
    num_classes: int,
    *,
    num_experiences: int | None,
    task_sizes: Sequence[int] = (),
    initial_classes: int = 0,
    increment: int = 0,
    scenario: str,
    unit: str = "classes",
    automatic: bool = False,
    default_experiences: int | None = None,
) -> TaskSplit:
    """The split the options ask for, checked against ``num_classes``.

    ``automatic``: whether ``num_experiences=None`` means "choose" (:func:`automatic_split`);
    ``default_experiences``: the options' declared default of num_experiences.
    """
    check_split_shape(
        num_experiences=num_experiences,
        task_sizes=task_sizes,
        initial_classes=initial_classes,
        increment=increment,
        scenario=scenario,
        unit=unit,
        default_experiences=default_experiences,
    )
    where = f"scenario {scenario}"
    if task_sizes:
        if sum(task_sizes) != num_classes:
            raise UsageError(
                f"{where}: task_sizes={','.join(map(str, task_sizes))} adds up to "
                f"{sum(task_sizes)} {unit}, but there are {num_classes}"
            )
        return TaskSplit(tuple(task_sizes), "task_sizes", unit)
    if initial_classes:
        if initial_classes >= num_classes:
            raise UsageError(
                f"{where}: initial_classes={initial_classes} leaves no {unit} for later tasks "
                f"(there are {num_classes})"
            )
        rest = num_classes - initial_classes
        if rest % increment:
            sizes = [initial_classes] + [increment] * (rest // increment) + [rest % increment]
            raise UsageError(
                f"{where}: after {initial_classes} initial {unit}, {rest} remain: not a whole "
                f"number of tasks of {increment}; set scenario.task_sizes="
                f"{','.join(map(str, sizes))} for a smaller last task"
            )
        split = TaskSplit((initial_classes,) + (increment,) * (rest // increment), "base", unit)
        _check_agrees(
            num_experiences, default_experiences, split.num_tasks, "initial_classes", where
        )
        return split
    if num_experiences is None:
        if not automatic:
            raise UsageError(f"{where}: set scenario.num_experiences")
        return automatic_split(num_classes, scenario, unit)
    check_task_count(num_classes, num_experiences, scenario, unit=unit)
    return TaskSplit((num_classes // num_experiences,) * num_experiences, "equal", unit)


def split_details(split: TaskSplit) -> dict[str, Any]:
    """What ``Scenario.details`` records of a split other than ``num_experiences`` equal
    tasks (nothing for those, so the default scenarios' details stay as they were)."""
    if split.rule == "equal":
        return {}
    return {"task_split": {"rule": split.rule, "sizes": list(split.sizes), "reason": split.reason}}

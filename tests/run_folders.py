"""Hand-made run folders for the reporting tests, written as the run loop writes them.

The scenario keys a real run records in config.json come from its registered
ScenarioSpec; for the scenario names these tests use, this table stands in for it (the
library itself names no scenario).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clbench.results import write_run_folder

# scenario -> (family, paper protocol), as the scenarios' specs declare them
SCENARIO_KEYS = {
    "digits-offline": ("vision", "digits"),
    "split-cifar100": ("vision", "split-cifar100"),
    "imagenet-r": ("vision", "imagenet-r"),
    "fewrel-offline": ("relation-extraction", "fewrel"),
    "fewrel": ("relation-extraction", "fewrel"),
    "tacred": ("relation-extraction", "tacred"),
}


def write_run(
    folder: Path,
    config: dict[str, Any],
    accuracy: Sequence[Sequence[float]],
    counts: Sequence[int],
    **options: Any,
) -> Path:
    """``write_run_folder`` with the family and protocol of ``config["scenario"]``."""
    family, protocol = SCENARIO_KEYS[config["scenario"]]
    options.setdefault("family", family)
    options.setdefault("protocol", protocol)
    return write_run_folder(folder, config, accuracy, counts, **options)

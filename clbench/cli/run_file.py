"""``clbench run --config FILE.yaml``: a run's settings written down once.

The file is one mapping. ``strategy``, ``scenario``, ``backbone``, ``seed`` and ``preset``
are the flags of the same names; every other key is a ``--set`` key (``lr``,
``scenario.num_experiences``, ``backbone.checkpoint``) and is checked as ``--set`` checks
it, so a misspelled one is the same one-line error naming the valid options::

    strategy: l2p
    scenario: digits-offline
    seed: 3
    lr: 0.01
    scenario.num_experiences: 2

Flags given on the command line win over the file, and ``--set`` over the file's keys.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clbench.errors import UsageError

RUN_KEYS = ("strategy", "scenario", "backbone", "seed", "preset")
RUN_DEFAULTS: dict[str, Any] = {"seed": 0, "preset": "auto"}


@dataclass
class RunFile:
    """A ``--config`` file: the run flags it sets and its ``--set`` pairs (in file order)."""

    settings: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


def read_run_file(path: Path) -> RunFile:
    """The file's settings; a missing, unreadable or malformed file is a UsageError."""
    import yaml

    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{where}: cannot read it ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        return RunFile()
    if not isinstance(data, dict):
        raise UsageError(
            f"{where}: expected a mapping of keys to values, not {type(data).__name__}"
        )
    run_file = RunFile()
    for key, value in data.items():
        if not isinstance(key, str):
            raise UsageError(f"{where}: key {key!r} is not a name")
        if key in RUN_KEYS:
            run_file.settings[key] = _run_setting(where, key, value)
        else:
            run_file.overrides.append(f"{key}={_set_text(where, key, value)}")
    return run_file


def _run_setting(where: str, key: str, value: Any) -> Any:
    if key == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: seed: expected an integer, got {value!r}")
        return value
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {key}: expected a name, got {value!r}")
    return value


def _set_text(where: str, key: str, value: Any) -> str:
    """A YAML value written as ``--set`` would spell it (its parser reads it back)."""
    if isinstance(value, dict):
        raise UsageError(
            f"{where}: {key}: expected a value, not a mapping "
            "(component options are written scenario.KEY / backbone.KEY)"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(_set_text(where, key, item) for item in value)
    return str(value)


def merged_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with what ``--config`` sets filled in where the command line is silent,
    the file's ``--set`` pairs before the command line's (later pairs win), and the
    defaults of the flags the file and command line both leave out."""
    run_file = read_run_file(args.config) if args.config is not None else RunFile()
    merged = argparse.Namespace(**vars(args))
    for key in RUN_KEYS:
        if getattr(merged, key) is None:
            setattr(merged, key, run_file.settings.get(key, RUN_DEFAULTS.get(key)))
    merged.overrides = [*run_file.overrides, *args.overrides]
    return merged

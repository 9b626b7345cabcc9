"""A sweep file (or the ``clbench sweep`` flags) read into grid blocks, with every problem of
its structure collected, not just the first.

The schema is checked by hand rather than by a validation library: it is small, the
messages name the file's own keys (``grids[1]: seed must be an integer ...``), and
:func:`clbench.sweep.plan.expand` appends the names and options that do not resolve to the
same list, so the user sees one report of everything that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clbench.errors import UsageError

GRID_KEYS = ("strategy", "scenario", "seed", "backbone", "preset", "set", "vary")
FILE_KEYS = (
    *GRID_KEYS,
    "description",
    "out",
    "device",
    "resources",
    "max_retries",
    "loggers",
    "grids",
)
RESOURCE_KEYS = ("cpus", "gpus")
TEXT_KEYS = ("out", "device", "description")
DEFAULT_MAX_RETRIES = 2


class SweepError(UsageError):
    """A sweep that cannot run; ``problems`` lists every offending entry."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s), nothing was run:\n{lines}")


@dataclass
class Resources:
    """What one run reserves on a Ray cluster (locally: threads come from --jobs)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Grid:
    """One block of a sweep: the cartesian product of its lists."""

    strategy: list[str]
    scenario: list[str]
    seed: list[int] = field(default_factory=lambda: [0])
    backbone: list[str | None] = field(default_factory=lambda: [None])
    preset: list[str] = field(default_factory=lambda: ["auto"])
    overrides: dict[str, str] = field(default_factory=dict)  # `set`: KEY -> VALUE
    vary: dict[str, list[str]] = field(default_factory=dict)  # KEY -> values to sweep


@dataclass
class Sweep:
    source: str  # the file, or "command line", for messages
    grids: list[Grid]
    description: str = ""
    out: Path | None = None
    device: str = "auto"
    resources: Resources = field(default_factory=Resources)
    max_retries: int = DEFAULT_MAX_RETRIES
    # Avalanche loggers of every run the sweep starts (``clbench run --logger``'s kinds)
    loggers: list[str] = field(default_factory=list)
    # what is wrong in the file's structure; expand() adds the names and options that do
    # not resolve and reports everything at once
    problems: list[str] = field(default_factory=list)


# -- one value ------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_text(value: Any) -> str:
    """A YAML scalar as the string ``--set`` would give (parsed against the option's type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def _names(where: str, key: str, value: Any, problems: list[str]) -> list[str]:
    items = _as_list(value)
    bad = [item for item in items if not isinstance(item, str) or not item]
    if bad or not items:
        problems.append(f"{where}: {key} must be a name or a list of names, got {value!r}")
        return []
    return items


def _seeds(where: str, value: Any, problems: list[str]) -> list[int]:
    items = _as_list(value)
    seeds = []
    for item in items:
        # bool is an int in Python; `seed: yes` is a mistake, not seed 1
        if isinstance(item, int) and not isinstance(item, bool):
            seeds.append(item)
        elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
            seeds.append(int(item))
        else:
            problems.append(f"{where}: seed must be an integer or a list of integers, got {item!r}")
    if not items:
        problems.append(f"{where}: seed is an empty list")
    return seeds


def _overrides(where: str, value: Any, problems: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: set must be a mapping KEY: VALUE, got {value!r}")
        return {}
    result = {}
    for key, item in value.items():
        if isinstance(item, dict):
            problems.append(f"{where}: set {key}: a value, not a mapping")
            continue
        result[str(key)] = _as_text(item)
    return result


def _vary(where: str, value: Any, problems: list[str]) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: vary must be a mapping KEY: [VALUES], got {value!r}")
        return {}
    result = {}
    for key, items in value.items():
        if not isinstance(items, list) or not items:
            problems.append(f"{where}: vary {key}: a non-empty list of values, got {items!r}")
            continue
        result[str(key)] = [_as_text(item) for item in items]
    return result


def _unknown_keys(where: str, entry: dict[str, Any], valid: tuple[str, ...]) -> list[str]:
    unknown = [str(key) for key in entry if key not in valid]
    if not unknown:
        return []
    names = ", ".join(map(repr, unknown))
    return [f"{where}: unknown key(s) {names}; valid keys: {', '.join(valid)}"]


# -- one grid block ---------------------------------------------------------------------------


def _grid(where: str, entry: dict[str, Any], problems: list[str]) -> Grid | None:
    before = len(problems)
    for key in ("strategy", "scenario"):
        if key not in entry:
            problems.append(f"{where}: no {key} (give it in the grid or at the top of the file)")
    strategy = _names(where, "strategy", entry["strategy"], problems) if "strategy" in entry else []
    scenario = _names(where, "scenario", entry["scenario"], problems) if "scenario" in entry else []
    seed = _seeds(where, entry.get("seed", 0), problems)
    backbone: list[str | None] = [None]
    if entry.get("backbone") not in (None, "default"):
        backbone = list(_names(where, "backbone", entry["backbone"], problems))
    preset = _names(where, "preset", entry.get("preset", "auto"), problems)
    overrides = _overrides(where, entry.get("set"), problems)
    vary = _vary(where, entry.get("vary"), problems)
    if len(problems) > before:
        return None
    return Grid(strategy, scenario, seed, backbone, preset, overrides, vary)


def _block(index: int, entry: Any, defaults: dict[str, Any], problems: list[str]) -> Grid | None:
    """``grids[index]``: it inherits the file's grid keys; ``set`` and ``vary`` are merged,
    the block's own values winning."""
    where = f"grids[{index}]"
    if not isinstance(entry, dict):
        problems.append(f"{where}: a mapping of grid keys ({', '.join(GRID_KEYS)})")
        return None
    problems += _unknown_keys(where, entry, GRID_KEYS)
    merged = {**defaults, **entry}
    for key in ("set", "vary"):
        if isinstance(defaults.get(key), dict) and isinstance(entry.get(key), dict):
            merged[key] = {**defaults[key], **entry[key]}
    return _grid(where, merged, problems)


def _grids(data: dict[str, Any], problems: list[str]) -> list[Grid]:
    defaults = {key: data[key] for key in GRID_KEYS if key in data}
    entries = data.get("grids")
    if entries is None:  # the whole file is one block
        grid = _grid("grid", defaults, problems)
        return [grid] if grid else []
    if not isinstance(entries, list) or not entries:
        problems.append("grids: a non-empty list of grid blocks")
        return []
    blocks = [_block(index, entry, defaults, problems) for index, entry in enumerate(entries)]
    return [grid for grid in blocks if grid]


# -- the file's other keys ------------------------------------------------------------------


def _resources(data: dict[str, Any], problems: list[str]) -> Resources:
    resources = Resources()
    raw = data.get("resources", {}) or {}
    if not isinstance(raw, dict):
        problems.append(f"resources: a mapping with {', '.join(RESOURCE_KEYS)}")
        return resources
    problems += _unknown_keys("resources", raw, RESOURCE_KEYS)
    for key in RESOURCE_KEYS:
        value = raw.get(key, getattr(resources, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"resources.{key}: a number >= 0, got {value!r}")
        else:
            setattr(resources, key, float(value))
    return resources


def _max_retries(data: dict[str, Any], problems: list[str]) -> int:
    value = data.get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"max_retries: an integer >= 0, got {value!r}")
        return DEFAULT_MAX_RETRIES
    return value


def _loggers(data: dict[str, Any], problems: list[str]) -> list[str]:
    """``loggers``: a kind, a comma list or a list of them (checked with the runs' own
    parser when the grid is expanded)."""
    value = data.get("loggers", [])
    values = _as_list(value)
    if not all(isinstance(item, str) for item in values):
        problems.append(f"loggers: a logger name or a list of them, got {value!r}")
        return []
    return values


def _texts(data: dict[str, Any], problems: list[str]) -> dict[str, str]:
    for key in TEXT_KEYS:
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key}: a string, got {data[key]!r}")
    return {key: data[key] for key in TEXT_KEYS if isinstance(data.get(key), str)}


def parse_sweep(data: Any, source: str) -> Sweep:
    """A sweep from the mapping of a YAML file; every problem is reported at once."""
    if not isinstance(data, dict):
        raise SweepError(source, [f"a sweep file is a mapping of keys ({', '.join(FILE_KEYS)})"])
    problems = _unknown_keys("top level", data, FILE_KEYS)
    grids = _grids(data, problems)
    resources = _resources(data, problems)
    max_retries = _max_retries(data, problems)
    text = _texts(data, problems)
    return Sweep(
        source=source,
        grids=grids,
        description=text.get("description", ""),
        out=Path(text["out"]) if text.get("out") else None,
        device=text.get("device", "auto"),
        resources=resources,
        max_retries=max_retries,
        loggers=_loggers(data, problems),
        problems=problems,
    )


def load_sweep(path: Path) -> Sweep:
    """A SWEEP.yaml file; a missing file or bad YAML is a one-line UsageError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML: {error}") from None
    return parse_sweep(data, str(path))


def sweep_from_flags(
    strategies: list[str],
    scenarios: list[str],
    seeds: list[str],
    backbones: list[str],
    presets: list[str],
) -> Sweep:
    """The common case on the command line: one grid block from repeated flags."""
    entry: dict[str, Any] = {
        "strategy": strategies,
        "scenario": scenarios,
        "seed": seeds or [0],
        "preset": presets or ["auto"],
    }
    missing = [f"--{key}" for key in ("strategy", "scenario") if not entry[key]]
    if missing:
        raise UsageError(f"sweep needs a SWEEP.yaml file or {' and '.join(missing)} (repeatable)")
    if backbones:
        entry["backbone"] = backbones
    return parse_sweep(entry, "command line")

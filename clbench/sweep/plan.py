"""Expansion of a sweep into runs: every grid point resolved, validated and given a fixed
folder before anything runs.

Run identity. Each grid point gets a fixed folder,
``<out>/<scenario>/<strategy>/<backbone>_seed<N>_<hash>``, where the hash covers the whole
resolved configuration except what does not change the experiment (:data:`NOT_IDENTITY`).
Re-running a sweep therefore finds its runs again: it skips complete ones and resumes the
others. Changing an option, or a preset in the code, changes the hash and makes a new run
rather than silently mixing two settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.errors import UsageError
from clbench.progress import Progress, importing, progress
from clbench.sweep.grid import Grid, Sweep, SweepError

# Not part of a run's identity: where it runs and which clbench release wrote it (the same
# experiment resumed on a GPU node, or after an upgrade, is still the same run), and what
# the run loop copies from the scenario's spec (family, paper protocol, metrics): those
# follow from the scenario's name and were added to config.json later, so a sweep made
# before keeps its folders.
VOLATILE_CONFIG_KEYS = ("device", "clbench_version")
SCENARIO_SPEC_KEYS = ("scenario_family", "scenario_protocol", "metrics")
# Which test experiences are evaluated ("seen" / "all", added later too): every metric is
# the same either way, only the unseen entries are null or 0.
EVALUATION_KEYS = ("evaluate",)
# Derived from the options (which quirk options are off their default) or about what a run
# reports, not what it computes (the loggers it writes to, the backbone's random weights).
DERIVED_KEYS = ("authors_quirks", "loggers", "backbone_random_weights")
NOT_IDENTITY = (*VOLATILE_CONFIG_KEYS, *SCENARIO_SPEC_KEYS, *EVALUATION_KEYS, *DERIVED_KEYS)

Overrides = dict[str, dict[str, str]]  # group (strategy / scenario / backbone) -> KEY -> VALUE


@dataclass
class RunSpec:
    """One grid point: its resolved configuration and the folder it lives in."""

    config: dict[str, Any]
    identity: str
    folder: Path
    overrides: dict[str, str]

    @property
    def label(self) -> str:
        return "/".join(self.folder.parts[-3:])


def run_identity(config: dict[str, Any]) -> str:
    """Short hash of what makes a run this run (see :data:`NOT_IDENTITY`)."""
    kept = {key: value for key, value in config.items() if key not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def run_folder(out: Path, config: dict[str, Any], identity: str) -> Path:
    """The same ``<scenario>/<strategy>/`` layout as ``clbench run``, with a fixed name."""
    from clbench.results.folder import strategy_label

    name = f"{config['backbone']}_seed{config['seed']}_{identity}"
    strategy = strategy_label(config["strategy"]).replace("/", "_")
    return Path(out) / config["scenario"] / strategy / name


NameLookup = Callable[[str, str], Any]  # (kind, name) -> the entry; UsageError if unknown


def registry_lookup(kind: str, name: str) -> Any:
    """The registered strategy class (a ``file.py:Class`` too), scenario or backbone."""
    from clbench.registry import BACKBONES, SCENARIOS, load_strategy_class

    lookups: dict[str, Callable[[str], Any]] = {
        "strategy": load_strategy_class,
        "scenario": SCENARIOS.get,
        "backbone": BACKBONES.get,
    }
    return lookups[kind](name)


def _check_names(grid: Grid, where: str, problems: list[str], lookup: NameLookup) -> set[str]:
    """Names that do not exist (reported once each, with the valid choices)."""
    bad: set[str] = set()
    names: list[tuple[str, Iterable[str | None]]] = [
        ("strategy", grid.strategy),
        ("scenario", grid.scenario),
        ("backbone", grid.backbone),
    ]
    for kind, given in names:
        for name in given:
            if name is None:
                continue
            try:
                lookup(kind, name)
            except UsageError as error:
                bad.add(name)
                problems.append(f"{where}: {error}")
    return bad


def _points(grid: Grid) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """Every point of a grid block, as a run request's fields, with its ``set`` and
    ``vary`` values."""
    varied = [dict(zip(grid.vary, values)) for values in itertools.product(*grid.vary.values())]
    for scenario, strategy, backbone, preset, varying, seed in itertools.product(
        grid.scenario, grid.strategy, grid.backbone, grid.preset, varied, grid.seed
    ):
        point = {
            "strategy": strategy,
            "scenario": scenario,
            "backbone": backbone,
            "seed": seed,
            "preset": preset,
        }
        yield point, {**grid.overrides, **varying}


def _block_name(index: int, sweep: Sweep) -> str:
    return f"grids[{index}]" if len(sweep.grids) > 1 else "grid"


def _resolve_point(
    point: dict[str, Any], overrides: Overrides, loggers: list[str] | None = None
) -> dict[str, Any]:
    from clbench.runner import RunRequest, resolve_run

    return resolve_run(
        RunRequest(
            **point,
            strategy_overrides=overrides["strategy"],
            scenario_overrides=overrides["scenario"],
            backbone_overrides=overrides["backbone"],
            loggers=loggers or [],
            device="cpu",
        )
    )


def _logger_problems(sweep: Sweep) -> tuple[list[str], list[str]]:
    """The sweep's logger kinds, and what is wrong with them (the runs' own parser)."""
    from clbench.run_loggers import parse_logger_kinds

    try:
        return parse_logger_kinds(sweep.loggers), []
    except UsageError as error:
        return [], [f"loggers: {error}"]


def _each_problem(
    point: dict[str, Any],
    overrides: Overrides,
    first: UsageError,
    check: Callable[[dict[str, Any], Overrides], Any],
) -> list[str]:
    """A check stops at the first bad option: try each override alone to name them all,
    under the point's preset (which may choose the backbone a ``backbone.*`` value is
    checked against), and where that fails as the point did (a bad preset) under none."""
    errors = [str(first)]
    for group, values in overrides.items():
        for key, value in values.items():
            alone: Overrides = {name: {} for name in overrides}
            alone[group] = {key: value}
            for preset in dict.fromkeys([point["preset"], "default"]):
                try:
                    check({**point, "preset": preset}, alone)
                    break
                except UsageError as error:
                    if str(error) != str(first) or preset == "default":
                        errors.append(str(error))
                        break
    return list(dict.fromkeys(errors))


def _point_overrides(pairs: dict[str, str], command_line: Overrides) -> Overrides:
    """A point's ``set`` and ``vary`` values, then the command line's ``--set`` on top."""
    from clbench.config import parse_set_arguments

    overrides = parse_set_arguments([f"{key}={value}" for key, value in pairs.items()])
    for group, values in command_line.items():
        overrides[group].update(values)
    return overrides


def grid_size(grid: Grid) -> int:
    """The number of points of one grid block (before duplicates are merged)."""
    sizes = [len(grid.scenario), len(grid.strategy), len(grid.backbone), len(grid.preset)]
    sizes += [len(grid.seed), *(len(values) for values in grid.vary.values())]
    return math.prod(sizes)


def _grid_specs(
    grid: Grid,
    where: str,
    out: Path,
    device: str,
    command_line: Overrides,
    problems: list[str],
    bar: Progress,
    loggers: list[str],
) -> list[RunSpec]:
    """The resolved points of one grid block; what does not resolve goes to ``problems``."""
    bad_names = _check_names(grid, where, problems, registry_lookup)
    specs = []
    for point, pairs in _points(grid):
        bar.update()
        if bad_names & {point["scenario"], point["strategy"], point["backbone"]}:
            continue
        overrides = _point_overrides(pairs, command_line)
        try:
            config = _resolve_point(point, overrides, loggers)
        except UsageError as error:
            for message in _each_problem(point, overrides, error, _resolve_point):
                problems.append(f"{where}: {point['scenario']} / {point['strategy']}: {message}")
            continue
        config["device"] = device
        identity = run_identity(config)
        folder = run_folder(out, config, identity)
        specs.append(RunSpec(config=config, identity=identity, folder=folder, overrides=pairs))
    return specs


def check_before_importing(sweep: Sweep, extra_overrides: list[str] | None = None) -> None:
    """Raise what :func:`expand` would raise for the problems the catalog can see (names,
    presets, ``--set`` keys and values: :func:`clbench.cli.preflight.check_run`), before
    torch is imported, so a sweep's typo is answered in a second, not after the imports.

    Silent where the catalog cannot stand in for the registries, and for a sweep with a
    user's ``module:Class`` strategy (importing it may register more). What it passes,
    :func:`expand` checks again in full, so it can only refuse what ``expand`` refuses
    (whose list may hold more: the scenarios' own checks need their code)."""
    from clbench.catalog import from_file
    from clbench.cli.preflight import check_run
    from clbench.config import parse_set_arguments

    catalog = from_file()
    if catalog is None or any(":" in name for grid in sweep.grids for name in grid.strategy):
        return  # a user's file.py:Class may register scenarios and backbones when imported
    try:
        command_line = parse_set_arguments(extra_overrides or [])
    except UsageError:
        return  # expand reports it, in its own words

    def check(point: dict[str, Any], overrides: Overrides) -> None:
        request = {key: value for key, value in point.items() if key != "seed"}
        check_run(catalog, **request, overrides=overrides, loggers=[], device="cpu")

    _, problems = _logger_problems(sweep)
    for index, grid in enumerate(sweep.grids):
        where = _block_name(index, sweep)
        bad = _check_names(grid, where, problems, catalog.entry)
        for point, pairs in _points(grid):
            if bad & {point["scenario"], point["strategy"], point["backbone"]}:
                continue
            overrides = _point_overrides(pairs, command_line)
            try:
                check(point, overrides)
            except UsageError as error:
                for message in _each_problem(point, overrides, error, check):
                    problems.append(
                        f"{where}: {point['scenario']} / {point['strategy']}: {message}"
                    )
    if problems:
        raise SweepError(sweep.source, list(dict.fromkeys([*sweep.problems, *problems])))


def load_registered_names() -> None:
    """Import the run loop and every registered strategy, scenario and backbone: nearly all
    of a sweep's validation time (torch, Avalanche, transformers: ~40 s on a 2-core CPU;
    resolving 16 points afterwards takes 0.1 s), so it gets a line of its own."""
    with importing("clbench sweep: loading the strategies and scenarios"):
        from clbench import runner  # noqa: F401  (imported for its imports)
        from clbench.registry import STRATEGIES

        STRATEGIES.names()


def expand(
    sweep: Sweep, out: Path, device: str, extra_overrides: list[str] | None = None
) -> list[RunSpec]:
    """Every grid point, resolved and validated; raises SweepError naming each problem.

    ``device`` is written into each configuration as is (the caller decides it: locally
    the resolved device, on Ray the one the run's resources imply); validation resolves
    on the CPU so a CPU-only head node can plan a GPU sweep. A point reached by two grid
    blocks is one run.
    """
    from clbench.config import parse_set_arguments

    try:
        command_line = parse_set_arguments(extra_overrides or [])
    except UsageError as error:
        raise SweepError("command line", [str(error)]) from None
    loggers, logger_problems = _logger_problems(sweep)
    problems: list[str] = [*sweep.problems, *logger_problems]
    specs: dict[str, RunSpec] = {}
    load_registered_names()
    points = sum(grid_size(grid) for grid in sweep.grids)
    with progress(points, f"validating the grid of {sweep.source}", unit="points") as bar:
        for index, grid in enumerate(sweep.grids):
            where = _block_name(index, sweep)
            found = _grid_specs(grid, where, out, device, command_line, problems, bar, loggers)
            for spec in found:
                specs.setdefault(spec.identity, spec)
    if problems:
        raise SweepError(sweep.source, list(dict.fromkeys(problems)))
    if not specs:  # only when every grid block was rejected above
        raise SweepError(sweep.source, ["the grid is empty"])
    return list(specs.values())

"""Finding and reading run folders: one row per run in a pandas frame.

A run's record comes from its config.json, status.json, metrics.json and progress.json,
read through :class:`clbench.results.RunFolder`. What the tables must know about its
scenario (family, paper protocol, the metrics its papers report) comes from config.json
too (see :func:`clbench.results.folder.scenario_facts`): nothing here names a scenario.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench.errors import UsageError
from clbench.results.folder import (
    CONFIG,
    METRICS,
    RANDOM_WEIGHTS_MARK,
    ExperienceRecord,
    RunFolder,
    backbone_label,
    scenario_facts,
    strategy_label,
)

AVERAGED_STATE = "complete"
# appended to the strategy of a run with authors'-code quirk options set (its own row)
AUTHORS_MARK = " (authors' code)"
AUTHORS_NOTE = (
    "(authors' code): runs with options that reproduce the authors' official code rather "
    "than the paper (`clbench show RUN` names them)."
)
FILTER_KEYS = ("scenario", "backbone", "strategy", "seed", "protocol")

# Options that do not change results (how fast evaluation runs) or that name a file on one
# machine: leaving them out of a run's "setting" keeps identical protocols in one row.
RESULT_NEUTRAL_OPTIONS = frozenset({"eval_batch_size", "num_workers", "prompted_cache"})
PATH_OPTIONS = frozenset({"scenario.data_file", "backbone.checkpoint", "backbone.path"})

# "protocol" is the clbench protocol version; "scenario_protocol" the paper protocol the
# run is compared with, "scenario_metrics" the metrics its scenario reports.
RUN_COLUMNS = (
    "path", "scenario", "backbone", "strategy", "seed", "protocol", "state", "error",
    "finished", "tasks", "faa", "caa", "ffm", "seen", "tii", "minutes", "params", "seen_curve",
    "setting_options",
    "matrix",
    "family", "scenario_protocol", "scenario_metrics",
)  # fmt: skip
# Columns the run listing (--include-incomplete) leaves out of its data.
INTERNAL_COLUMNS = ("matrix", "seen_curve", "family", "scenario_protocol", "scenario_metrics")


def find_run_folders(paths: Iterable[Path | str]) -> list[Path]:
    """Every run folder (a folder holding config.json) under ``paths``, sorted.

    A path that does not exist or holds no run is a UsageError: a typo must not give an
    empty table.
    """
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise UsageError(f"{root} does not exist: give a results folder or a run folder")
        if not root.is_dir():
            raise UsageError(f"{root} is not a results folder (it is a file)")
        runs = _walk_runs(root)
        if not runs:
            raise UsageError(f"{root} is not a results folder: no run folder (config.json) in it")
        found.update(runs)
    return sorted(found)


def _walk_runs(root: Path) -> list[Path]:
    # A run folder holds no other run, so the walk stops at the first config.json and never
    # lists checkpoints or logs: with thousands of runs, the listing is most of the cost.
    runs, pending = [], [str(root)]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        if any(entry.name == CONFIG for entry in entries):
            runs.append(Path(folder))
            continue
        pending.extend(
            entry.path
            for entry in entries
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
        )
    return runs


def setting_of(config: dict[str, Any]) -> dict[str, str]:
    """The options that define a run's protocol, flattened as ``--set`` names them.

    Values are JSON strings so that they compare and hash alike; file options keep only
    the file name, since the same weights or data live under other paths on other hosts.
    """
    flat: dict[str, str] = {}
    for component in ("strategy", "scenario", "backbone"):
        for key, value in (config.get(f"{component}_options") or {}).items():
            if key in RESULT_NEUTRAL_OPTIONS:
                continue
            name = key if component == "strategy" else f"{component}.{key}"
            if name in PATH_OPTIONS and isinstance(value, str):
                value = Path(value).name
            flat[name] = json.dumps(value, sort_keys=True)
    return flat


def read_run(path: Path, *, with_matrix: bool = False) -> dict[str, Any]:
    """One run as a flat record; an unreadable folder becomes a record with state
    ``unreadable`` (shown in the table, never averaged), not an exception."""
    folder = RunFolder(path)
    record: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    record.update(path=str(path), state="unreadable", finished=0, seen_curve=(),
                  scenario_metrics=())  # fmt: skip
    try:
        config = folder.config()
        facts = scenario_facts(config)
        record.update(
            scenario=str(config["scenario"]),
            strategy=strategy_label(str(config["strategy"]))
            + (AUTHORS_MARK if config.get("authors_quirks") else ""),
            backbone=backbone_label(config),
            seed=None if config.get("seed") is None else int(config["seed"]),
            protocol=str(config.get("protocol_version", "?")),
            setting_options=json.dumps(setting_of(config), sort_keys=True),
            # known before any task finishes, for scenarios that take the option
            tasks=_planned_tasks(config.get("scenario_options") or {}),
            family=facts.family,
            scenario_protocol=facts.protocol,
            scenario_metrics=facts.metrics,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        # The folder layout still names scenario / strategy / backbone: show it as such.
        record.update(
            scenario=path.parent.parent.name,
            strategy=path.parent.name,
            backbone=path.name.partition("_seed")[0],
            protocol="?",
            setting_options="{}",
            error=f"config.json: {type(error).__name__}: {error}",
        )
        return record
    try:
        status = folder.status()
        record["state"] = str(status.get("state", "unknown"))
        record["error"] = status.get("error")
    except (OSError, ValueError) as error:
        record.update(state="unreadable", error=f"status.json: {error}")
        return record
    try:
        summary = folder.read_json(METRICS)  # absent (not {}) until a task finishes
        seen_curve = tuple(float(a) for a in summary.get("seen_accuracy", ()))
        record.update(
            faa=float(summary["faa"]),
            caa=float(summary["caa"]),
            ffm=float(summary["ffm"]),
            seen=seen_curve[-1] if seen_curve else math.nan,
            seen_curve=seen_curve,
            finished=int(summary["experiences_finished"]),
            tasks=int(summary["experiences_finished"]),
            minutes=(summary.get("train_seconds", 0.0) + summary.get("eval_seconds", 0.0)) / 60,
        )
    except FileNotFoundError:
        pass  # no experience finished yet
    except (OSError, ValueError, KeyError, TypeError) as error:
        record.update(state="unreadable", error=f"metrics.json: {type(error).__name__}: {error}")
        return record
    if record["state"] == AVERAGED_STATE and record["faa"] is None:
        record.update(state="unreadable", error="complete, but metrics.json is missing")
    # progress.json also holds the strategies' per-evaluation extras (task identity)
    try:
        records = folder.records()
        matrix = np.asarray([r.accuracy for r in records], dtype=float)
        record["tii"] = _final_task_identity(records)
        record["params"] = _trained_parameters_k(records)
        if matrix.size:
            record["tasks"] = int(matrix.shape[1])
            record["finished"] = int(matrix.shape[0])
        if with_matrix and records:
            record["matrix"] = matrix
    except (OSError, ValueError, KeyError, TypeError) as error:
        record.update(state="unreadable", error=f"progress.json: {error}")
    return record


def _final_task_identity(records: list[ExperienceRecord]) -> float:
    """Mean over the learnt tasks of the last evaluation's task-identity accuracy (NaN
    when the strategy does not infer tasks)."""
    if not records:
        return math.nan
    accuracy = (records[-1].extra or {}).get("task_identity_accuracy") or ()
    seen = [float(a) for a in accuracy if a is not None]
    return sum(seen) / len(seen) if seen else math.nan


def _trained_parameters_k(records: list[ExperienceRecord]) -> float:
    """Thousands of parameters trained per task, mean over the finished tasks (NaN for runs
    made before the count was recorded)."""
    counts = [r.trained_parameters for r in records if r.trained_parameters is not None]
    return sum(counts) / len(counts) / 1000 if counts else math.nan


def load_runs(paths: Iterable[Path | str], *, with_matrix: bool = False) -> pd.DataFrame:
    """One row per run folder under ``paths`` (see ``RUN_COLUMNS``).

    ``with_matrix`` also keeps each accuracy matrix (from progress.json), needed for
    per-task tables and plots.
    """
    records = [read_run(path, with_matrix=with_matrix) for path in find_run_folders(paths)]
    runs = pd.DataFrame.from_records(records, columns=list(RUN_COLUMNS))
    for column in ("faa", "caa", "ffm", "seen", "tii", "minutes", "params"):
        runs[column] = runs[column].astype(float)
    # nullable integers: a run without a seed must not turn every seed into 1.0
    runs["seed"] = runs["seed"].astype("Int64")
    runs["tasks"] = runs["tasks"].astype("Int64")
    return runs


def display_value(value: Any) -> str:
    """Text of a key value; missing (None, NaN, pd.NA) is the empty string."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def matches_any(value: str, patterns: Sequence[str]) -> bool:
    """Shell-pattern match (``l2p*``) against any of ``patterns``."""
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def filter_runs(runs: pd.DataFrame, filters: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Keep runs whose values match each filter (shell patterns: ``l2p*``; a list = any).

    A filter that matches no run is a UsageError naming the values there are.
    """
    kept = runs
    for key, patterns in filters.items():
        if not patterns:
            continue
        if key not in FILTER_KEYS:
            raise UsageError(f"unknown filter {key!r}; valid filters: {', '.join(FILTER_KEYS)}")
        values = kept[key].map(display_value)
        if key == "backbone":  # --backbone vit-tiny-random also matches its random runs
            values = values.str.removesuffix(RANDOM_WEIGHTS_MARK)
        mask = values.map(lambda value, pats=tuple(patterns): matches_any(value, pats))
        if not mask.any():
            there = ", ".join(sorted(set(values))) or "none"
            raise UsageError(
                f"no run matches --{key} {' '.join(patterns)}; {key} values there: {there}"
            )
        kept = kept[mask]
    return kept.reset_index(drop=True)


def _planned_tasks(scenario_options: dict[str, Any]) -> int | None:
    """The task count a run's options ask for (an explicit ``task_sizes`` list wins), until
    its first record gives the real one."""
    sizes = scenario_options.get("task_sizes")
    if sizes:
        return len(sizes)
    tasks = scenario_options.get("num_experiences")
    return None if tasks is None else int(tasks)

"""Accuracy / forgetting tables from run folders, with the papers' numbers beside ours.

Everything here is a pure function of the run folders (see :mod:`clbench.results`):
``load_runs`` reads the small JSON files of each run into one pandas frame, one row per
run; ``summarise`` groups it into one row per (scenario, backbone, strategy) with mean and
std over seeds; the ``*_table`` functions turn summaries into :class:`DisplayTable` s that
``render`` writes as Markdown, LaTeX (booktabs), CSV or JSON.

Two rules keep the numbers honest:

* only runs whose status is ``complete`` are averaged; running, interrupted, failed,
  unreadable runs and a second complete run of the same seed are counted in a "not
  averaged" column (and listed with ``include_incomplete``), never mixed into a mean;
* runs of different protocol versions, or whose options differ (``--set lr=...``,
  ``scenario.num_experiences=...``), get rows of their own, labelled with what differs.

This module imports neither torch nor avalanche (nor :mod:`clbench.results`, which does):
building a table from thousands of runs reads a few kilobytes of JSON per run and should
take about as long as starting Python.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench import metrics as cl_metrics
from clbench.errors import UsageError

# -- vocabulary -------------------------------------------------------------------------

AVERAGED_STATE = "complete"
# Order in which "not averaged" reasons are listed.
EXCLUSION_REASONS = ("running", "interrupted", "failed", "unknown", "unreadable", "duplicate seed")
ROW_KEYS = ("scenario", "backbone", "strategy")
DEFAULT_GROUP_BY = ROW_KEYS
FILTER_KEYS = ("scenario", "backbone", "strategy", "seed", "protocol")
FORMATS = ("markdown", "latex", "csv", "json")


@dataclass(frozen=True)
class Metric:
    key: str
    header: str  # the arrow says which way is better, so the table reads on its own
    higher_is_better: bool
    description: str


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("faa", "FAA ↑", True, "final average accuracy over all tasks"),
        Metric("caa", "CAA ↑", True, "average incremental accuracy"),
        Metric("ffm", "FFM ↓", False, "final forgetting"),
        Metric(
            "seen",
            "Seen ↑",
            True,
            "sample-weighted accuracy on all seen classes after the last task (CRE metric)",
        ),
        Metric(
            "tii",
            "TII ↑",
            True,
            "task-identity accuracy after the last task, mean over tasks (methods that infer "
            "the task: prompt / pool choice)",
        ),
        Metric("minutes", "Time (min) ↓", False, "training + evaluation time of the run"),
    )
}

# Our scenario names -> the family the papers' numbers are reported for. The offline
# scenarios are small versions of a paper protocol: they are compared with its numbers,
# but marked "protocol differs" (see ``protocol_differences``).
SCENARIO_FAMILIES = {
    "fewrel": "fewrel",
    "fewrel-offline": "fewrel",
    "tacred": "tacred",
    "split-cifar100": "split-cifar100",
    "imagenet-r": "imagenet-r",
    "digits-offline": "digits",
}
# Continual relation extraction reports the pooled seen-class accuracy; for equal-size
# class-incremental vision tasks it equals FAA and is left out of the table.
CRE_FAMILIES = frozenset({"fewrel", "tacred"})

# Options that do not change results (how fast evaluation runs) or that name a file on one
# machine: leaving them out of a run's "setting" keeps identical protocols in one row.
RESULT_NEUTRAL_OPTIONS = frozenset({"eval_batch_size", "num_workers"})
PATH_OPTIONS = frozenset({"scenario.data_file", "backbone.checkpoint", "backbone.path"})


def scenario_family(scenario: str) -> str:
    return SCENARIO_FAMILIES.get(scenario, scenario.removesuffix("-offline"))


def is_cre(scenario: str) -> bool:
    return scenario_family(scenario) in CRE_FAMILIES


# -- finding and reading run folders ----------------------------------------------------

RUN_MARKER = "config.json"


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
        if any(entry.name == RUN_MARKER for entry in entries):
            runs.append(Path(folder))
            continue
        pending.extend(
            entry.path
            for entry in entries
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
        )
    return runs


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


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


RUN_COLUMNS = (
    "path", "scenario", "backbone", "strategy", "seed", "protocol", "state", "error",
    "finished", "tasks", "faa", "caa", "ffm", "seen", "tii", "minutes", "seen_curve",
    "setting_options",
    "matrix",
)  # fmt: skip


def read_run(path: Path, *, with_matrix: bool = False) -> dict[str, Any]:
    """One run as a flat record; an unreadable folder becomes a record with state
    ``unreadable`` (shown in the table, never averaged), not an exception."""
    record: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    record.update(path=str(path), state="unreadable", finished=0, seen_curve=())
    try:
        config = _read_json(path / "config.json")
        record.update(
            scenario=str(config["scenario"]),
            # module:Class strategies are filed under the class name (see new_run_folder)
            strategy=str(config["strategy"]).rpartition(":")[2] or str(config["strategy"]),
            backbone=str(config["backbone"]),
            seed=None if config.get("seed") is None else int(config["seed"]),
            protocol=str(config.get("protocol_version", "?")),
            setting_options=json.dumps(setting_of(config), sort_keys=True),
            # known before any task finishes, for scenarios that take the option
            tasks=(config.get("scenario_options") or {}).get("num_experiences"),
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
        status = _read_json(path / "status.json")
        record["state"] = str(status.get("state", "unknown"))
        record["error"] = status.get("error")
    except FileNotFoundError:
        record["state"] = "unknown"
    except (OSError, ValueError) as error:
        record.update(state="unreadable", error=f"status.json: {error}")
        return record
    # progress.json also holds the strategies' per-evaluation extras (task identity)
    needs_progress = True
    try:
        summary = _read_json(path / "metrics.json")
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
    if needs_progress:
        try:
            progress = _read_json(path / "progress.json")
            rows = [r["accuracy"] for r in progress]
            matrix = np.asarray(rows, dtype=float)
            record["tii"] = _final_task_identity(progress)
            if matrix.size:
                record["tasks"] = int(matrix.shape[1])
                record["finished"] = int(matrix.shape[0])
            if with_matrix:
                record["matrix"] = matrix
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as error:
            record.update(state="unreadable", error=f"progress.json: {error}")
    return record


def _final_task_identity(progress: list[dict[str, Any]]) -> float:
    """Mean over the learnt tasks of the last evaluation's task-identity accuracy (NaN
    when the strategy does not infer tasks)."""
    if not progress:
        return math.nan
    accuracy = (progress[-1].get("extra") or {}).get("task_identity_accuracy") or ()
    seen = [float(a) for a in accuracy if a is not None]
    return sum(seen) / len(seen) if seen else math.nan


def load_runs(paths: Iterable[Path | str], *, with_matrix: bool = False) -> pd.DataFrame:
    """One row per run folder under ``paths`` (see ``RUN_COLUMNS``).

    ``with_matrix`` also reads each accuracy matrix (progress.json), needed for per-task
    tables and plots; the summary table needs only config, status and metrics.
    """
    records = [read_run(path, with_matrix=with_matrix) for path in find_run_folders(paths)]
    runs = pd.DataFrame.from_records(records, columns=list(RUN_COLUMNS))
    for column in ("faa", "caa", "ffm", "seen", "tii", "minutes"):
        runs[column] = runs[column].astype(float)
    # nullable integers: a run without a seed must not turn every seed into 1.0
    runs["seed"] = runs["seed"].astype("Int64")
    runs["tasks"] = runs["tasks"].astype("Int64")
    return runs


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def filter_runs(runs: pd.DataFrame, filters: dict[str, Sequence[str]]) -> pd.DataFrame:
    """Keep runs whose values match each filter (shell patterns: ``l2p*``; a list = any).

    A filter that matches no run is a UsageError naming the values there are.
    """
    kept = runs
    for key, patterns in filters.items():
        if not patterns:
            continue
        if key not in FILTER_KEYS:
            raise UsageError(f"unknown filter {key!r}; valid filters: {', '.join(FILTER_KEYS)}")
        values = kept[key].map(_display_value)
        mask = values.map(lambda value, pats=tuple(patterns): _matches(value, pats))
        if not mask.any():
            there = ", ".join(sorted(set(values))) or "none"
            raise UsageError(
                f"no run matches --{key} {' '.join(patterns)}; {key} values there: {there}"
            )
        kept = kept[mask]
    return kept.reset_index(drop=True)


# -- grouping runs into rows ------------------------------------------------------------


@dataclass(frozen=True)
class TableOptions:
    """How runs become rows and rows a table."""

    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    metrics: tuple[str, ...] | None = None  # None: FAA, CAA, FFM, and Seen where it applies
    sort: str | None = None
    descending: bool = False
    precision: int = 2
    ddof: int = 1  # sample standard deviation over seeds

    def __post_init__(self) -> None:
        if not self.group_by or any(key not in ROW_KEYS for key in self.group_by):
            raise UsageError(
                f"unknown --group-by {','.join(self.group_by)!r}; "
                f"choose among {', '.join(ROW_KEYS)}"
            )
        for key in self.metrics or ():
            if key not in METRICS:
                raise UsageError(f"unknown metric {key!r}; valid metrics: {', '.join(METRICS)}")
        sortable = (*ROW_KEYS, "seeds", *METRICS)
        if self.sort is not None and self.sort not in sortable:
            raise UsageError(f"unknown sort column {self.sort!r}; valid: {', '.join(sortable)}")
        if self.ddof not in (0, 1):
            raise UsageError(f"--ddof must be 0 or 1, not {self.ddof}")
        if not 0 <= self.precision <= 6:
            raise UsageError(f"--precision must be between 0 and 6, not {self.precision}")

    @property
    def row_keys(self) -> list[str]:
        # setting and protocol are always part of a row: different protocols never average
        return [*self.group_by, "setting", "protocol"]

    @property
    def block_keys(self) -> list[str]:
        """Rows compared with each other (best value marked) share these keys."""
        if "strategy" in self.group_by:
            return [key for key in self.group_by if key != "strategy"]
        return list(self.group_by[:-1])


def assign_rows(runs: pd.DataFrame, options: TableOptions) -> pd.DataFrame:
    """Add ``setting`` (what differs from other runs of the row), ``averaged`` and
    ``reason`` (why a run is not averaged) to a frame of runs."""
    runs = runs.copy()
    runs["setting"] = ""
    runs["reason"] = runs["state"].where(runs["state"] != AVERAGED_STATE, "")
    scope = [*options.group_by, "protocol"]
    variety = runs.groupby(scope, dropna=False)["setting_options"].transform("nunique")
    for _, group in runs[variety > 1].groupby(scope, dropna=False):
        runs.loc[group.index, "setting"] = _setting_labels(group["setting_options"])
    # A seed run twice (a rerun after a fix, a copied folder) counts once: the newest run,
    # by folder name (which ends with its start time), is the one averaged.
    complete = runs[runs["reason"] == ""].sort_values("path")
    identity = [*ROW_KEYS, "protocol", "setting_options", "seed"]
    repeated = complete.duplicated(subset=identity, keep="last")
    runs.loc[repeated[repeated].index, "reason"] = "duplicate seed"
    runs["averaged"] = runs["reason"] == ""
    return runs


def _setting_labels(settings: pd.Series) -> pd.Series:
    """``lr=0.01, scenario.num_experiences=2``: only the options that differ in the group."""
    distinct = {text: json.loads(text) for text in settings.unique()}
    keys = sorted({key for options in distinct.values() for key in options})
    varying = [k for k in keys if len({options.get(k) for options in distinct.values()}) > 1]
    # a key missing from a run's options: the run predates the option (its default then)
    labels = {
        text: ", ".join(f"{k}={json.loads(o[k]) if k in o else '(not recorded)'}" for k in varying)
        for text, o in distinct.items()
    }
    return settings.map(labels)


def _display_value(value: Any) -> str:
    """Text of a key value; missing (None, NaN, pd.NA) is the empty string."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _metric_columns(runs: pd.DataFrame, options: TableOptions) -> list[str]:
    if options.metrics:
        return list(options.metrics)
    averaged = runs[runs["averaged"]] if "averaged" in runs else runs
    show_seen = bool(averaged["scenario"].map(is_cre).any())
    show_tii = bool(averaged["tii"].notna().any())
    return ["faa", "caa", "ffm", *(["seen"] if show_seen else []), *(["tii"] if show_tii else [])]


def summarise(runs: pd.DataFrame, options: TableOptions) -> pd.DataFrame:
    """One row per row key: ``seeds`` averaged, ``<metric>_mean/_std/_best``, ``tasks``
    and ``not_averaged`` (e.g. "1 failed, 1 running")."""
    if "averaged" not in runs:
        runs = assign_rows(runs, options)
    keys = options.row_keys
    metric_keys = list(METRICS)
    values = runs[[*keys, "averaged", "tasks", *metric_keys]].copy()
    # The seen-class accuracy belongs to relation extraction; elsewhere it is left blank.
    values.loc[~runs["scenario"].map(is_cre), "seen"] = math.nan
    averaged = values[values["averaged"]]
    grouped = averaged.groupby(keys, dropna=False)
    table = grouped.size().rename("seeds").to_frame()
    table["tasks"] = grouped["tasks"].max()
    for key in metric_keys:
        table[f"{key}_mean"] = grouped[key].mean()
        table[f"{key}_std"] = grouped[key].std(ddof=options.ddof)
    # Rows with no complete run still appear, with their reasons, and no numbers.
    every_row = runs.groupby(keys, dropna=False).size().rename("runs")
    table = every_row.to_frame().join(table, how="left")
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    table["not_averaged"] = _exclusion_text(runs, keys).reindex(table.index).fillna("")
    table = table.reset_index()
    table = _sort_rows(table, options)
    for key in metric_keys:
        table[f"{key}_best"] = _best_in_block(table, key, options)
    return table


def _exclusion_text(runs: pd.DataFrame, keys: list[str]) -> pd.Series:
    excluded = runs[~runs["averaged"]]
    if excluded.empty:
        return pd.Series(dtype=object)
    counts = excluded.groupby([*keys, "reason"], dropna=False).size()
    order = {reason: i for i, reason in enumerate(EXCLUSION_REASONS)}
    texts: dict[tuple, str] = {}
    for row_key, row_counts in counts.groupby(level=list(range(len(keys))), dropna=False):
        items = sorted(
            ((index[-1], int(n)) for index, n in row_counts.items()),
            key=lambda item: (order.get(item[0], len(order)), item[0]),
        )
        texts[row_key] = ", ".join(f"{n} {reason}" for reason, n in items)
    return pd.Series(texts, dtype=object).rename_axis(keys)


def _sort_rows(table: pd.DataFrame, options: TableOptions) -> pd.DataFrame:
    # Rows of one block (same scenario and backbone) stay together; within a block the
    # sort key orders them (by default the row keys, alphabetically).
    block = options.block_keys
    order = [*block, *[k for k in options.row_keys if k not in block]]
    if options.sort is None:
        return table.sort_values(order, kind="stable").reset_index(drop=True)
    column = f"{options.sort}_mean" if options.sort in METRICS else options.sort
    table = table.sort_values(order, kind="stable")
    table = table.sort_values(column, ascending=not options.descending, kind="stable")
    if block:
        table = table.sort_values(block, kind="stable")
    return table.reset_index(drop=True)


def _best_in_block(table: pd.DataFrame, metric: str, options: TableOptions) -> pd.Series:
    # Compared at the printed precision, so that equal-looking numbers are both marked.
    rounded = table[f"{metric}_mean"].round(options.precision)
    if options.block_keys:
        blocks = table[options.block_keys].astype(str).agg("\x1f".join, axis=1)
    else:
        blocks = pd.Series("", index=table.index)
    by_block = rounded.groupby(blocks)
    better = by_block.transform("max" if METRICS[metric].higher_is_better else "min")
    # A row alone in its block is not "best" at anything: no mark without a comparison.
    compared = by_block.transform("count") >= 2
    return (rounded == better) & rounded.notna() & compared


# -- per-task curves --------------------------------------------------------------------

PER_TASK_METRICS = ("auto", "average", "seen")


def average_accuracy_curve(matrix: np.ndarray) -> np.ndarray:
    """(1/t) sum_{i<=t} A[t, i] after each task t: FAA of the run stopped there."""
    matrix = np.asarray(matrix, dtype=float)
    seen = np.tril(np.ones((matrix.shape[0], matrix.shape[1]), dtype=bool))
    return np.where(seen, matrix, 0.0).sum(axis=1) / seen.sum(axis=1)


def forgetting_per_task(matrix: np.ndarray) -> np.ndarray:
    """max_{t >= i} A[t, i] - A[T, i] for each task i < T: the terms whose mean is FFM."""
    matrix = np.asarray(matrix, dtype=float)
    last = matrix.shape[0] - 1
    return np.array([matrix[i:, i].max() - matrix[last, i] for i in range(last)])


def curve_metric(scenario: str, requested: str) -> str:
    if requested not in PER_TASK_METRICS:
        raise UsageError(
            f"unknown per-task metric {requested!r}; valid: {', '.join(PER_TASK_METRICS)}"
        )
    if requested == "auto":
        return "seen" if is_cre(scenario) else "average"
    return requested


def accuracy_curve(run: pd.Series, metric: str) -> np.ndarray:
    """Accuracy after each finished task of one run (``metric`` = average | seen)."""
    if metric == "seen":
        return np.asarray(run["seen_curve"], dtype=float)
    if run["matrix"] is None:
        raise ValueError("the accuracy matrix was not loaded: load_runs(..., with_matrix=True)")
    return average_accuracy_curve(run["matrix"])


def _stack(curves: list[np.ndarray]) -> np.ndarray:
    width = max((len(c) for c in curves), default=0)
    stacked = np.full((len(curves), width), np.nan)
    for row, curve in enumerate(curves):
        stacked[row, : len(curve)] = curve
    return stacked


def mean_std(curves: list[np.ndarray], ddof: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std and count per position over curves of possibly different lengths."""
    stacked = _stack(curves)
    count = np.sum(~np.isnan(stacked), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(stacked, axis=0) if stacked.size else np.zeros(0)
        centred = np.nan_to_num(stacked - mean)
        var = (centred**2).sum(axis=0) / (count - ddof)
    std = np.where(count - ddof > 0, np.sqrt(var), np.nan)
    return mean, std, count


def per_task_summary(
    runs: pd.DataFrame, options: TableOptions, metric: str = "auto"
) -> pd.DataFrame:
    """One row per row key: mean / std over seeds of the accuracy after each task."""
    if "averaged" not in runs:
        runs = assign_rows(runs, options)
    averaged = runs[runs["averaged"]]
    rows: list[dict[str, Any]] = []
    for key, group in averaged.groupby(options.row_keys, dropna=False, sort=True):
        which = curve_metric(group["scenario"].iloc[0], metric)
        curves = [accuracy_curve(run, which) for _, run in group.iterrows()]
        mean, std, _ = mean_std(curves, options.ddof)
        row = dict(zip(options.row_keys, key))
        row.update(seeds=len(group), metric=which)
        for task, (m, s) in enumerate(zip(mean, std), start=1):
            row[f"t{task}_mean"], row[f"t{task}_std"] = float(m), float(s)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*options.row_keys, "seeds", "metric"])
    return _sort_rows(pd.DataFrame(rows), TableOptions(options.group_by))


# -- reference (published) numbers ------------------------------------------------------

REFERENCE_REQUIRED = ("source", "scenario", "backbone", "method", "metric", "value")
REFERENCE_COLUMNS = (
    "source", "arxiv", "table", "scenario", "protocol", "tasks", "classes", "backbone",
    "seeds", "method", "strategy", "metric", "task", "value", "std", "note",
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_reference_dir() -> Path | None:
    for candidate in (Path.cwd() / "results" / "reference", REPO_ROOT / "results" / "reference"):
        if candidate.is_dir() and any(candidate.glob("*.csv")):
            return candidate
    return None


def load_reference(directory: Path | None = None) -> pd.DataFrame:
    """The papers' numbers: every ``*.csv`` in ``directory`` (one file per paper)."""
    directory = directory or default_reference_dir()
    if directory is None or not Path(directory).is_dir():
        raise UsageError(
            f"no reference folder {'at ' + str(directory) if directory else 'found'}: "
            "give one with --reference-dir (results/reference/ of the repository holds one)"
        )
    frames = []
    for path in sorted(Path(directory).glob("*.csv")):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, comment="#")
        missing = [c for c in REFERENCE_REQUIRED if c not in frame.columns]
        if missing:
            raise UsageError(f"{path}: missing reference column(s) {', '.join(missing)}")
        unknown = sorted(set(frame["metric"]) - set(METRICS))
        if unknown:
            raise UsageError(f"{path}: unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}")
        frame = frame.reindex(columns=list(REFERENCE_COLUMNS), fill_value="")
        try:
            frame["value"] = frame["value"].astype(float)
            frame["std"] = pd.to_numeric(frame["std"].replace("", None), errors="raise")
        except ValueError as error:
            raise UsageError(f"{path}: a value or std is not a number ({error})") from None
        frame["file"] = path.name
        frames.append(frame)
    if not frames:
        raise UsageError(f"no reference file (*.csv) in {directory}")
    return pd.concat(frames, ignore_index=True)


def _final_task_rows(reference: pd.DataFrame) -> pd.DataFrame:
    # A row with no task index, or with the last one, is an after-the-last-task number.
    final = (reference["task"] == "") | (reference["task"] == reference["tasks"])
    return reference[final]


def protocol_differences(
    scenario: str, tasks: int | None, backbone: str, paper: pd.Series
) -> list[str]:
    """What differs between our row and a paper's protocol, in words ([] = the same)."""
    notes = []
    if scenario != paper["scenario"]:
        notes.append(f"scenario {scenario} vs {paper['scenario']}")
    if paper["tasks"] and tasks is not None and str(tasks) != str(paper["tasks"]):
        notes.append(f"{tasks} vs {paper['tasks']} tasks")
    if not backbone:
        notes.append("backbones pooled in one row (--group-by)")
    elif backbone != paper["backbone"] and not backbone.startswith(paper["backbone"]):
        # a family name (vit-b16) matches any of its weights (vit-b16-in21k): see caveats
        notes.append(f"backbone {backbone} vs {paper['backbone']}")
    return notes


def caveats(backbone: str, paper: pd.Series) -> list[str]:
    """What we cannot check: the reference names only a backbone family."""
    if backbone and backbone != paper["backbone"] and backbone.startswith(paper["backbone"]):
        return [f"paper's {paper['backbone']} weights not recorded"]
    return []


def reference_comparison(
    summary: pd.DataFrame, reference: pd.DataFrame, options: TableOptions,
    strategies: Sequence[str] = (),
) -> pd.DataFrame:  # fmt: skip
    """Our rows beside the papers' final-task numbers, matched on scenario family and
    strategy; a paper row for a family we ran but a strategy we did not still appears."""
    if "scenario" not in options.group_by or "strategy" not in options.group_by:
        raise UsageError("--reference needs rows per scenario and strategy (--group-by)")
    ours = summary[summary["seeds"] > 0].assign(family=lambda t: t["scenario"].map(scenario_family))
    papers = _final_task_rows(reference).assign(family=lambda t: t["scenario"].map(scenario_family))
    papers = papers[papers["family"].isin(set(ours["family"]))]
    if strategies:
        papers = papers[papers["strategy"].map(lambda name: _matches(name, strategies))]
    rows = []
    for _, paper in papers.iterrows():
        matches = ours[
            (ours["family"] == paper["family"]) & (ours["strategy"] == paper["strategy"])
        ]
        if matches.empty:
            rows.append(_comparison_row(None, paper))
        rows += [_comparison_row(row, paper) for _, row in matches.iterrows()]
    columns = [
        "scenario", "backbone", "strategy", "setting", "metric", "ours_mean", "ours_std",
        "seeds", "published", "published_std", "difference", "method", "source", "arxiv",
        "table", "paper_seeds", "paper_scenario", "paper_tasks", "paper_backbone",
        "protocol_differs", "note",
    ]  # fmt: skip
    comparison = pd.DataFrame(rows, columns=columns)
    # Per scenario family: rows with runs of ours first, then the published-only ones, each
    # in the order of the reference files (which follow the papers' tables).
    order = comparison.assign(
        family=comparison["paper_scenario"].map(scenario_family), alone=comparison["seeds"] == 0
    )
    order = order.sort_values(["family", "alone"], kind="stable")
    return comparison.loc[order.index].reset_index(drop=True)


def _comparison_row(row: pd.Series | None, paper: pd.Series) -> dict[str, Any]:
    metric = paper["metric"]
    if row is None:
        ours = dict(scenario=paper["scenario"], backbone=paper["backbone"], setting="")
        mean, std, seeds, differs = math.nan, math.nan, 0, []
        note = "no run of ours"
    else:
        ours = dict(
            scenario=row["scenario"], backbone=row.get("backbone", ""), setting=row["setting"]
        )
        mean, std, seeds = row[f"{metric}_mean"], row[f"{metric}_std"], int(row["seeds"])
        tasks = None if pd.isna(row["tasks"]) else int(row["tasks"])
        differs = protocol_differences(row["scenario"], tasks, ours["backbone"], paper)
        note = "protocol differs: " + "; ".join(differs) if differs else "same protocol"
        note = "; ".join([note, *caveats(ours["backbone"], paper)])
    if paper["note"]:
        note += f" ({paper['note']})"
    return dict(
        **ours, strategy=paper["strategy"], metric=metric, ours_mean=mean, ours_std=std,
        seeds=seeds, published=paper["value"], published_std=paper["std"],
        difference=mean - paper["value"], method=paper["method"], source=paper["source"],
        arxiv=paper["arxiv"], table=paper["table"], paper_seeds=paper["seeds"],
        paper_scenario=paper["scenario"], paper_tasks=paper["tasks"],
        paper_backbone=paper["backbone"], protocol_differs=bool(differs), note=note,
    )  # fmt: skip


# -- display tables ---------------------------------------------------------------------

DASH = "—"


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class DisplayTable:
    """A table as shown (Markdown / LaTeX / HTML) and as data (CSV / JSON)."""

    name: str  # key in JSON output, label suffix in LaTeX
    title: str
    columns: list[str]
    numeric: list[bool]  # right-aligned columns
    rows: list[list[Cell]]
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    block_starts: set[int] = field(default_factory=set)  # rows after a rule (LaTeX)


def format_mean_std(mean: float, std: float, precision: int) -> str:
    if mean is None or pd.isna(mean):
        return DASH
    text = f"{mean:.{precision}f}"
    return text if pd.isna(std) else f"{text} ± {std:.{precision}f}"


def _optional_columns(table: pd.DataFrame, keys: list[str]) -> list[str]:
    """Row keys worth a column: setting and protocol only where they tell rows apart."""
    shown = [k for k in keys if k not in ("setting", "protocol")]
    if (table["setting"] != "").any():
        shown.append("setting")
    if table["protocol"].nunique() > 1:
        shown.append("protocol")
    return shown


def _block_starts(table: pd.DataFrame, block_keys: list[str]) -> set[int]:
    if not block_keys or table.empty:
        return set()
    blocks = table[block_keys].astype(str).agg("\x1f".join, axis=1)
    return {i for i in range(1, len(table)) if blocks.iloc[i] != blocks.iloc[i - 1]}


def _protocol_text(value: str, newest: str) -> str:
    return f"v{value}" + ("" if value == newest else " (old)")


def main_table(summary: pd.DataFrame, runs: pd.DataFrame, options: TableOptions) -> DisplayTable:
    metric_keys = _metric_columns(runs, options)
    keys = _optional_columns(summary, options.row_keys)
    show_excluded = (summary["not_averaged"] != "").any()
    newest = _newest_protocol(summary["protocol"])
    columns = [*keys, "seeds", *(METRICS[m].header for m in metric_keys)]
    numeric = [False] * len(keys) + [True] * (1 + len(metric_keys))
    if show_excluded:
        columns.append("not averaged")
        numeric.append(False)
    rows = []
    for _, row in summary.iterrows():
        cells = [
            Cell(_protocol_text(row[k], newest) if k == "protocol" else _display_value(row[k]))
            for k in keys
        ]
        cells.append(Cell(str(int(row["seeds"]))))
        for m in metric_keys:
            text = format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], options.precision)
            cells.append(Cell(text, bold=bool(row[f"{m}_best"]) and text != DASH))
        if show_excluded:
            cells.append(Cell(row["not_averaged"]))
        rows.append(cells)
    data_columns = [
        *options.row_keys, "seeds", "tasks",
        *[f"{m}_{part}" for m in metric_keys for part in ("mean", "std", "best")],
        "not_averaged", "runs",
    ]  # fmt: skip
    return DisplayTable(
        name="summary",
        title="Accuracy and forgetting (%)",
        columns=columns,
        numeric=numeric,
        rows=rows,
        data=summary[data_columns],
        notes=_main_notes(summary, runs, options, metric_keys),
        block_starts=_block_starts(summary, options.block_keys),
    )


def _newest_protocol(protocols: pd.Series) -> str:
    known = [p for p in protocols.unique() if str(p).isdigit()]
    return max(known, key=int) if known else "?"


def _main_notes(
    summary: pd.DataFrame, runs: pd.DataFrame, options: TableOptions, metric_keys: list[str]
) -> list[str]:
    std_kind = "sample std" if options.ddof == 1 else "population std"
    block = " and ".join(options.block_keys) or "table"
    notes = [
        f"mean ± std over seeds ({std_kind}, ddof={options.ddof}); bold: best per {block}.",
        "; ".join(f"{METRICS[m].header.split()[0]}: {METRICS[m].description}" for m in metric_keys)
        + ".",
    ]
    if (summary["setting"] != "").any():
        notes.append("setting: the options in which runs of the same method differ.")
    if summary["protocol"].nunique() > 1:
        notes.append("runs of different protocol versions are never averaged together.")
    notes.append("runs: " + run_counts_text(runs) + ".")
    return notes


def run_counts_text(runs: pd.DataFrame) -> str:
    """``4 complete, 1 failed (not averaged)``."""
    if "averaged" not in runs:
        return f"{len(runs)} runs"
    averaged = int(runs["averaged"].sum())
    reasons = runs.loc[~runs["averaged"], "reason"].value_counts()
    order = {reason: i for i, reason in enumerate(EXCLUSION_REASONS)}
    parts = [
        f"{int(reasons[r])} {r}"
        for r in sorted(reasons.index, key=lambda r: (order.get(r, len(order)), r))
    ]
    text = f"{averaged} complete"
    return text + (f", {', '.join(parts)} (not averaged)" if parts else "")


def per_task_table(table: pd.DataFrame, options: TableOptions) -> DisplayTable:
    keys = _optional_columns(table, options.row_keys) if len(table) else list(options.group_by)
    show_metric = table["metric"].nunique() > 1 if len(table) else False
    tasks = sorted(
        (int(c[1:-5]) for c in table.columns if c.startswith("t") and c.endswith("_mean")),
    )
    columns = [*keys, *(["metric"] if show_metric else []), "seeds", *[f"T{t}" for t in tasks]]
    numeric = [False] * (len(keys) + show_metric) + [True] * (1 + len(tasks))
    rows = []
    for _, row in table.iterrows():
        cells = [Cell(_display_value(row[k])) for k in keys]
        if show_metric:
            cells.append(Cell(row["metric"]))
        cells.append(Cell(str(int(row["seeds"]))))
        cells += [
            Cell(format_mean_std(row.get(f"t{t}_mean"), row.get(f"t{t}_std"), options.precision))
            for t in tasks
        ]
        rows.append(cells)
    which = set(table["metric"]) if len(table) else set()
    described = {
        "average": "average accuracy over the tasks seen so far",
        "seen": "sample-weighted accuracy on all classes seen so far",
    }
    return DisplayTable(
        name="per_task",
        title="Accuracy after each task (%)",
        columns=columns,
        numeric=numeric,
        rows=rows,
        data=table,
        notes=[
            "Tt: accuracy after training task t, "
            + "; ".join(f"{m}: {described[m]}" for m in sorted(which))
            + f"; mean ± std over seeds (ddof={options.ddof}).",
        ],
        block_starts=_block_starts(table, options.block_keys) if len(table) else set(),
    )


def comparison_table(comparison: pd.DataFrame, options: TableOptions) -> DisplayTable:
    show_setting = (comparison["setting"] != "").any()
    columns = [
        "scenario", "backbone", "strategy", *(["setting"] if show_setting else []), "metric",
        "ours", "seeds", "published", "Δ", "source", "note",
    ]  # fmt: skip
    numeric = [c in ("ours", "seeds", "published", "Δ") for c in columns]
    p = options.precision
    rows = []
    for _, row in comparison.iterrows():
        source = ", ".join(
            part
            for part in (
                row["source"]
                if row["source"].startswith(row["method"])
                else f"{row['method']} in {row['source']}",
                row["table"],
                f"arXiv {row['arxiv']}" if row["arxiv"] else "",
                f"{row['paper_seeds']} seeds" if row["paper_seeds"] else "",
            )
            if part
        )
        difference = DASH if pd.isna(row["difference"]) else f"{row['difference']:+.{p}f}"
        cells = [Cell(row["scenario"]), Cell(row["backbone"]), Cell(row["strategy"])]
        if show_setting:
            cells.append(Cell(row["setting"]))
        cells += [
            Cell(METRICS[row["metric"]].header.split()[0]),
            Cell(format_mean_std(row["ours_mean"], row["ours_std"], p)),
            Cell(str(row["seeds"])),
            Cell(format_mean_std(row["published"], row["published_std"], p)),
            Cell(difference),
            Cell(source),
            Cell(row["note"]),
        ]
        rows.append(cells)
    return DisplayTable(
        name="reference",
        title="Ours beside the published numbers (after the last task, %)",
        columns=columns,
        numeric=numeric,
        rows=rows,
        data=comparison,
        notes=[
            "Δ = ours − published. A row whose protocol differs is not like for like "
            "(another scenario size, task count or backbone): read it as a sanity check.",
        ],
        block_starts=_block_starts(comparison, ["scenario", "backbone"]),
    )


def not_averaged_table(
    runs: pd.DataFrame, options: TableOptions, roots: Sequence[Path]
) -> DisplayTable:
    excluded = runs[~runs["averaged"]].sort_values(["scenario", "backbone", "strategy", "path"])
    p = options.precision
    rows = []
    for _, run in excluded.iterrows():
        total = "?" if pd.isna(run["tasks"]) else run["tasks"]
        progress = f"{run['finished']}/{total}"
        error = _display_value(run["error"])
        reason = run["reason"] + (f": {error}" if error else "")
        rows.append(
            [
                Cell(run["scenario"]), Cell(run["backbone"]), Cell(run["strategy"]),
                Cell(_display_value(run["seed"])), Cell(reason), Cell(progress),
                Cell(DASH if pd.isna(run["faa"]) else f"{run['faa']:.{p}f}"),
                Cell(_relative(run["path"], roots)),
            ]
        )  # fmt: skip
    return DisplayTable(
        name="not_averaged",
        title="Runs not averaged",
        columns=[
            "scenario",
            "backbone",
            "strategy",
            "seed",
            "why",
            "tasks done",
            "FAA so far",
            "folder",
        ],
        numeric=[False, False, False, True, False, True, True, False],
        rows=rows,
        data=excluded.drop(columns=["matrix", "seen_curve"]),
        notes=["incomplete, failed or repeated runs: shown, never averaged into the tables."],
    )


def _relative(path: str, roots: Sequence[Path]) -> str:
    for root in roots:
        try:
            relative = Path(path).relative_to(root)
            return str(relative) if relative.parts else Path(path).name
        except ValueError:
            continue
    return path


# -- building everything the CLI asks for -----------------------------------------------


@dataclass
class TableRequest:
    paths: list[Path]
    filters: dict[str, list[str]] = field(default_factory=dict)
    options: TableOptions = field(default_factory=TableOptions)
    per_task: bool = False
    per_task_metric: str = "auto"
    reference: bool = False
    reference_dir: Path | None = None
    include_incomplete: bool = False


def build_tables(request: TableRequest) -> list[DisplayTable]:
    """The tables of ``clbench table``, from the run folders alone."""
    if request.per_task_metric not in PER_TASK_METRICS:
        curve_metric("", request.per_task_metric)  # raises the UsageError
    runs = load_runs(request.paths, with_matrix=request.per_task)
    runs = assign_rows(filter_runs(runs, request.filters), request.options)
    summary = summarise(runs, request.options)
    tables = [main_table(summary, runs, request.options)]
    if request.per_task:
        per_task = per_task_summary(runs, request.options, request.per_task_metric)
        tables.append(per_task_table(per_task, request.options))
    if request.reference:
        reference = load_reference(request.reference_dir)
        comparison = reference_comparison(
            summary, reference, request.options, request.filters.get("strategy", ())
        )
        tables.append(comparison_table(comparison, request.options))
    if request.include_incomplete and not runs["averaged"].all():
        tables.append(not_averaged_table(runs, request.options, request.paths))
    return tables


# -- rendering --------------------------------------------------------------------------


def render(tables: Sequence[DisplayTable], fmt: str) -> str:
    if fmt == "markdown":
        return "\n".join(to_markdown(t) for t in tables)
    if fmt == "latex":
        return "\n".join(to_latex(t) for t in tables)
    if fmt == "csv":
        # CSV holds one table: the summary, or the one other table asked for beside it.
        extras = list(tables[1:])
        if len(extras) > 1:
            names = ", ".join(t.name for t in extras)
            raise UsageError(
                f"--format csv writes one table, but {len(extras)} were asked for beside the "
                f"summary ({names}): use --format json, or ask for one"
            )
        return to_csv(extras[0] if extras else tables[0])
    if fmt == "json":
        return to_json(tables)
    raise UsageError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def _markdown_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|")
    return f"**{text}**" if cell.bold and text else text


def to_markdown(table: DisplayTable) -> str:
    lines = [f"## {table.title}", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in table.numeric) + "|")
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in table.rows]
    if not table.rows:
        lines.append("| " + " | ".join(["(none)", *[""] * (len(table.columns) - 1)]) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


# LaTeX specials first, then the few non-ASCII characters our tables print.
LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "—": "---",
    "−": "--", "<": r"\textless{}", ">": r"\textgreater{}", "\"": "''",
}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def to_latex(table: DisplayTable) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    spec = "".join("r" if n else "l" for n in table.numeric)
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + " \\\\",
        "\\midrule",
    ]
    for index, row in enumerate(table.rows):
        if index in table.block_starts:
            lines.append("\\midrule")
        cells = [latex_escape(c.text) for c in row]
        cells = [f"\\textbf{{{t}}}" if c.bold and t else t for c, t in zip(row, cells)]
        lines.append(" & ".join(cells) + " \\\\")
    caption = " ".join([table.title + ".", *table.notes])
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{latex_escape(caption)}}}",
        f"\\label{{tab:clbench-{table.name.replace('_', '-')}}}",
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """JSON- and CSV-friendly scalars: NaN -> None, numpy types -> Python types."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {str(k): _plain(v) for k, v in zip(frame.columns, row)}
        for row in frame.itertuples(index=False, name=None)
    ]


def to_csv(table: DisplayTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.data.columns)
    for record in _records(table.data):
        writer.writerow("" if v is None else v for v in record.values())
    return buffer.getvalue()


def to_json(tables: Sequence[DisplayTable]) -> str:
    payload = {
        t.name: {"title": t.title, "notes": t.notes, "rows": _records(t.data)} for t in tables
    }
    return json.dumps(payload, indent=2) + "\n"


def to_html(table: DisplayTable) -> str:
    from html import escape

    head = "".join(
        f'<th class="{"num" if n else "txt"}">{escape(c)}</th>'
        for c, n in zip(table.columns, table.numeric)
    )
    body = []
    for index, row in enumerate(table.rows):
        cls = ' class="block"' if index in table.block_starts else ""
        cells = "".join(
            f'<td class="{"num" if n else "txt"}">'
            + (f"<b>{escape(c.text)}</b>" if c.bold else escape(c.text))
            + "</td>"
            for c, n in zip(row, table.numeric)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    notes = "".join(f"<li>{escape(note)}</li>" for note in table.notes)
    return (
        f"<h2>{escape(table.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + f'\n</tbody>\n</table>\n<ul class="notes">{notes}</ul>\n'
    )


# -- writing run folders without torch --------------------------------------------------


def write_run_folder(
    path: Path,
    config: dict[str, Any],
    accuracy: Sequence[Sequence[float]],
    counts: Sequence[int],
    *,
    state: str = "complete",
    seconds_per_task: float = 1.0,
) -> Path:
    """A run folder in the format of :class:`clbench.results.RunFolder`, from an accuracy
    matrix (rows = finished experiences, in %) and the test items per experience.

    For tests, benchmarks and for bringing results computed elsewhere into clbench's
    tables; it needs no torch. Correct counts are rounded from the accuracies, and
    accuracies recomputed from them, so every file agrees with every other.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    counts_array = np.asarray(counts, dtype=int)
    correct = np.rint(np.asarray(accuracy, dtype=float) / 100.0 * counts_array).astype(int)
    matrix = 100.0 * correct / counts_array
    records = [
        {
            "experience": t,
            "accuracy": [float(a) for a in matrix[t]],
            "correct": [int(c) for c in correct[t]],
            "counts": [int(n) for n in counts_array],
            "train_seconds": seconds_per_task,
            "eval_seconds": seconds_per_task / 10,
            "peak_memory_mb": 100.0,
            "extra": {},
        }
        for t in range(matrix.shape[0])
    ]
    files: dict[str, Any] = {
        "config.json": config,
        "status.json": {"state": state, "finished_experiences": len(records)},
        "progress.json": records,
    }
    if records:
        summary = cl_metrics.summarise(matrix, correct, counts_array)
        summary.update(
            train_seconds=seconds_per_task * len(records),
            eval_seconds=seconds_per_task / 10 * len(records),
            peak_memory_mb=100.0,
        )
        files["metrics.json"] = summary
        header = ",".join(f"exp{i}" for i in range(matrix.shape[1]))
        lines = [f"after,{header}"] + [
            f"{t}," + ",".join(f"{a:.4f}" for a in row) for t, row in enumerate(matrix)
        ]
        (path / "accuracy_matrix.csv").write_text("\n".join(lines) + "\n")
    for name, payload in files.items():
        (path / name).write_text(json.dumps(payload, indent=2) + "\n")
    return path

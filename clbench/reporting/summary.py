"""Runs grouped into table rows: mean and std over seeds, per-task curves.

Two rules keep the numbers honest:

* only runs whose status is ``complete`` are averaged; running, interrupted, failed,
  unreadable runs and a second complete run of the same seed are counted in a "not
  averaged" column (and listed with ``include_incomplete``), never mixed into a mean;
* runs of different protocol versions, or whose options differ (``--set lr=...``,
  ``scenario.num_experiences=...``), get rows of their own, labelled with what differs.

Per-run numbers (FAA, CAA, FFM, the per-task curves) come from :mod:`clbench.metrics`,
the same functions the run loop writes metrics.json with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from clbench import metrics as cl_metrics
from clbench.errors import UsageError
from clbench.reporting.runs import AVERAGED_STATE

# Order in which "not averaged" reasons are listed.
EXCLUSION_REASONS = (
    "running",
    "dead",
    "interrupted",
    "failed",
    "unknown",
    "unreadable",
    "duplicate seed",
)
ROW_KEYS = ("scenario", "backbone", "strategy")
DEFAULT_GROUP_BY = ROW_KEYS


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
        Metric(
            "params",
            "Params/task (K) ↓",
            False,
            "thousands of parameters the main optimiser trained per task, mean over tasks "
            "(a strategy's own sample-trained stages, e.g. a task-identity head, not counted)",
        ),
    )
}


def reports_seen(scenario_metrics: Sequence[str] | None) -> bool:
    """Whether a run's scenario reports the pooled seen-class accuracy (relation
    extraction does; for equal-size vision tasks it equals FAA and is left out)."""
    return "seen" in (scenario_metrics or ())


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


def metric_columns(runs: pd.DataFrame, options: TableOptions) -> list[str]:
    """The metrics asked for, or FAA, CAA, FFM, plus Seen where a scenario reports it and
    TII where a strategy does."""
    if options.metrics:
        return list(options.metrics)
    averaged = runs[runs["averaged"]] if "averaged" in runs else runs
    show_seen = bool(averaged["scenario_metrics"].map(reports_seen).any())
    show_tii = bool(averaged["tii"].notna().any())
    return ["faa", "caa", "ffm", *(["seen"] if show_seen else []), *(["tii"] if show_tii else [])]


def summarise(runs: pd.DataFrame, options: TableOptions) -> pd.DataFrame:
    """One row per row key: ``seeds`` averaged, ``<metric>_mean/_std/_best``, ``tasks``,
    ``not_averaged`` (e.g. "1 failed, 1 running") and ``scenario_protocol``."""
    if "averaged" not in runs:
        runs = assign_rows(runs, options)
    keys = options.row_keys
    metric_keys = list(METRICS)
    values = runs[[*keys, "averaged", "tasks", "scenario_protocol", *metric_keys]].copy()
    # The seen-class accuracy belongs to the scenarios that report it; elsewhere blank.
    values.loc[~runs["scenario_metrics"].map(reports_seen), "seen"] = math.nan
    averaged = values[values["averaged"]]
    grouped = averaged.groupby(keys, dropna=False)
    table = grouped.size().rename("seeds").to_frame()
    table["tasks"] = grouped["tasks"].max()
    for key in metric_keys:
        table[f"{key}_mean"] = grouped[key].mean()
        table[f"{key}_std"] = grouped[key].std(ddof=options.ddof)
    # the paper protocol the row's published numbers are matched on (see reference)
    table["scenario_protocol"] = grouped["scenario_protocol"].first()
    # Rows with no complete run still appear, with their reasons, and no numbers.
    every_row = runs.groupby(keys, dropna=False).size().rename("runs")
    table = every_row.to_frame().join(table, how="left")
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    table["not_averaged"] = _exclusion_text(runs, keys).reindex(table.index).fillna("")
    table = table.reset_index()
    table = sort_rows(table, options)
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


def sort_rows(table: pd.DataFrame, options: TableOptions) -> pd.DataFrame:
    """Rows of one block (same scenario and backbone) stay together; within a block the
    sort key orders them (by default the row keys, alphabetically)."""
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


def check_per_task_metric(requested: str) -> None:
    if requested not in PER_TASK_METRICS:
        raise UsageError(
            f"unknown per-task metric {requested!r}; valid: {', '.join(PER_TASK_METRICS)}"
        )


def curve_metric(runs: pd.DataFrame, requested: str) -> str:
    """The curve drawn for a row of ``runs``: ``auto`` is the seen-class accuracy where
    the scenario reports it (the papers' curve for relation extraction), else the
    average accuracy over the tasks seen so far."""
    check_per_task_metric(requested)
    if requested == "auto":
        return "seen" if reports_seen(runs["scenario_metrics"].iloc[0]) else "average"
    return requested


def accuracy_curve(run: pd.Series, metric: str) -> np.ndarray:
    """Accuracy after each finished task of one run (``metric`` = average | seen)."""
    if metric == "seen":
        return np.asarray(run["seen_curve"], dtype=float)
    if run["matrix"] is None:
        raise ValueError("the accuracy matrix was not loaded: load_runs(..., with_matrix=True)")
    return cl_metrics.average_accuracy_curve(run["matrix"])


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
        which = curve_metric(group, metric)
        curves = [accuracy_curve(run, which) for _, run in group.iterrows()]
        mean, std, _ = mean_std(curves, options.ddof)
        row = dict(zip(options.row_keys, key))
        row.update(seeds=len(group), metric=which)
        for task, (m, s) in enumerate(zip(mean, std), start=1):
            row[f"t{task}_mean"], row[f"t{task}_std"] = float(m), float(s)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*options.row_keys, "seeds", "metric"])
    return sort_rows(pd.DataFrame(rows), TableOptions(options.group_by))

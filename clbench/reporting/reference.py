"""The papers' numbers (results/reference/*.csv) beside ours, and what differs.

A reference row names the paper protocol it was measured under in its ``scenario``
column (``fewrel``, ``split-cifar100``, ...). Our runs are matched on the protocol their
config.json records (``scenario_protocol``: ``fewrel`` for the small ``fewrel-offline``),
then every difference left (scenario size, task count, backbone) is spelled out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from clbench.errors import UsageError
from clbench.reporting.runs import AUTHORS_MARK, matches_any
from clbench.reporting.summary import METRICS, TableOptions

REFERENCE_REQUIRED = ("source", "scenario", "backbone", "method", "metric", "value")
REFERENCE_COLUMNS = (
    "source", "arxiv", "table", "scenario", "protocol", "tasks", "classes", "backbone",
    "seeds", "method", "strategy", "metric", "task", "value", "std", "note", "test_task",
)  # fmt: skip
# Published metrics clbench does not measure: recorded, never set beside a run of ours.
PUBLISHED_ONLY_METRICS = {
    "til": "task-incremental accuracy (the task identity given at test time)",
    "aaa": "mean over the tasks of the sample-weighted accuracy on all seen classes",
}
REPO_ROOT = Path(__file__).resolve().parents[2]


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
        valid = [*METRICS, *PUBLISHED_ONLY_METRICS]
        unknown = sorted(set(frame["metric"]) - set(valid))
        if unknown:
            raise UsageError(f"{path}: unknown metric {unknown[0]!r}; valid: {', '.join(valid)}")
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
    # A row with no task index, or with the last one, is an after-the-last-task number;
    # one on a single task's test items (test_task) has no column of ours to stand beside.
    final = (reference["task"] == "") | (reference["task"] == reference["tasks"])
    ours = reference["metric"].isin(list(METRICS)) & (reference["test_task"] == "")
    return reference[final & ours]


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


COMPARISON_COLUMNS = (
    "scenario", "backbone", "strategy", "setting", "metric", "ours_mean", "ours_std",
    "seeds", "published", "published_std", "difference", "method", "source", "arxiv",
    "table", "paper_seeds", "paper_scenario", "paper_tasks", "paper_backbone",
    "protocol_differs", "note",
)  # fmt: skip


def reference_comparison(
    summary: pd.DataFrame, reference: pd.DataFrame, options: TableOptions,
    strategies: Sequence[str] = (),
) -> pd.DataFrame:  # fmt: skip
    """Our rows beside the papers' final-task numbers, matched on paper protocol and
    strategy; a paper row for a protocol we ran but a strategy we did not still appears."""
    if "scenario" not in options.group_by or "strategy" not in options.group_by:
        raise UsageError("--reference needs rows per scenario and strategy (--group-by)")
    ours = summary[summary["seeds"] > 0]
    papers = _final_task_rows(reference)
    papers = papers[papers["scenario"].isin(set(ours["scenario_protocol"]))]
    if strategies:
        papers = papers[papers["strategy"].map(lambda name: matches_any(name, strategies))]
    rows = []
    for _, paper in papers.iterrows():
        matches = ours[
            (ours["scenario_protocol"] == paper["scenario"])
            # a run with the authors' code's quirks is compared with the same paper row
            & (ours["strategy"].astype(str).str.removesuffix(AUTHORS_MARK) == paper["strategy"])
        ]
        if matches.empty:
            rows.append(_comparison_row(None, paper))
        rows += [_comparison_row(row, paper) for _, row in matches.iterrows()]
    comparison = pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
    # Per paper protocol: rows with runs of ours first, then the published-only ones, each
    # in the order of the reference files (which follow the papers' tables).
    order = comparison.assign(alone=comparison["seeds"] == 0)
    order = order.sort_values(["paper_scenario", "alone"], kind="stable")
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
        **ours, strategy=paper["strategy"] if row is None else row["strategy"], metric=metric, ours_mean=mean, ours_std=std,
        seeds=seeds, published=paper["value"], published_std=paper["std"],
        difference=mean - paper["value"], method=paper["method"], source=paper["source"],
        arxiv=paper["arxiv"], table=paper["table"], paper_seeds=paper["seeds"],
        paper_scenario=paper["scenario"], paper_tasks=paper["tasks"],
        paper_backbone=paper["backbone"], protocol_differs=bool(differs), note=note,
    )  # fmt: skip

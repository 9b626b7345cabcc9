"""Tables as shown: summaries turned into :class:`DisplayTable` s, and ``build_tables``,
which makes every table ``clbench table`` asks for from the run folders alone.

A DisplayTable holds the cells as printed (Markdown / LaTeX / HTML, see
:mod:`clbench.reporting.render`) and the numbers behind them (CSV / JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clbench.reporting.reference import load_reference, reference_comparison
from clbench.reporting.runs import (
    AUTHORS_MARK,
    AUTHORS_NOTE,
    INTERNAL_COLUMNS,
    display_value,
    filter_runs,
    load_runs,
)
from clbench.reporting.summary import (
    EXCLUSION_REASONS,
    METRICS,
    TableOptions,
    assign_rows,
    check_per_task_metric,
    metric_columns,
    per_task_summary,
    summarise,
)
from clbench.results.folder import RANDOM_WEIGHTS_MARK, RANDOM_WEIGHTS_NOTE

DASH = "—"


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool = False  # right-aligned


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


def _display_table(
    name: str,
    title: str,
    columns: Sequence[Column],
    shown: pd.DataFrame,
    cells: Callable[[pd.Series], list[Cell]],
    *,
    data: pd.DataFrame,
    notes: list[str],
    block_keys: Sequence[str] = (),
) -> DisplayTable:
    """One row of cells per row of ``shown``; a rule where the ``block_keys`` change."""
    return DisplayTable(
        name=name,
        title=title,
        columns=[c.header for c in columns],
        numeric=[c.numeric for c in columns],
        rows=[cells(row) for _, row in shown.iterrows()],
        data=data,
        notes=notes,
        block_starts=_block_starts(shown, list(block_keys)),
    )


def format_mean_std(mean: float | None, std: float | None, precision: int) -> str:
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
    metric_keys = metric_columns(runs, options)
    keys = _optional_columns(summary, options.row_keys)
    show_excluded = (summary["not_averaged"] != "").any()
    newest = _newest_protocol(summary["protocol"])
    columns = [
        *(Column(k) for k in keys),
        Column("seeds", numeric=True),
        *(Column(METRICS[m].header, numeric=True) for m in metric_keys),
        *([Column("not averaged")] if show_excluded else []),
    ]

    def cells(row: pd.Series) -> list[Cell]:
        shown = [
            Cell(_protocol_text(row[k], newest) if k == "protocol" else display_value(row[k]))
            for k in keys
        ]
        shown.append(Cell(str(int(row["seeds"]))))
        for m in metric_keys:
            text = format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], options.precision)
            shown.append(Cell(text, bold=bool(row[f"{m}_best"]) and text != DASH))
        if show_excluded:
            shown.append(Cell(row["not_averaged"]))
        return shown

    data_columns = [
        *options.row_keys, "seeds", "tasks",
        *[f"{m}_{part}" for m in metric_keys for part in ("mean", "std", "best")],
        "not_averaged", "runs",
    ]  # fmt: skip
    return _display_table(
        "summary", "Accuracy and forgetting (%)", columns, summary, cells,
        data=summary[data_columns], notes=_main_notes(summary, runs, options, metric_keys),
        block_keys=options.block_keys,
    )  # fmt: skip


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
    if summary["strategy"].astype(str).str.endswith(AUTHORS_MARK).any():
        notes.append(AUTHORS_NOTE)
    if runs["backbone"].astype(str).str.endswith(RANDOM_WEIGHTS_MARK).any():
        notes.append(RANDOM_WEIGHTS_NOTE)
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


PER_TASK_DESCRIPTIONS = {
    "average": "average accuracy over the tasks seen so far",
    "seen": "sample-weighted accuracy on all classes seen so far",
}


def per_task_table(table: pd.DataFrame, options: TableOptions) -> DisplayTable:
    keys = _optional_columns(table, options.row_keys) if len(table) else list(options.group_by)
    show_metric = table["metric"].nunique() > 1 if len(table) else False
    tasks = sorted(
        (int(c[1:-5]) for c in table.columns if c.startswith("t") and c.endswith("_mean")),
    )
    columns = [
        *(Column(k) for k in keys),
        *([Column("metric")] if show_metric else []),
        Column("seeds", numeric=True),
        *(Column(f"T{t}", numeric=True) for t in tasks),
    ]

    def cells(row: pd.Series) -> list[Cell]:
        shown = [Cell(display_value(row[k])) for k in keys]
        if show_metric:
            shown.append(Cell(row["metric"]))
        shown.append(Cell(str(int(row["seeds"]))))
        shown += [
            Cell(format_mean_std(row.get(f"t{t}_mean"), row.get(f"t{t}_std"), options.precision))
            for t in tasks
        ]
        return shown

    which = set(table["metric"]) if len(table) else set()
    note = (
        "Tt: accuracy after training task t, "
        + "; ".join(f"{m}: {PER_TASK_DESCRIPTIONS[m]}" for m in sorted(which))
        + f"; mean ± std over seeds (ddof={options.ddof})."
    )
    return _display_table(
        "per_task", "Accuracy after each task (%)", columns, table, cells,
        data=table, notes=[note], block_keys=options.block_keys,
    )  # fmt: skip


def comparison_table(comparison: pd.DataFrame, options: TableOptions) -> DisplayTable:
    show_setting = (comparison["setting"] != "").any()
    headers = [
        "scenario", "backbone", "strategy", *(["setting"] if show_setting else []), "metric",
        "ours", "seeds", "published", "Δ", "source", "note",
    ]  # fmt: skip
    columns = [Column(c, numeric=c in ("ours", "seeds", "published", "Δ")) for c in headers]
    p = options.precision

    def cells(row: pd.Series) -> list[Cell]:
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
        shown = [Cell(row["scenario"]), Cell(row["backbone"]), Cell(row["strategy"])]
        if show_setting:
            shown.append(Cell(row["setting"]))
        return [
            *shown,
            Cell(METRICS[row["metric"]].header.split()[0]),
            Cell(format_mean_std(row["ours_mean"], row["ours_std"], p)),
            Cell(str(row["seeds"])),
            Cell(format_mean_std(row["published"], row["published_std"], p)),
            Cell(difference),
            Cell(source),
            Cell(row["note"]),
        ]

    return _display_table(
        "reference", "Ours beside the published numbers (after the last task, %)", columns,
        comparison, cells, data=comparison,
        notes=[
            "Δ = ours − published. A row whose protocol differs is not like for like "
            "(another scenario size, task count or backbone): read it as a sanity check.",
        ],
        block_keys=["scenario", "backbone"],
    )  # fmt: skip


def not_averaged_table(
    runs: pd.DataFrame, options: TableOptions, roots: Sequence[Path]
) -> DisplayTable:
    excluded = runs[~runs["averaged"]].sort_values(["scenario", "backbone", "strategy", "path"])
    p = options.precision
    columns = [
        Column("scenario"), Column("backbone"), Column("strategy"), Column("seed", numeric=True),
        Column("why"), Column("tasks done", numeric=True), Column("FAA so far", numeric=True),
        Column("folder"),
    ]  # fmt: skip

    def cells(run: pd.Series) -> list[Cell]:
        total = "?" if pd.isna(run["tasks"]) else run["tasks"]
        error = display_value(run["error"])
        return [
            Cell(run["scenario"]), Cell(run["backbone"]), Cell(run["strategy"]),
            Cell(display_value(run["seed"])), Cell(run["reason"] + (f": {error}" if error else "")),
            Cell(f"{run['finished']}/{total}"),
            Cell(DASH if pd.isna(run["faa"]) else f"{run['faa']:.{p}f}"),
            Cell(_relative(run["path"], roots)),
        ]  # fmt: skip

    return _display_table(
        "not_averaged", "Runs not averaged", columns, excluded, cells,
        data=excluded.drop(columns=list(INTERNAL_COLUMNS)),
        notes=["incomplete, failed or repeated runs: shown, never averaged into the tables."],
    )  # fmt: skip


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
    check_per_task_metric(request.per_task_metric)
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

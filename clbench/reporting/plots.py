"""Figures of run folders: accuracy-matrix heatmaps, accuracy after each task, forgetting.

Pure functions of the run folders, like the tables (whose grouping they share: one curve
or heatmap per table row, only complete runs averaged; the numbers are those of
:mod:`clbench.metrics`). Figures are built with
matplotlib's object API (``matplotlib.figure.Figure``), never ``pyplot``: no display, no
global figure registry to leak from, and the Agg renderer writes PNG (PDF through its own
backend), so the commands work on a headless machine.

Colours come from the Okabe-Ito palette, safe for the common colour-vision deficiencies;
lines also differ by marker, so a figure survives a black-and-white printer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clbench import metrics
from clbench.errors import UsageError
from clbench.reporting.runs import filter_runs, load_runs
from clbench.reporting.summary import (
    TableOptions,
    accuracy_curve,
    assign_rows,
    check_per_task_metric,
    curve_metric,
    mean_std,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Okabe & Ito (2008), ordered so that the first colours are the most distinct on white
# (yellow last: it is hard to see as a thin line).
OKABE_ITO = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442",
)  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HEATMAP_COLORMAP = "viridis"  # perceptually uniform and colour-blind safe
KINDS = ("heatmap", "curves", "forgetting")
IMAGE_FORMATS = ("png", "pdf", "svg")
FIGURE_SIZE = (6.4, 4.0)


@dataclass(frozen=True)
class Series:
    """One line (or set of bars) of a figure: a table row's mean and std over seeds."""

    label: str
    mean: np.ndarray
    std: np.ndarray
    seeds: int


@dataclass
class PlotRequest:
    paths: list[Path]
    out_dir: Path = Path("plots")
    kinds: tuple[str, ...] = KINDS
    formats: tuple[str, ...] = ("png",)
    filters: dict[str, list[str]] = field(default_factory=dict)
    options: TableOptions = field(default_factory=TableOptions)
    per_task_metric: str = "auto"
    dpi: int = 150

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in KINDS:
                raise UsageError(f"unknown plot kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        for fmt in self.formats:
            if fmt not in IMAGE_FORMATS:
                raise UsageError(
                    f"unknown image format {fmt!r}; valid formats: {', '.join(IMAGE_FORMATS)}"
                )
        check_per_task_metric(self.per_task_metric)


# -- grouping ---------------------------------------------------------------------------


@dataclass
class RowRuns:
    """The complete runs of one table row, with what the figures call them."""

    key: dict[str, str]
    label: str  # within its block: strategy [setting] [protocol]
    block: tuple[str, ...]  # rows drawn on one figure share it (scenario, backbone)
    runs: pd.DataFrame


def row_runs(runs: pd.DataFrame, options: TableOptions) -> list[RowRuns]:
    """Complete (averaged) runs grouped into the rows of ``clbench table``."""
    if "averaged" not in runs:
        runs = assign_rows(runs, options)
    averaged = runs[runs["averaged"]]
    several_protocols = averaged["protocol"].nunique() > 1
    label_keys = [k for k in options.row_keys if k not in options.block_keys]
    rows = []
    for values, group in averaged.groupby(options.row_keys, dropna=False, sort=True):
        key = dict(zip(options.row_keys, map(str, values)))
        parts = [key[k] for k in label_keys if k not in ("setting", "protocol")]
        if key["setting"]:
            parts.append(f"[{key['setting']}]")
        if several_protocols:
            parts.append(f"v{key['protocol']}")
        block = tuple(key[k] for k in options.block_keys)
        rows.append(RowRuns(key=key, label=" ".join(parts), block=block, runs=group))
    return rows


def colour_map(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per label, stable across every figure of one call."""
    ordered = sorted(set(labels))
    return {
        label: (OKABE_ITO[i % len(OKABE_ITO)], MARKERS[(i // len(OKABE_ITO)) % len(MARKERS)])
        for i, label in enumerate(ordered)
    }


def curve_series(row: RowRuns, metric: str, ddof: int) -> Series:
    curves = [accuracy_curve(run, metric) for _, run in row.runs.iterrows()]
    mean, std, _ = mean_std(curves, ddof)
    return Series(row.label, mean, std, len(curves))


def forgetting_series(row: RowRuns, ddof: int) -> Series:
    drops = [metrics.forgetting_terms(run["matrix"]) for _, run in row.runs.iterrows()]
    mean, std, _ = mean_std(drops, ddof)
    return Series(row.label, mean, std, len(drops))


def mean_matrix(row: RowRuns) -> tuple[np.ndarray, int]:
    """Mean accuracy matrix over the row's seeds (runs of another shape are left out:
    they can only be there if the row pools scenarios, see --group-by)."""
    matrices = [np.asarray(m, dtype=float) for m in row.runs["matrix"] if m is not None]
    shapes = pd.Series([m.shape for m in matrices]).value_counts()
    shape = shapes.index[0]
    same = [m for m in matrices if m.shape == shape]
    return np.mean(same, axis=0), len(same)


# -- figures ----------------------------------------------------------------------------


def _figure(size: tuple[float, float] = FIGURE_SIZE) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def heatmap_figure(matrix: np.ndarray, title: str) -> Figure:
    """A[t, i] with t down the side and i along the top; tasks not yet trained are blank
    (their accuracy is ~0 by construction and would only drown the colour scale), and so
    is every entry not evaluated (NaN: runs that evaluate only the seen tasks), never 0."""
    matrix = np.asarray(matrix, dtype=float)
    rows, columns = matrix.shape
    blank = np.triu(np.ones_like(matrix, dtype=bool), k=1) | np.isnan(matrix)
    shown = np.ma.masked_where(blank, matrix)
    size = (max(4.0, 0.55 * columns + 2.2), max(3.2, 0.5 * rows + 1.6))
    figure = _figure(size)
    axes = figure.add_subplot()
    image = axes.imshow(shown, cmap=HEATMAP_COLORMAP, vmin=0, vmax=100, aspect="auto")
    if rows * columns <= 400:  # numbers stay legible up to 20 x 20
        for t in range(rows):
            for i in range(min(t + 1, columns)):
                value = matrix[t, i]
                if blank[t, i]:
                    continue
                colour = "black" if value > 60 else "white"  # viridis is light at the top
                axes.text(i, t, f"{value:.0f}", ha="center", va="center", color=colour,
                          fontsize=8)  # fmt: skip
    axes.set_xticks(range(columns), [str(i + 1) for i in range(columns)])
    axes.set_yticks(range(rows), [str(t + 1) for t in range(rows)])
    axes.set_xlabel("test task i")
    axes.set_ylabel("after training task t")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return figure


def curves_figure(
    series: Sequence[Series], colours: dict[str, tuple[str, str]], title: str, ylabel: str
) -> Figure:
    """Accuracy after each task, one line per row: mean over seeds, band = ± std."""
    figure = _figure()
    axes = figure.add_subplot()
    for line in series:
        colour, marker = colours[line.label]
        tasks = np.arange(1, len(line.mean) + 1)
        axes.plot(tasks, line.mean, color=colour, marker=marker, markersize=4,
                  label=f"{line.label} (n={line.seeds})")  # fmt: skip
        if line.seeds > 1:
            axes.fill_between(tasks, line.mean - line.std, line.mean + line.std, color=colour,
                              alpha=0.2, linewidth=0)  # fmt: skip
    longest = max((len(s.mean) for s in series), default=1)
    axes.set_xticks(range(1, longest + 1))
    axes.set_xlabel("after training task")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=10)
    _legend(figure, len(series))
    return figure


def _legend(figure: Figure, entries: int) -> None:
    # Below the axes, never over the data (bands and bars fill the whole plot area); as
    # many columns as the longest label lets fit in the figure's width (long settings,
    # e.g. "l2p [epochs=1, precision=bf16]", would otherwise run off both edges).
    labels = [label for axes in figure.axes for label in axes.get_legend_handles_labels()[1]]
    longest = max((len(label) for label in labels), default=0)
    column_inches = 0.45 + longest * _LEGEND_CHAR_INCHES  # marker + text at fontsize 8
    fit = max(1, int(figure.get_figwidth() // column_inches))
    columns = max(1, min(entries, 3, fit))
    # the legend takes its rows from the figure's height: grow it so the axes keep theirs
    rows = -(-entries // columns)
    figure.set_figheight(figure.get_figheight() + max(0, rows - 3) * _LEGEND_ROW_INCHES)
    figure.legend(loc="outside lower center", ncols=columns, fontsize=8, frameon=False)


_LEGEND_CHAR_INCHES = 0.062  # mean width of a DejaVu Sans character at 8 pt
_LEGEND_ROW_INCHES = 0.19  # one legend row at 8 pt


def forgetting_figure(
    series: Sequence[Series], colours: dict[str, tuple[str, str]], title: str
) -> Figure:
    """Per task i < T: best accuracy ever reached minus final accuracy (FFM's terms),
    grouped bars per row with ± std error bars."""
    figure = _figure()
    axes = figure.add_subplot()
    width = 0.8 / max(len(series), 1)
    for index, bars in enumerate(series):
        colour, _ = colours[bars.label]
        tasks = np.arange(1, len(bars.mean) + 1)
        offset = (index - (len(series) - 1) / 2) * width
        errors = np.nan_to_num(bars.std) if bars.seeds > 1 else None
        axes.bar(tasks + offset, bars.mean, width=width, color=colour, yerr=errors, capsize=2,
                 label=f"{bars.label} (n={bars.seeds})", error_kw={"linewidth": 0.8})  # fmt: skip
    longest = max((len(s.mean) for s in series), default=1)
    axes.set_xticks(range(1, longest + 1))
    axes.set_xlabel("task i (forgetting after the last task)")
    axes.set_ylabel(r"$\max_t A_{t,i} - A_{T,i}$ (points)")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(title, fontsize=10)
    _legend(figure, len(series))
    return figure


def save_figure(figure: Figure, stem: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    """``stem.png``, ``stem.pdf``, ...; dates left out of the files so reruns are identical."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        metadata: dict[str, Any] = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(
            fmt, {}
        )
        figure.savefig(path, format=fmt, dpi=dpi, metadata=metadata)
        written.append(path)
    return written


def slug(*parts: str) -> str:
    text = "_".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


# -- all figures of a results folder ----------------------------------------------------


@dataclass
class FigureSpec:
    kind: str
    name: str  # file stem
    title: str
    figure: Figure


def _block_title(row: RowRuns, options: TableOptions) -> str:
    return " · ".join(row.key[k] for k in options.block_keys) or "all runs"


def build_figures(
    runs: pd.DataFrame, options: TableOptions, kinds: Sequence[str], per_task_metric: str
) -> list[FigureSpec]:
    """Every figure asked for, from runs loaded ``with_matrix=True``."""
    rows = row_runs(runs, options)
    if not rows:
        raise UsageError("no complete run to plot (only complete runs are drawn)")
    colours = colour_map([row.label for row in rows])
    blocks: dict[tuple[str, ...], list[RowRuns]] = {}
    for row in rows:
        blocks.setdefault(row.block, []).append(row)
    specs: list[FigureSpec] = []
    for block, members in blocks.items():
        where = _block_title(members[0], options)
        if "curves" in kinds:
            drawn = [(r, curve_metric(r.runs, per_task_metric)) for r in members]
            curve_metrics = sorted({metric for _, metric in drawn})
            for metric in curve_metrics:
                chosen = [r for r, drawn_metric in drawn if drawn_metric == metric]
                ylabel = (
                    "accuracy on all seen classes (%)"
                    if metric == "seen"
                    else "average accuracy on seen tasks (%)"
                )
                series = [curve_series(r, metric, options.ddof) for r in chosen]
                title = f"Accuracy after each task — {where}"
                specs.append(FigureSpec(
                    "curves", slug("curves", *block, metric if len(curve_metrics) > 1 else ""), title,
                    curves_figure(series, colours, title, ylabel),
                ))  # fmt: skip
        if "forgetting" in kinds:
            series = [forgetting_series(r, options.ddof) for r in members]
            if any(len(s.mean) for s in series):
                title = f"Forgetting per task — {where}"
                specs.append(FigureSpec(
                    "forgetting", slug("forgetting", *block), title,
                    forgetting_figure(series, colours, title),
                ))  # fmt: skip
        if "heatmap" in kinds:
            for row in members:
                matrix, seeds = mean_matrix(row)
                title = f"{row.label} — {where}\nA[t, i] (%), mean of {seeds} seed(s)"
                name = slug("heatmap", *block, row.label)
                specs.append(FigureSpec("heatmap", name, title, heatmap_figure(matrix, title)))
    return specs


def make_plots(request: PlotRequest) -> list[Path]:
    """Write the figures of ``clbench plot``; returns the files written."""
    runs = load_runs(request.paths, with_matrix=True)
    runs = assign_rows(filter_runs(runs, request.filters), request.options)
    written: list[Path] = []
    for spec in build_figures(runs, request.options, request.kinds, request.per_task_metric):
        written += save_figure(spec.figure, request.out_dir / spec.name, request.formats,
                               request.dpi)  # fmt: skip
    return written

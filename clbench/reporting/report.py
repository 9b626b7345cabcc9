"""One shareable page with the tables and figures of a results folder.

HTML (default): a single self-contained file, figures embedded as base64 PNG, no script,
no link to anything outside it, so it can be mailed or attached to an issue. Markdown: a
folder with ``report.md`` and the PNG files it links to (for a wiki or a repository).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import pandas as pd

from clbench import __version__
from clbench.errors import UsageError
from clbench.reporting import plots
from clbench.reporting.display import (
    DisplayTable,
    comparison_table,
    main_table,
    not_averaged_table,
    per_task_table,
    run_counts_text,
)
from clbench.reporting.reference import default_reference_dir, load_reference, reference_comparison
from clbench.reporting.render import to_html as table_html
from clbench.reporting.render import to_markdown as table_markdown
from clbench.reporting.runs import filter_runs, load_runs
from clbench.reporting.summary import TableOptions, assign_rows, per_task_summary, summarise
from clbench.results.folder import RunFolder

REPORT_FORMATS = ("html", "markdown")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; }
thead th { border-bottom: 2px solid #222; }
tr.block td { border-top: 2px solid #888; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.txt { text-align: left; }
ul.notes { font-size: 0.85em; color: #555; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 40em; width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""


@dataclass
class ReportRequest:
    paths: list[Path]
    out: Path | None = None  # default: report.html, or the folder report/ for Markdown
    fmt: str = "html"
    filters: dict[str, list[str]] = field(default_factory=dict)
    options: TableOptions = field(default_factory=TableOptions)
    reference: bool = True
    reference_dir: Path | None = None
    title: str | None = None
    dpi: int = 110

    def __post_init__(self) -> None:
        if self.fmt not in REPORT_FORMATS:
            raise UsageError(
                f"unknown report format {self.fmt!r}; valid: {', '.join(REPORT_FORMATS)}"
            )


@dataclass
class ReportContent:
    title: str
    tables: list[DisplayTable]
    figures: list[plots.FigureSpec]
    facts: list[str]  # one line each: what was read, software, hardware


def gather(request: ReportRequest) -> ReportContent:
    """Tables and figures of the report: pure functions of the run folders."""
    runs = load_runs(request.paths, with_matrix=True)
    runs = assign_rows(filter_runs(runs, request.filters), request.options)
    summary = summarise(runs, request.options)
    shown = [main_table(summary, runs, request.options)]
    if runs["averaged"].any():
        per_task = per_task_summary(runs, request.options)
        shown.append(per_task_table(per_task, request.options))
    reference_note = "published numbers: not shown (--no-reference)"
    if request.reference:
        directory = request.reference_dir or default_reference_dir()
        if directory is None:
            reference_note = "published numbers: no reference folder found"
        else:
            comparison = reference_comparison(
                summary,
                load_reference(directory),
                request.options,
                request.filters.get("strategy", ()),
            )
            if len(comparison):
                shown.append(comparison_table(comparison, request.options))
            reference_note = f"published numbers from {directory}"
    if not runs["averaged"].all():
        shown.append(not_averaged_table(runs, request.options, request.paths))
    figures = []
    if runs["averaged"].any():
        figures = tables_figures(runs, request.options)
    facts = [
        "results: " + ", ".join(str(p) for p in request.paths),
        "runs: " + run_counts_text(runs),
        reference_note,
        *environment_facts(runs),
        f"made by clbench {__version__} on "
        + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    ]
    title = request.title or "clbench results: " + ", ".join(p.name for p in request.paths)
    return ReportContent(title, shown, figures, facts)


def tables_figures(runs: pd.DataFrame, options: TableOptions) -> list[plots.FigureSpec]:
    # Curves and forgetting first: they compare methods; heatmaps detail one method each.
    specs = plots.build_figures(runs, options, plots.KINDS, "auto")
    order = {kind: i for i, kind in enumerate(("curves", "forgetting", "heatmap"))}
    return sorted(specs, key=lambda spec: order[spec.kind])


def environment_facts(runs: pd.DataFrame) -> list[str]:
    """Which code and hardware produced the averaged runs (from environment.json)."""
    seen: dict[str, dict[str, int]] = {"git commit": {}, "torch": {}, "device": {}}
    for path in runs.loc[runs["averaged"], "path"]:
        try:
            environment = RunFolder(path).environment()
        except (OSError, ValueError):
            continue
        for label, value in (
            ("git commit", environment.get("git_commit")),
            ("torch", environment.get("torch")),
            ("device", environment.get("device_name") or environment.get("device")),
        ):
            text = str(value) if value else "unknown"
            seen[label][text] = seen[label].get(text, 0) + 1
    return [
        f"{label}: " + ", ".join(f"{value} ({n} runs)" for value, n in sorted(counts.items()))
        for label, counts in seen.items()
        if counts
    ]


def _png(spec: plots.FigureSpec, dpi: int) -> bytes:
    buffer = io.BytesIO()
    spec.figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def to_html(content: ReportContent, dpi: int) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(content.title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(content.title)}</h1>",
        "<ul>" + "".join(f"<li>{escape(fact)}</li>" for fact in content.facts) + "</ul>",
    ]
    parts += [table_html(table) for table in content.tables]
    if content.figures:
        parts.append("<h2>Figures</h2>")
    for spec in content.figures:
        data = base64.b64encode(_png(spec, dpi)).decode("ascii")
        alt = escape(spec.title.replace("\n", " "))
        parts.append(
            f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
            f"<figcaption>{alt}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_markdown(content: ReportContent, folder: Path, dpi: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {content.title}", "", *[f"- {fact}" for fact in content.facts], ""]
    lines += [table_markdown(table) for table in content.tables]
    if content.figures:
        lines += ["## Figures", ""]
    for spec in content.figures:
        (folder / f"{spec.name}.png").write_bytes(_png(spec, dpi))
        alt = spec.title.replace("\n", " ")
        lines += [f"![{alt}]({spec.name}.png)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report(request: ReportRequest) -> Path:
    """Write the report; returns the HTML file or the Markdown file."""
    content = gather(request)
    if request.fmt == "html":
        out = request.out or Path("report.html")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_html(content, request.dpi), encoding="utf-8")
        return out
    return write_markdown(content, request.out or Path("report"), request.dpi)

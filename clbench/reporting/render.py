"""DisplayTables as text: Markdown, LaTeX (booktabs), CSV, JSON and HTML.

Markdown, LaTeX and HTML print the cells as shown (bold best values, rules between
blocks); CSV and JSON write the numbers behind them, unrounded.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from clbench.errors import UsageError
from clbench.reporting.display import Cell, DisplayTable

FORMATS = ("markdown", "latex", "csv", "json")


def render(tables: Sequence[DisplayTable], fmt: str) -> str:
    """``tables`` in one of ``FORMATS``."""
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
    """JSON- and CSV-friendly scalars: NaN and pd.NA -> None, numpy types -> Python types."""
    if value is pd.NA:  # a nullable integer column's missing value (a run's task count)
        return None
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

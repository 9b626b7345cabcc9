"""Commands that read run folders only: ``table``, ``plot`` and ``report``.

Their modules (pandas, matplotlib) are imported by the command functions, so neither
``clbench --help`` nor they load torch. The three share one group of arguments that says
which runs and rows to show.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from clbench.cli.arguments import comma_list, results_root
from clbench.errors import UsageError
from clbench.logs import TO_STDERR

log = logging.getLogger(__name__)

Commands = Any  # argparse's sub-parser action (a private class)

SELECTION_KEYS = (
    ("scenario", "scenario names"),
    ("strategy", "strategy names"),
    ("backbone", "backbone names"),
    ("seed", "seeds"),
    ("protocol", "protocol versions"),
)
REFERENCE_DIR_HELP = "published numbers (*.csv; default: results/reference)"


def _selection_parent() -> argparse.ArgumentParser:
    """The arguments every reporting command takes: the results folders and which runs
    and rows to show."""
    selection = argparse.ArgumentParser(add_help=False)
    selection.add_argument(
        "results",
        nargs="*",
        type=Path,
        metavar="RESULTS_DIR",
        help="results folders or run folders (default: ./results or $CLBENCH_RESULTS)",
    )
    which = selection.add_argument_group(
        "which runs and rows (NAMES: comma list or repeated option; shell patterns like l2p*)"
    )
    for key, what in SELECTION_KEYS:
        which.add_argument(
            f"--{key}",
            action="append",
            default=[],
            metavar="NAMES",
            help=f"only runs with these {what}",
        )
    which.add_argument(
        "--group-by",
        default="scenario,backbone,strategy",
        metavar="KEYS",
        help="keys of a row, from scenario,backbone,strategy (default: all three); "
        "runs with other options or protocol versions always get rows of their own",
    )
    which.add_argument(
        "--ddof",
        type=int,
        default=1,
        metavar="0|1",
        help="std over seeds: 1 = sample std (default), 0 = population std",
    )
    return selection


def selection(args: argparse.Namespace) -> tuple[list[Path], dict[str, list[str]]]:
    """The folders to read and the filters, from the shared arguments."""
    paths = args.results or _default_results()
    return paths, {key: comma_list(getattr(args, key)) for key, _ in SELECTION_KEYS}


# Shipped with the repository under results/: the example runs and the published numbers.
# With no folder named, the user's own runs under ./results are shown without them.
SHIPPED_FOLDERS = ("examples", "reference")


def _default_results() -> list[Path]:
    root = results_root()
    if not root.is_dir():
        return [root]  # the reader says it does not exist
    mine = sorted(
        entry for entry in root.iterdir()
        if entry.is_dir() and entry.name not in SHIPPED_FOLDERS and not entry.name.startswith(".")
    )  # fmt: skip
    if mine:
        return mine
    if any((root / name).is_dir() for name in SHIPPED_FOLDERS):
        raise UsageError(
            f"no runs of yours under {root}/ yet (the shipped example runs are in "
            f"{root / 'examples'}: give that folder to see them)"
        )
    return [root]


def _row_options(args: argparse.Namespace) -> Any:
    """Rows and std as the shared arguments say (the table's own options on top)."""
    from clbench.reporting.summary import TableOptions

    return TableOptions(group_by=tuple(comma_list([args.group_by])), ddof=args.ddof)


def add_parsers(commands: Commands) -> None:
    shared = _selection_parent()
    _add_table(commands, shared)
    _add_plot(commands, shared)
    _add_report(commands, shared)


# -- table -------------------------------------------------------------------------------------


def _add_table(commands: Commands, shared: argparse.ArgumentParser) -> None:
    table = commands.add_parser(
        "table",
        parents=[shared],
        help="accuracy / forgetting table, mean ± std over seeds",
        description="One row per (scenario, backbone, strategy): FAA, CAA, FFM and, for relation\n"
        "extraction, the seen-class accuracy, as mean ± std over seeds with the number of\n"
        "seeds; best value per scenario in bold. Only complete runs are averaged: running,\n"
        "interrupted, failed and repeated-seed runs are counted in a 'not averaged' column.",
        epilog="examples:\n  clbench table results/\n"
        "  clbench table results/ --scenario fewrel-offline --reference\n"
        "  clbench table results/ --format latex --per-task -o table.tex\n"
        "  clbench table results/ --sort faa --descending --metrics faa,ffm --format csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    table.add_argument(
        "-f",
        "--format",
        default="markdown",
        help="markdown (default), latex (booktabs), json, or csv (one table: the "
        "summary, or the one table asked for beside it)",
    )
    table.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of standard output"
    )
    table.add_argument(
        "--metrics",
        metavar="LIST",
        help="columns among faa,caa,ffm,seen,tii,minutes,params (default: faa,caa,ffm; "
        "seen when a relation extraction scenario is in the table; tii (task-"
        "identity accuracy) when a strategy reports it)",
    )
    table.add_argument(
        "--sort",
        metavar="COLUMN",
        help="order rows within a scenario by a metric (faa, caa, ffm, seen), "
        "seeds, or a key (default: by scenario, backbone, strategy)",
    )
    table.add_argument("--descending", action="store_true", help="sort in descending order")
    table.add_argument("--precision", type=int, default=2, help="decimals shown (default 2)")
    table.add_argument(
        "--per-task", action="store_true", help="add a table of the accuracy after each task"
    )
    table.add_argument(
        "--per-task-metric",
        default="auto",
        metavar="auto|average|seen",
        help="accuracy after each task: average over seen tasks, or seen-class "
        "accuracy (auto: seen for relation extraction, else average)",
    )
    table.add_argument(
        "--reference",
        action="store_true",
        help="add the papers' published numbers beside ours, with the difference "
        "and where the protocols differ",
    )
    table.add_argument("--reference-dir", type=Path, metavar="DIR", help=REFERENCE_DIR_HELP)
    table.add_argument(
        "--include-incomplete",
        action="store_true",
        help="also list every run that is not averaged, with its progress",
    )
    table.set_defaults(handler=command_table)


def command_table(args: argparse.Namespace) -> int:
    from clbench.reporting.display import TableRequest, build_tables
    from clbench.reporting.render import FORMATS, render
    from clbench.reporting.summary import TableOptions

    if args.format not in FORMATS:
        raise UsageError(f"unknown format {args.format!r}; valid formats: {', '.join(FORMATS)}")
    paths, filters = selection(args)
    options = TableOptions(
        group_by=tuple(comma_list([args.group_by])),
        metrics=tuple(comma_list([args.metrics])) or None,
        sort=args.sort,
        descending=args.descending,
        precision=args.precision,
        ddof=args.ddof,
    )
    request = TableRequest(
        paths=paths,
        filters=filters,
        options=options,
        per_task=args.per_task,
        per_task_metric=args.per_task_metric,
        reference=args.reference,
        reference_dir=args.reference_dir,
        include_incomplete=args.include_incomplete,
    )
    text = render(build_tables(request), args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        log.info(f"wrote {args.output}", extra=TO_STDERR)
    return 0


# -- plot --------------------------------------------------------------------------------------


def _add_plot(commands: Commands, shared: argparse.ArgumentParser) -> None:
    plot = commands.add_parser(
        "plot",
        parents=[shared],
        help="heatmaps, accuracy curves and forgetting bars",
        description="Figures of complete runs: the accuracy matrix A[t, i] as a heatmap (one per\n"
        "table row, mean over seeds), the accuracy after each task of every strategy on one\n"
        "figure (mean, band = ± std over seeds), and forgetting per task.",
        epilog="examples:\n  clbench plot results/ --out figures/\n"
        "  clbench plot results/ --kind curves,forgetting --format png,pdf --scenario fewrel*",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="KINDS",
        help="heatmap, curves, forgetting or all (comma list; default all)",
    )
    plot.add_argument(
        "--out",
        type=Path,
        default=Path("plots"),
        metavar="DIR",
        help="folder for the figures (default: ./plots)",
    )
    plot.add_argument(
        "-f",
        "--format",
        default="png",
        metavar="FORMATS",
        help="png, pdf, svg (comma list; default png)",
    )
    plot.add_argument(
        "--per-task-metric",
        default="auto",
        metavar="auto|average|seen",
        help="y axis of the curves (auto: seen-class accuracy for relation "
        "extraction, else average accuracy on seen tasks)",
    )
    plot.add_argument("--dpi", type=int, default=150, help="resolution of PNG files")
    plot.set_defaults(handler=command_plot)


def command_plot(args: argparse.Namespace) -> int:
    from clbench.reporting.plots import KINDS, PlotRequest, make_plots

    paths, filters = selection(args)
    kinds = comma_list(args.kind) or ["all"]
    request = PlotRequest(
        paths=paths,
        out_dir=args.out,
        filters=filters,
        kinds=KINDS if "all" in kinds else tuple(kinds),
        formats=tuple(comma_list([args.format])),
        options=_row_options(args),
        per_task_metric=args.per_task_metric,
        dpi=args.dpi,
    )
    for path in make_plots(request):
        print(path)
    return 0


# -- report ------------------------------------------------------------------------------------


def _add_report(commands: Commands, shared: argparse.ArgumentParser) -> None:
    report = commands.add_parser(
        "report",
        parents=[shared],
        help="one HTML (or Markdown) page of tables and figures",
        description="A page to share: the summary and per-task tables, the published numbers\n"
        "beside ours, the runs not averaged, and the figures. HTML is one self-contained file\n"
        "(figures embedded); Markdown is a folder with report.md and PNG files.",
        epilog="examples:\n  clbench report results/ --out report.html\n"
        "  clbench report results/ --format markdown --out report/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="PATH",
        help="HTML file (default report.html) or Markdown folder (default report/)",
    )
    report.add_argument("-f", "--format", default="html", help="html (default) or markdown")
    report.add_argument("--title", help="page title (default: names the results folders)")
    report.add_argument("--reference-dir", type=Path, metavar="DIR", help=REFERENCE_DIR_HELP)
    report.add_argument(
        "--no-reference", action="store_true", help="leave out the published numbers"
    )
    report.set_defaults(handler=command_report)


def command_report(args: argparse.Namespace) -> int:
    from clbench.reporting.report import ReportRequest, write_report

    paths, filters = selection(args)
    request = ReportRequest(
        paths=paths,
        out=args.out,
        fmt=args.format,
        filters=filters,
        options=_row_options(args),
        reference=not args.no_reference,
        reference_dir=args.reference_dir,
        title=args.title,
    )
    log.info(f"wrote {write_report(request)}")
    return 0

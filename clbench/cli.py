"""The ``clbench`` command: list, run, show."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clbench.errors import UsageError

EXAMPLES = """examples:
  clbench list strategies
  clbench run --strategy l2p --scenario fewrel-offline --seed 1
  clbench run -s seq-ft -c digits-offline --preset quick --set lr=0.01
  clbench run --strategy my_methods.py:MyStrategy --scenario fewrel-offline
  clbench run --resume results/fewrel-offline/l2p/minilm-l6_seed1_20260101-120000
  clbench show results/fewrel-offline/l2p/minilm-l6_seed1_20260101-120000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clbench",
        description="Prompt-based continual learning on frozen pretrained transformers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="list strategies, scenarios or backbones",
                                  description="List what can be run, with one-line descriptions.")
    listing.add_argument("what", nargs="?", default="all",
                         choices=["all", "strategies", "scenarios", "backbones"])
    listing.add_argument("--options", action="store_true",
                         help="also list each entry's options (names, types, defaults, help)")

    run = commands.add_parser(
        "run", help="run a strategy on a scenario",
        description="Train a strategy experience by experience, evaluating every test "
        "experience after each one; results go to OUT/<scenario>/<strategy>/<run-id>/.",
        epilog="--set KEY=VALUE sets a strategy hyper-parameter; scenario.KEY=VALUE and "
        "backbone.KEY=VALUE set those components' options. `clbench list --options` "
        "shows every key.",
    )
    run.add_argument("-s", "--strategy", help="registered name, or module:Class / path/file.py:Class")
    run.add_argument("-c", "--scenario", help="registered scenario name")
    run.add_argument("-b", "--backbone", help="registered backbone (default: the scenario's)")
    run.add_argument("--seed", type=int, default=0, help="seed of class order, init and shuffling")
    run.add_argument("--preset", default="auto",
                     help="named hyper-parameters; auto = the strategy's preset for the scenario "
                     "if it has one, else the defaults")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one option (repeatable)")
    run.add_argument("--out", type=Path, default=Path(os.environ.get("CLBENCH_RESULTS", "results")),
                     help="results root (default: ./results or $CLBENCH_RESULTS)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda")
    run.add_argument("--data-root", type=Path, help="where data sets live (also $CLBENCH_DATA)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a killed run from its last finished experience")

    show = commands.add_parser("show", help="print a run's accuracy matrix and metrics",
                               description="Print the accuracy matrix and the metrics of one run.")
    show.add_argument("run_dir", type=Path)

    tree = commands.add_parser(
        "tree", help="print the label tree (and OT class distances) a hier-ot run used",
        description="Print the label tree a hier-ot run built or loaded, as saved after "
        "each experience, and optionally its OT class-distance matrix.")
    tree.add_argument("run_dir", type=Path)
    tree.add_argument("--experience", type=int, default=-1,
                      help="after which experience (default: the last finished)")
    tree.add_argument("--distances", action="store_true", help="also print the class distances")

    fetch = commands.add_parser(
        "download", help="download (and verify) the data a scenario needs",
        description="Download, checksum and extract a scenario's data into the data root. "
        "Licensed data (tacred) is never downloaded: the command says where to put it.",
    )
    fetch.add_argument("name", help="registered scenario name (see `clbench list scenarios`)")
    fetch.add_argument("--data-root", type=Path, help="where data sets live (also $CLBENCH_DATA)")
    fetch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="scenario option, e.g. url=... for a mirror (repeatable)")

    # table / plot / report read run folders only; their modules (pandas, matplotlib) are
    # imported by the command functions, so neither `clbench --help` nor they load torch.
    selection = argparse.ArgumentParser(add_help=False)
    which = selection.add_argument_group(
        "which runs and rows (NAMES: comma list or repeated option; shell patterns like l2p*)")
    for key, what in (("scenario", "scenario names"), ("strategy", "strategy names"),
                      ("backbone", "backbone names"), ("seed", "seeds"),
                      ("protocol", "protocol versions")):
        which.add_argument(f"--{key}", action="append", default=[], metavar="NAMES",
                           help=f"only runs with these {what}")
    which.add_argument("--group-by", default="scenario,backbone,strategy", metavar="KEYS",
                       help="keys of a row, from scenario,backbone,strategy (default: all three); "
                       "runs with other options or protocol versions always get rows of their own")
    which.add_argument("--ddof", type=int, default=1, metavar="0|1",
                       help="std over seeds: 1 = sample std (default), 0 = population std")
    results_help = "results folders or run folders (default: ./results or $CLBENCH_RESULTS)"

    table = commands.add_parser(
        "table", parents=[selection], help="accuracy / forgetting table, mean ± std over seeds",
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
    table.add_argument("results", nargs="*", type=Path, metavar="RESULTS_DIR", help=results_help)
    table.add_argument("-f", "--format", default="markdown",
                       help="markdown (default), latex (booktabs), json, or csv (one table: the "
                       "summary, or the one table asked for beside it)")
    table.add_argument("-o", "--output", type=Path, metavar="FILE",
                       help="write to FILE instead of standard output")
    table.add_argument("--metrics", metavar="LIST",
                       help="columns among faa,caa,ffm,seen,tii,minutes (default: faa,caa,ffm; "
                       "seen when a relation extraction scenario is in the table; tii (task-"
                       "identity accuracy) when a strategy reports it)")
    table.add_argument("--sort", metavar="COLUMN",
                       help="order rows within a scenario by a metric (faa, caa, ffm, seen), "
                       "seeds, or a key (default: by scenario, backbone, strategy)")
    table.add_argument("--descending", action="store_true", help="sort in descending order")
    table.add_argument("--precision", type=int, default=2, help="decimals shown (default 2)")
    table.add_argument("--per-task", action="store_true",
                       help="add a table of the accuracy after each task")
    table.add_argument("--per-task-metric", default="auto", metavar="auto|average|seen",
                       help="accuracy after each task: average over seen tasks, or seen-class "
                       "accuracy (auto: seen for relation extraction, else average)")
    table.add_argument("--reference", action="store_true",
                       help="add the papers' published numbers beside ours, with the difference "
                       "and where the protocols differ")
    table.add_argument("--reference-dir", type=Path, metavar="DIR",
                       help="published numbers (*.csv; default: results/reference)")
    table.add_argument("--include-incomplete", action="store_true",
                       help="also list every run that is not averaged, with its progress")

    plot = commands.add_parser(
        "plot", parents=[selection], help="heatmaps, accuracy curves and forgetting bars",
        description="Figures of complete runs: the accuracy matrix A[t, i] as a heatmap (one per\n"
        "table row, mean over seeds), the accuracy after each task of every strategy on one\n"
        "figure (mean, band = ± std over seeds), and forgetting per task.",
        epilog="examples:\n  clbench plot results/ --out figures/\n"
        "  clbench plot results/ --kind curves,forgetting --format png,pdf --scenario fewrel*",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("results", nargs="*", type=Path, metavar="RESULTS_DIR", help=results_help)
    plot.add_argument("--kind", action="append", default=[], metavar="KINDS",
                      help="heatmap, curves, forgetting or all (comma list; default all)")
    plot.add_argument("--out", type=Path, default=Path("plots"), metavar="DIR",
                      help="folder for the figures (default: ./plots)")
    plot.add_argument("-f", "--format", default="png", metavar="FORMATS",
                      help="png, pdf, svg (comma list; default png)")
    plot.add_argument("--per-task-metric", default="auto", metavar="auto|average|seen",
                      help="y axis of the curves (auto: seen-class accuracy for relation "
                      "extraction, else average accuracy on seen tasks)")
    plot.add_argument("--dpi", type=int, default=150, help="resolution of PNG files")

    report = commands.add_parser(
        "report", parents=[selection], help="one HTML (or Markdown) page of tables and figures",
        description="A page to share: the summary and per-task tables, the published numbers\n"
        "beside ours, the runs not averaged, and the figures. HTML is one self-contained file\n"
        "(figures embedded); Markdown is a folder with report.md and PNG files.",
        epilog="examples:\n  clbench report results/ --out report.html\n"
        "  clbench report results/ --format markdown --out report/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("results", nargs="*", type=Path, metavar="RESULTS_DIR", help=results_help)
    report.add_argument("-o", "--out", type=Path, metavar="PATH",
                        help="HTML file (default report.html) or Markdown folder (default report/)")
    report.add_argument("-f", "--format", default="html", help="html (default) or markdown")
    report.add_argument("--title", help="page title (default: names the results folders)")
    report.add_argument("--reference-dir", type=Path, metavar="DIR",
                        help="published numbers (*.csv; default: results/reference)")
    report.add_argument("--no-reference", action="store_true",
                        help="leave out the published numbers")
    sweep = commands.add_parser(
        "sweep", help="a grid of runs: skip complete ones, resume the rest, locally or on Ray",
        description="Expand a grid (SWEEP.yaml, or --strategy / --scenario / --seed ...),\n"
        "validate every point before anything runs, then run what is not complete yet:\n"
        "each run in its own process, in OUT/<scenario>/<strategy>/<backbone>_seed<N>_<hash>\n"
        "(the hash covers the resolved options). Rerunning skips complete runs and resumes\n"
        "the others from their last finished experience.",
        epilog="examples:\n  clbench sweep scripts/sweeps/offline-smoke.yaml --jobs 2\n"
        "  clbench sweep scripts/sweeps/offline-smoke.yaml --status\n"
        "  clbench sweep -s l2p -s seq-ft -c digits-offline --seed 0,1 --preset quick "
        "--out results/smoke\n"
        "  clbench sweep scripts/sweeps/cre.yaml --backend ray --ray-address HEAD:6379 "
        "--gpus-per-run 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("file", nargs="?", type=Path, metavar="SWEEP.yaml",
                       help="the grid (see scripts/sweeps/); or give it with the flags below")
    for short, name, what in (("-s", "strategy", "strategies"), ("-c", "scenario", "scenarios"),
                              ("-b", "backbone", "backbones, default: each scenario's"),
                              (None, "seed", "seeds, default 0"),
                              (None, "preset", "presets, default auto")):
        flags = [short, f"--{name}"] if short else [f"--{name}"]
        sweep.add_argument(*flags, dest=f"sweep_{name}", action="append", default=[],
                           metavar="SEEDS" if name == "seed" else "NAMES",
                           help=f"grid axis: {what} (comma list or repeated)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override an option in every run (repeatable; adds to a file's set)")
    sweep.add_argument("--out", type=Path, metavar="DIR",
                       help="results root (default: the file's out, else ./results or "
                       "$CLBENCH_RESULTS); on Ray a path every node sees")
    sweep.add_argument("--device", help="auto | cpu | cuda (default: the file's, else auto)")
    sweep.add_argument("--data-root", type=Path, help="where data sets live (also $CLBENCH_DATA)")
    sweep.add_argument("--backend", default="local", help="local (default) or ray")
    sweep.add_argument("-j", "--jobs", type=int, default=1,
                       help="local: runs at a time, each with cores // N torch threads and its "
                       "own GPU (default 1: one after another)")
    sweep.add_argument("--ray-address", metavar="ADDR",
                       help="ray: the cluster (HOST:PORT or auto; default: $RAY_ADDRESS, a "
                       "cluster started here, else a new local one)")
    sweep.add_argument("--cpus-per-run", type=float, metavar="N", help="ray: CPUs each run reserves (default 1)")
    sweep.add_argument("--gpus-per-run", type=float, metavar="N", help="ray: GPUs each run reserves (default 0)")
    sweep.add_argument("--max-retries", type=int, metavar="N",
                       help="retries of a run whose process or worker was killed (default 2)")
    sweep.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                       help="seconds between progress lines (default 30)")
    sweep.add_argument("--status", action="store_true",
                       help="only show which runs are done, running, failed (with the error) "
                       "or pending")
    return parser


def command_list(args: argparse.Namespace) -> int:
    from clbench.config import describe
    from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES
    from clbench.runner import options_class

    groups = {"strategies": STRATEGIES, "scenarios": SCENARIOS, "backbones": BACKBONES}
    for title, registry in groups.items():
        if args.what not in ("all", title):
            continue
        print(f"{title}:")
        for entry in registry:
            note = ""
            if title == "scenarios" and getattr(entry.target, "default_backbone", None):
                note = f" [default backbone: {entry.target.default_backbone}]"
            if title == "scenarios":
                from clbench.download import data_marker

                note += data_marker(entry.name, entry.target)
            if title == "strategies" and entry.target.presets:
                note = f" [presets: {', '.join(sorted(entry.target.presets))}]"
            print(f"  {entry.name:<20} {entry.description}{note}")
            if args.options:
                options = entry.target.Config if title == "strategies" else options_class(entry.target)
                for name, type_name, default, help_text in describe(options):
                    print(f"      {name} ({type_name}, default {default!r}): {help_text}")
    return 0


def command_run(args: argparse.Namespace) -> int:
    from clbench.config import parse_set_arguments
    from clbench.results import RunFolder
    from clbench.runner import RunRequest, execute, new_run_folder, resolve_run

    if args.data_root is not None:
        os.environ["CLBENCH_DATA"] = str(args.data_root)
    if args.resume is not None:
        if args.strategy or args.scenario or args.overrides:
            raise UsageError("--resume takes the run's saved configuration: give no other options")
        execute(RunFolder(args.resume), resume=True)
        return 0
    if not args.strategy or not args.scenario:
        raise UsageError("run needs --strategy and --scenario (or --resume RUN_DIR)")
    overrides = parse_set_arguments(args.overrides)
    config = resolve_run(RunRequest(
        strategy=args.strategy, scenario=args.scenario, backbone=args.backbone, seed=args.seed,
        preset=args.preset, strategy_overrides=overrides["strategy"],
        scenario_overrides=overrides["scenario"], backbone_overrides=overrides["backbone"],
        device=args.device,
    ))
    execute(new_run_folder(args.out, config), config)
    return 0


def command_tree(args: argparse.Namespace) -> int:
    from clbench.taxonomy import main as print_tree

    options = [str(args.run_dir), "--experience", str(args.experience)]
    return print_tree(options + (["--distances"] if args.distances else []))


def command_show(args: argparse.Namespace) -> int:
    from clbench.results import RunFolder

    folder = RunFolder(args.run_dir)
    if not folder.exists():
        raise UsageError(f"{args.run_dir} is not a clbench run folder (no config.json)")
    config, records = folder.config(), folder.records()
    print(f"{folder.path}\n  strategy {config['strategy']} | scenario {config['scenario']} | "
          f"backbone {config['backbone']} | seed {config['seed']} | preset {config['preset']} | "
          f"status {folder.status().get('state')}")
    if not records:
        print("  no finished experience yet")
        return 0
    width = len(records[0].accuracy)
    print("\naccuracy matrix A[t, i] (%), row t = after training experience t:")
    print("  t \\ i " + "".join(f"{i:>7}" for i in range(width)))
    for record in records:
        print(f"  {record.experience:>5} " + "".join(f"{a:7.2f}" for a in record.accuracy))
    summary = folder.metrics()
    print(f"\nFAA {summary['faa']:.2f}  CAA {summary['caa']:.2f}  FFM {summary['ffm']:.2f}  "
          f"(after {summary['experiences_finished']} of {width} experiences)")
    print("seen-class accuracy after each experience: "
          + " ".join(f"{a:.2f}" for a in summary["seen_accuracy"]))
    print(f"train {summary['train_seconds']:.1f}s, eval {summary['eval_seconds']:.1f}s, "
          f"peak memory {summary['peak_memory_mb']:.0f} MB")
    return 0


def command_download(args: argparse.Namespace) -> int:
    from clbench.config import apply_overrides, parse_set_arguments
    from clbench.download import print_progress
    from clbench.registry import SCENARIOS
    from clbench.runner import options_class
    from clbench.scenario import default_data_root

    if args.data_root is not None:
        os.environ["CLBENCH_DATA"] = str(args.data_root)
    data_root = default_data_root()
    factory = SCENARIOS.get(args.name)
    fetch = getattr(factory, "download", None)
    if fetch is None:
        print(f"{args.name}: nothing to download (its data ships with clbench or a package)")
        return 0
    # `--set url=...` and `--set scenario.url=...` both address the scenario
    grouped = parse_set_arguments(args.overrides)
    overrides = {**grouped["strategy"], **grouped["scenario"]}
    options = apply_overrides(options_class(factory)(), overrides, what=f"scenario {args.name}")
    location = fetch(options, data_root, log=print, progress=print_progress())
    print(f"{args.name}: data ready in {location}")
    return 0


def _names(values: list[str] | None) -> list[str]:
    """``--x a,b --x c`` -> [a, b, c]."""
    items = (item.strip() for value in values or [] if value for item in value.split(","))
    return [item for item in items if item]


def _selection(args: argparse.Namespace) -> tuple[list[Path], dict[str, list[str]]]:
    paths = args.results or [Path(os.environ.get("CLBENCH_RESULTS", "results"))]
    keys = ("scenario", "strategy", "backbone", "seed", "protocol")
    return paths, {key: _names(getattr(args, key)) for key in keys}


def command_table(args: argparse.Namespace) -> int:
    from clbench.tables import FORMATS, TableOptions, TableRequest, build_tables, render

    if args.format not in FORMATS:
        raise UsageError(f"unknown format {args.format!r}; valid formats: {', '.join(FORMATS)}")
    paths, filters = _selection(args)
    options = TableOptions(
        group_by=tuple(_names([args.group_by])), metrics=tuple(_names([args.metrics])) or None,
        sort=args.sort, descending=args.descending, precision=args.precision, ddof=args.ddof,
    )
    text = render(build_tables(TableRequest(
        paths=paths, filters=filters, options=options, per_task=args.per_task,
        per_task_metric=args.per_task_metric, reference=args.reference,
        reference_dir=args.reference_dir, include_incomplete=args.include_incomplete,
    )), args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def command_plot(args: argparse.Namespace) -> int:
    from clbench.plots import KINDS, PlotRequest, make_plots
    from clbench.tables import TableOptions

    paths, filters = _selection(args)
    kinds = _names(args.kind) or ["all"]
    request = PlotRequest(
        paths=paths, out_dir=args.out, filters=filters,
        kinds=KINDS if "all" in kinds else tuple(kinds), formats=tuple(_names([args.format])),
        options=TableOptions(group_by=tuple(_names([args.group_by])), ddof=args.ddof),
        per_task_metric=args.per_task_metric, dpi=args.dpi,
    )
    for path in make_plots(request):
        print(path)
    return 0


def command_report(args: argparse.Namespace) -> int:
    from clbench.report import ReportRequest, write_report
    from clbench.tables import TableOptions

    paths, filters = _selection(args)
    written = write_report(ReportRequest(
        paths=paths, out=args.out, fmt=args.format, filters=filters,
        options=TableOptions(group_by=tuple(_names([args.group_by])), ddof=args.ddof),
        reference=not args.no_reference, reference_dir=args.reference_dir, title=args.title,
    ))
    print(f"wrote {written}")
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    from clbench.sweep import SweepCommand, sweep_command

    return sweep_command(SweepCommand(
        file=args.file, strategies=_names(args.sweep_strategy),
        scenarios=_names(args.sweep_scenario), seeds=_names(args.sweep_seed),
        backbones=_names(args.sweep_backbone), presets=_names(args.sweep_preset),
        overrides=args.overrides, out=args.out, device=args.device, data_root=args.data_root,
        jobs=args.jobs, backend=args.backend, ray_address=args.ray_address,
        cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
        max_retries=args.max_retries, status=args.status, progress_every=args.progress_every,
    ))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"list": command_list, "run": command_run, "show": command_show,
                "download": command_download}
    handlers.update(table=command_table, plot=command_plot, report=command_report)
    handlers.update(sweep=command_sweep, tree=command_tree)
    # --data-root reaches the scenarios through $CLBENCH_DATA; restore it afterwards so
    # that an in-process call (a notebook, a test) leaves the caller's environment as it was
    data_root_before = os.environ.get("CLBENCH_DATA")
    try:
        return handlers[args.command](args)
    except UsageError as error:
        print(f"clbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if data_root_before is None:
            os.environ.pop("CLBENCH_DATA", None)
        else:
            os.environ["CLBENCH_DATA"] = data_root_before


if __name__ == "__main__":
    sys.exit(main())

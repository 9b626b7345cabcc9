"""Commands of a single run: ``list``, ``run``, ``show``, ``tree`` and ``download``."""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from clbench.cli.arguments import add_data_root, add_set, results_root, use_data_root
from clbench.errors import UsageError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from clbench.catalog import Catalog

log = logging.getLogger(__name__)

Commands = Any  # argparse's sub-parser action (a private class)


def add_parsers(commands: Commands) -> None:
    _add_list(commands)
    _add_run(commands)
    _add_show(commands)
    _add_tree(commands)
    _add_download(commands)


# -- list -------------------------------------------------------------------------------------


def _add_list(commands: Commands) -> None:
    listing = commands.add_parser(
        "list",
        help="list strategies, scenarios or backbones",
        description="List what can be run, with one-line descriptions.",
    )
    listing.add_argument(
        "what", nargs="?", default="all", choices=["all", "strategies", "scenarios", "backbones"]
    )
    listing.add_argument(
        "--options",
        action="store_true",
        help="also list each entry's options (names, types, defaults, help)",
    )
    listing.set_defaults(handler=command_list)


RANDOM_BACKBONE_NOTE = " [random weights: its numbers are chance level, for smoke tests]"


def _note(catalog: Catalog, kind: str, name: str, entry: dict[str, Any]) -> str:
    """What follows an entry's description: a strategy's presets; a backbone without
    pretrained weights; a scenario's protocol, default backbone and whether its data is
    here."""
    if kind == "strategy":
        return f" [presets: {', '.join(sorted(entry['presets']))}]" if entry["presets"] else ""
    if kind == "backbone":
        return RANDOM_BACKBONE_NOTE if entry.get("random_weights") else ""
    if kind != "scenario":
        return ""
    note = ""
    if entry["protocol_line"] is not None:
        note += f" [protocol: {entry['protocol_line']}]"
    if entry["default_backbone"] is not None:
        note += f" [default backbone: {entry['default_backbone']}]"
    return note + catalog.data_marker(name)


def command_list(args: argparse.Namespace) -> int:
    """From the catalog (:mod:`clbench.catalog`): no torch unless it is out of date."""
    from clbench.catalog import KINDS, current

    catalog = current(data_probes=args.what in ("all", "scenarios"))
    for kind, title in KINDS.items():
        if args.what not in ("all", title):
            continue
        print(f"{title}:")
        for name, entry in catalog.entries(kind):
            print(f"  {name:<20} {entry['description']}{_note(catalog, kind, name, entry)}")
            if args.options:
                for option in entry["options"]:
                    print(
                        f"      {option['name']} ({option['type_name']}, default "
                        f"{option['default_repr']}): {option['help']}"
                    )
    return 0


# -- run ---------------------------------------------------------------------------------------


def _add_run(commands: Commands) -> None:
    run = commands.add_parser(
        "run",
        help="run a strategy on a scenario",
        description="Train a strategy experience by experience, evaluating every test "
        "experience after each one; results go to OUT/<scenario>/<strategy>/<run-id>/.",
        epilog="--set KEY=VALUE sets a strategy hyper-parameter; scenario.KEY=VALUE and "
        "backbone.KEY=VALUE set those components' options. `clbench list --options` "
        "shows every key.",
    )
    run.add_argument(
        "-s", "--strategy", help="registered name, or module:Class / path/file.py:Class"
    )
    run.add_argument("-c", "--scenario", help="registered scenario name")
    run.add_argument("-b", "--backbone", help="registered backbone (default: the scenario's)")
    # seed and preset default to None so that a --config file's values show through
    run.add_argument("--seed", type=int, help="seed of class order, init and shuffling (default 0)")
    run.add_argument(
        "--preset",
        help="named hyper-parameters; auto (default) = the strategy's preset for the "
        "scenario if it has one, else the defaults",
    )
    add_set(run, "override one option (repeatable)")
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="the run's settings from a YAML file: strategy, scenario, backbone, seed, "
        "preset and any --set key (scenario.KEY, backbone.KEY); the command line wins",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration and each experience's classes and "
        "train/test items, then stop: nothing is trained or written",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=results_root(),
        help="results root (default: ./results or $CLBENCH_RESULTS)",
    )
    run.add_argument("--device", default="auto", help="auto | cpu | cuda")
    run.add_argument(
        "--evaluate",
        default="seen",
        choices=["seen", "all"],
        help="test experiences evaluated after each one: seen (0..t, default; the unseen "
        "ones score 0 by construction) or all (for forward-transfer studies)",
    )
    run.add_argument(
        "--logger",
        action="append",
        default=[],
        metavar="KIND",
        help="Avalanche logger(s) writing into RUN_DIR/logs/KIND: tensorboard, wandb, csv, "
        "text (repeatable or a comma list; wandb is offline without an API key)",
    )
    add_data_root(run)
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a killed run from its last finished experience",
    )
    run.set_defaults(handler=command_run)


def command_run(args: argparse.Namespace) -> int:
    from clbench.cli.run_file import merged_arguments
    from clbench.config import parse_set_arguments

    use_data_root(args.data_root)
    if args.resume is not None:
        given = (args.strategy, args.scenario, args.overrides, args.logger, args.config)
        if any(given) or args.dry_run:
            raise UsageError("--resume takes the run's saved configuration: give no other options")
        with _importing_torch(f"clbench run {args.resume}"):
            from clbench.results import RunFolder
            from clbench.runner import execute
        execute(RunFolder(args.resume), resume=True)
        return 0
    args = merged_arguments(args)  # --config FILE's settings where the flags are silent
    if not args.strategy or not args.scenario:
        raise UsageError(
            "run needs --strategy and --scenario (or --config FILE, or --resume RUN_DIR)"
        )
    overrides = parse_set_arguments(args.overrides)
    _check_before_importing(args, overrides)
    with _importing_torch(f"clbench run {args.strategy} on {args.scenario}"):
        from clbench.runner import RunRequest, execute, new_run_folder, resolve_run
    request = RunRequest(
        strategy=args.strategy,
        scenario=args.scenario,
        backbone=args.backbone,
        seed=args.seed,
        preset=args.preset,
        strategy_overrides=overrides["strategy"],
        scenario_overrides=overrides["scenario"],
        backbone_overrides=overrides["backbone"],
        device=args.device,
        evaluate=args.evaluate,
        loggers=args.logger,
    )
    config = resolve_run(request)
    if args.dry_run:
        return _dry_run(config)
    execute(new_run_folder(args.out, config), config)
    return 0


def _dry_run(config: dict[str, Any]) -> int:
    """The configuration a run would record, and the scenario its components make (each
    experience's classes and train/test items); no run folder. Building them also checks
    what only shows while building (data present, options a strategy's ``setup``
    refuses); a scenario may fill the data root's caches as a run would."""
    import json

    from clbench.runner import build_components

    print("resolved configuration (config.json of the run; nothing is trained or written):")
    print(json.dumps(config, indent=2))
    _, scenario = build_components(config)
    print(f"\n{scenario.summary()}")
    return 0


def _importing_torch(what: str) -> AbstractContextManager[Any]:
    """A first line before the heavy imports (torch, Avalanche: half a minute on a small CPU)."""
    from clbench.progress import importing

    return importing(what)


def _check_before_importing(args: argparse.Namespace, overrides: dict[str, dict[str, str]]) -> None:
    """Refuse bad names, presets and ``--set`` values from the catalog, in a second
    rather than after the imports (:mod:`clbench.cli.preflight`); ``resolve_run`` checks
    everything again. Not for a user's ``module:Class``: importing it may register more."""
    from clbench.catalog import from_file

    catalog = from_file()
    if catalog is None or ":" in args.strategy:
        return
    from clbench.cli.preflight import check_run

    check_run(
        catalog,
        strategy=args.strategy,
        scenario=args.scenario,
        backbone=args.backbone,
        preset=args.preset,
        overrides=overrides,
        loggers=args.logger,
        device=args.device,
    )


# -- show --------------------------------------------------------------------------------------


def _add_show(commands: Commands) -> None:
    show = commands.add_parser(
        "show",
        help="print a run's accuracy matrix and metrics",
        description="Print the accuracy matrix and the metrics of one run.",
    )
    show.add_argument("run_dir", type=Path)
    show.set_defaults(handler=command_show)


def command_show(args: argparse.Namespace) -> int:
    from clbench.results import RunFolder
    from clbench.results.folder import RANDOM_WEIGHTS_NOTE, backbone_label

    folder = RunFolder(args.run_dir)
    if not folder.exists():
        raise UsageError(f"{args.run_dir} is not a clbench run folder (no config.json)")
    config, records = folder.config(), folder.records()
    print(
        f"{folder.path}\n  strategy {config['strategy']} | scenario {config['scenario']} | "
        f"backbone {backbone_label(config)} | seed {config['seed']} | "
        f"preset {config['preset']} | status {folder.status().get('state')}"
    )
    if config.get("backbone_random_weights"):
        print(f"  {RANDOM_WEIGHTS_NOTE}")
    if config.get("authors_quirks"):
        print("  authors' code quirks: " + ", ".join(config["authors_quirks"]))
    for component in ("strategy", "scenario", "backbone"):
        options = config.get(f"{component}_options") or {}
        if options:
            print(f"  {component} options: " + _options_text(options))
    if not records:
        print("  no finished experience yet")
        return 0
    width = len(records[0].accuracy)
    print("\naccuracy matrix A[t, i] (%), row t = after training experience t:")
    print("  t \\ i " + "".join(f"{i:>7}" for i in range(width)))
    for record in records:
        print(f"  {record.experience:>5} " + "".join(map(_matrix_cell, record.accuracy)))
    summary = folder.metrics()
    print(
        f"\nFAA {summary['faa']:.2f}  CAA {summary['caa']:.2f}  FFM {summary['ffm']:.2f}  "
        f"(after {summary['experiences_finished']} of {width} experiences)"
    )
    print(
        "seen-class accuracy after each experience: "
        + " ".join(f"{a:.2f}" for a in summary["seen_accuracy"])
    )
    print(
        f"train {summary['train_seconds']:.1f}s, eval {summary['eval_seconds']:.1f}s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB"
    )
    return 0


def _options_text(options: dict[str, object]) -> str:
    """``key=value`` pairs in the --set spelling, wrapped under the label."""
    pairs = [f"{key}={value}" for key, value in options.items()]
    lines, line = [], ""
    for pair in pairs:
        if line and len(line) + len(pair) > 76:
            lines.append(line)
            line = ""
        line = f"{line} {pair}" if line else pair
    return "\n      ".join([*lines, line])


def _matrix_cell(accuracy: float | None) -> str:
    """A(t, i) in a column 7 wide; "-" for a test experience not evaluated (unseen)."""
    return f"{'-':>7}" if accuracy is None else f"{accuracy:7.2f}"


# -- tree --------------------------------------------------------------------------------------


def _add_tree(commands: Commands) -> None:
    tree = commands.add_parser(
        "tree",
        help="print the label tree (and OT class distances) a hier-ot run used",
        description="Print the label tree a hier-ot run built or loaded, as saved after "
        "each experience, and optionally its OT class-distance matrix.",
    )
    tree.add_argument("run_dir", type=Path)
    tree.add_argument(
        "--experience",
        type=int,
        default=-1,
        help="after which experience (default: the last finished)",
    )
    tree.add_argument("--distances", action="store_true", help="also print the class distances")
    # its mistakes read as usage errors of `clbench tree`, with its usage line
    tree.set_defaults(handler=functools.partial(command_tree, fail=tree.error))


def command_tree(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> int:
    """The label tree saved after one experience of a hier-ot run (its ``extra``), the
    share of the run's time its OT distances took, and optionally the distances."""
    from clbench.results import RunFolder

    folder = RunFolder(args.run_dir)
    if not folder.exists():
        fail(f"{args.run_dir} is not a clbench run folder (no config.json)")
    records = folder.records()
    if not records:
        fail(f"{args.run_dir}: no finished experience yet")
    if not -len(records) <= args.experience < len(records):
        fail(f"{args.run_dir}: no experience {args.experience} ({len(records)} finished)")
    record = records[args.experience]
    extra = record.extra
    if "taxonomy" not in extra:
        fail(f"{args.run_dir}: the run recorded no label tree (not a hier-ot run?)")
    print(extra["taxonomy"]["text"])
    if "ot_seconds" in extra:  # cumulative over the run so far, like the times below
        elapsed = sum(r.train_seconds + r.eval_seconds for r in records[: record.experience + 1])
        share = 100 * extra["ot_seconds"] / elapsed if elapsed > 0 else float("nan")
        print(
            f"\nOT: {extra.get('ot_pairs', '?')} class pairs, {extra['ot_seconds']:.1f} s "
            f"of the run's {elapsed:.0f} s train + eval ({share:.1f}%)"
        )
    if args.distances and extra.get("class_distances"):
        _print_distances(extra["class_distances"])
    return 0


def _print_distances(table: dict[str, Any]) -> None:
    names = table["names"]
    width = max(len(n) for n in names)
    print(f"\nOT class distances ({table['solver']}):")
    for name, row in zip(names, table["matrix"]):
        print(f"{name:>{width}}  " + " ".join(f"{v:9.4g}" for v in row))


# -- download ----------------------------------------------------------------------------------


def _add_download(commands: Commands) -> None:
    fetch = commands.add_parser(
        "download",
        help="download (and verify) the data a scenario needs",
        description="Download, checksum and extract a scenario's data into the data root. "
        "Licensed data (tacred) is never downloaded: the command says where to put it.",
    )
    fetch.add_argument("name", help="registered scenario name (see `clbench list scenarios`)")
    add_data_root(fetch)
    add_set(fetch, "scenario option, e.g. url=... for a mirror (repeatable)")
    fetch.set_defaults(handler=command_download)


def command_download(args: argparse.Namespace) -> int:
    from clbench.catalog import from_file
    from clbench.cli.preflight import check_download
    from clbench.config import apply_overrides, parse_set_arguments
    from clbench.data.files import default_data_root

    use_data_root(args.data_root)
    catalog = from_file()  # a bad name or --set, or nothing to fetch: no torch needed
    if catalog is not None and not check_download(catalog, args.name, args.overrides):
        return _nothing_to_download(args.name)
    from clbench.data.download import print_progress
    from clbench.registry import SCENARIOS, options_class

    data_root = default_data_root()
    spec = SCENARIOS.spec(args.name)
    fetch = spec.download if spec is not None else None
    if fetch is None:
        return _nothing_to_download(args.name)
    # `--set url=...` and `--set scenario.url=...` both address the scenario
    grouped = parse_set_arguments(args.overrides)
    overrides = {**grouped["strategy"], **grouped["scenario"]}
    options_type = options_class(SCENARIOS.get(args.name))
    options = apply_overrides(options_type(), overrides, what=f"scenario {args.name}")
    location = fetch(options, data_root, log=log.info, progress=print_progress())
    log.info(f"{args.name}: data ready in {location}")
    return 0


def _nothing_to_download(name: str) -> int:
    log.info(f"{name}: nothing to download (its data ships with clbench or a package)")
    return 0

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"list": command_list, "run": command_run, "show": command_show}
    try:
        return handlers[args.command](args)
    except UsageError as error:
        print(f"clbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

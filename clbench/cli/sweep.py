"""``clbench sweep``: the arguments; the work is :mod:`clbench.sweep.command`'s."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clbench.cli.arguments import add_data_root, add_set, comma_list

Commands = Any  # argparse's sub-parser action (a private class)

GRID_AXES = (
    ("-s", "strategy", "strategies"),
    ("-c", "scenario", "scenarios"),
    ("-b", "backbone", "backbones, default: each scenario's"),
    (None, "seed", "seeds, default 0"),
    (None, "preset", "presets, default auto"),
)


def _add_grid_axes(sweep: argparse.ArgumentParser) -> None:
    for short, name, what in GRID_AXES:
        flags = [short, f"--{name}"] if short else [f"--{name}"]
        sweep.add_argument(
            *flags,
            dest=f"sweep_{name}",
            action="append",
            default=[],
            metavar="SEEDS" if name == "seed" else "NAMES",
            help=f"grid axis: {what} (comma list or repeated)",
        )


def _add_ray_options(sweep: argparse.ArgumentParser) -> None:
    sweep.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="ray: the cluster (HOST:PORT or auto; default: $RAY_ADDRESS, a "
        "cluster started here, else a new local one)",
    )
    sweep.add_argument(
        "--cpus-per-run", type=float, metavar="N", help="ray: CPUs each run reserves (default 1)"
    )
    sweep.add_argument(
        "--gpus-per-run", type=float, metavar="N", help="ray: GPUs each run reserves (default 0)"
    )


def add_parsers(commands: Commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="a grid of runs: skip complete ones, resume the rest, locally or on Ray",
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
    sweep.add_argument(
        "file",
        nargs="?",
        type=Path,
        metavar="SWEEP.yaml",
        help="the grid (see scripts/sweeps/); or give it with the flags below",
    )
    _add_grid_axes(sweep)
    add_set(sweep, "override an option in every run (repeatable; adds to a file's set)")
    sweep.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="results root (default: the file's out, else ./results or "
        "$CLBENCH_RESULTS); on Ray a path every node sees",
    )
    sweep.add_argument("--device", help="auto | cpu | cuda (default: the file's, else auto)")
    sweep.add_argument(
        "--logger",
        action="append",
        default=[],
        metavar="KIND",
        help="Avalanche logger(s) of every run the sweep starts, as clbench run --logger "
        "(tensorboard, wandb, csv, text; replaces the file's loggers)",
    )
    add_data_root(sweep)
    sweep.add_argument("--backend", default="local", help="local (default) or ray")
    sweep.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="local: runs at a time, each with cores // N torch threads and its "
        "own GPU (default 1: one after another)",
    )
    _add_ray_options(sweep)
    sweep.add_argument(
        "--max-retries",
        type=int,
        metavar="N",
        help="retries of a run whose process or worker was killed (default 2)",
    )
    sweep.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between progress lines (default 30)",
    )
    sweep.add_argument(
        "--status",
        action="store_true",
        help="only show which runs are done, running, failed (with the error) or pending",
    )
    sweep.set_defaults(handler=command_sweep)


def command_sweep(args: argparse.Namespace) -> int:
    from clbench.sweep.command import SweepCommand, sweep_command

    command = SweepCommand(
        file=args.file,
        strategies=comma_list(args.sweep_strategy),
        scenarios=comma_list(args.sweep_scenario),
        seeds=comma_list(args.sweep_seed),
        backbones=comma_list(args.sweep_backbone),
        presets=comma_list(args.sweep_preset),
        overrides=args.overrides,
        loggers=args.logger,
        out=args.out,
        device=args.device,
        data_root=args.data_root,
        jobs=args.jobs,
        backend=args.backend,
        ray_address=args.ray_address,
        cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run,
        max_retries=args.max_retries,
        status=args.status,
        progress_every=args.progress_every,
    )
    return sweep_command(command)

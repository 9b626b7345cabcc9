"""``clbench sweep``: plan the grid, skip what is complete, run the rest on a backend, and
end with the table of the sweep's runs."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from clbench.errors import UsageError
from clbench.sweep.grid import Resources, Sweep, SweepError, load_sweep, sweep_from_flags
from clbench.sweep.jobs import Job, JobResult
from clbench.sweep.local import run_local, threads_per_job
from clbench.sweep.plan import (
    RunSpec,
    check_before_importing,
    expand,
    load_registered_names,
    run_identity,
)
from clbench.sweep.progress import Progress
from clbench.sweep.state import LOG_FILE, RunState, inspect_run, status_lines

BACKENDS = ("local", "ray")

log = logging.getLogger(__name__)


@dataclass
class SweepCommand:
    """``clbench sweep`` arguments, as the CLI parsed them."""

    file: Path | None = None
    strategies: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    loggers: list[str] = field(default_factory=list)
    out: Path | None = None
    device: str | None = None
    data_root: Path | None = None
    jobs: int = 1
    backend: str = "local"
    ray_address: str | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    max_retries: int | None = None
    status: bool = False
    progress_every: float = 30.0


def load_command_sweep(command: SweepCommand) -> Sweep:
    """The grid of a file or of the flags, with the flags' settings over the file's."""
    grid_flags = [
        command.strategies,
        command.scenarios,
        command.seeds,
        command.backbones,
        command.presets,
    ]
    if command.file is not None:
        if any(grid_flags):
            raise UsageError(
                "give the grid in SWEEP.yaml or with --strategy / --scenario / "
                "--seed / --backbone / --preset, not both (--set adds to a file)"
            )
        sweep = load_sweep(command.file)
    else:
        sweep = sweep_from_flags(*grid_flags)
    if command.device is not None:
        sweep.device = command.device
    if command.loggers:  # the command line's loggers replace the file's
        sweep.loggers = command.loggers
    if command.cpus_per_run is not None:
        sweep.resources.cpus = command.cpus_per_run
    if command.gpus_per_run is not None:
        sweep.resources.gpus = command.gpus_per_run
    if command.max_retries is not None:
        sweep.max_retries = command.max_retries
    return sweep


def decide_device(requested: str, backend: str, resources: Resources) -> str:
    """The device written into every run's configuration."""
    from clbench.runner import resolve_device

    if backend == "local":
        return resolve_device(requested)
    # On Ray the run's node decides, not this driver: a GPU task runs on CUDA.
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device {requested!r} on Ray: valid choices: auto, cpu, cuda "
            "(Ray hands each GPU task its own device)"
        )
    if requested == "cuda" and resources.gpus <= 0:
        raise UsageError("--device cuda on Ray needs --gpus-per-run (or resources.gpus) > 0")
    if requested == "auto":
        return "cuda" if resources.gpus > 0 else "cpu"
    return requested


def default_out() -> Path:
    return Path(os.environ.get("CLBENCH_RESULTS", "results"))


def _check_arguments(command: SweepCommand) -> None:
    if command.backend not in BACKENDS:
        raise UsageError(
            f"unknown backend {command.backend!r}; valid choices: {', '.join(BACKENDS)}"
        )
    if command.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {command.jobs}")


def _clashes(specs: list[RunSpec]) -> list[str]:
    """Folders whose config.json is not the configuration their name's hash stands for."""
    clashes = []
    for spec in specs:
        config_path = spec.folder / "config.json"
        if (
            config_path.is_file()
            and run_identity(json.loads(config_path.read_text())) != spec.identity
        ):
            clashes.append(f"{spec.folder} holds a different configuration than its name says")
    return clashes


def plan(command: SweepCommand) -> tuple[Sweep, Path, list[RunSpec]]:
    """The sweep, its results root and every run, validated; nothing is written."""
    _check_arguments(command)
    sweep = load_command_sweep(command)
    check_before_importing(sweep, command.overrides)  # typos refused before the imports
    load_registered_names()  # the slow part (imports), announced before decide_device's
    out = command.out or sweep.out or default_out()
    # --status only reads folders: it must work on a head node without the runs' device
    device = (
        "cpu" if command.status else decide_device(sweep.device, command.backend, sweep.resources)
    )
    specs = expand(sweep, out, device, command.overrides)
    clashes = _clashes(specs)
    if clashes:
        raise SweepError(sweep.source, clashes)
    return sweep, out, specs


def print_status(sweep: Sweep, out: Path, specs: list[RunSpec]) -> None:
    """``--status``: what the user asked for, so printed (not logged)."""
    print(f"sweep {sweep.source} -> {out}: {len(specs)} runs")
    for line in status_lines(specs, [inspect_run(spec) for spec in specs]):
        print(f"  {line}")


def print_table(specs: list[RunSpec]) -> None:
    """The ``clbench table`` of the sweep's runs, complete or not."""
    from clbench.reporting.display import TableRequest, build_tables
    from clbench.reporting.render import render

    folders = [spec.folder for spec in specs if (spec.folder / "config.json").is_file()]
    if folders:
        print(
            render(build_tables(TableRequest(paths=folders, include_incomplete=True)), "markdown")
        )


def _run_todo(
    command: SweepCommand,
    sweep: Sweep,
    specs: list[RunSpec],
    todo: list[RunSpec],
    progress: Progress,
) -> list[JobResult]:
    data_root = str(command.data_root) if command.data_root else os.environ.get("CLBENCH_DATA")
    jobs = [
        Job(folder=str(spec.folder), config=spec.config, label=spec.label, data_root=data_root)
        for spec in todo
    ]
    if command.backend == "ray":
        from clbench.sweep.ray import run_on_ray

        return run_on_ray(
            jobs, todo, sweep.resources, sweep.max_retries, progress, address=command.ray_address
        )
    if not jobs:
        return []
    workers = min(command.jobs, len(jobs))
    log.info(f"local: {workers} job(s) at a time, {threads_per_job(workers)} torch thread(s) each")
    return run_local(jobs, todo, workers, specs[0].config["device"], sweep.max_retries, progress)


def _announce(sweep: Sweep, out: Path, specs: list[RunSpec], states: list[RunState]) -> None:
    chosen = [state for state in states if state.state in ("pending", "failed")]
    resumes = sum(state.finished > 0 for state in chosen)
    skipped = sum(state.state == "done" for state in states)
    elsewhere = sum(state.state == "running" for state in states)
    log.info(
        f"sweep {sweep.source} -> {out}: {len(specs)} runs; {skipped} complete (skipped), "
        f"{elsewhere} running elsewhere (skipped), {len(chosen)} to run ({resumes} resume)"
    )


def _summarise(results: list[JobResult], states: list[RunState], progress: Progress) -> int:
    failed = [result for result in results if result.state != "done"]
    skipped = sum(state.state == "done" for state in states)
    elsewhere = sum(state.state == "running" for state in states)
    log.info(
        f"sweep finished in {time.perf_counter() - progress.began:.0f}s: "
        f"{len(results) - len(failed)} ran, {skipped} were complete, {len(failed)} not done"
        + (f", {elsewhere} running elsewhere" if elsewhere else "")
    )
    for result in failed:
        log.info(
            f"  {result.state}: {result.label}: {result.error or ''} (log: "
            f"{Path(result.folder) / LOG_FILE})"
        )
    return len(failed)


def sweep_command(command: SweepCommand) -> int:
    """``clbench sweep``: 0 when every run is done, 1 when some failed or were interrupted."""
    sweep, out, specs = plan(command)
    if command.status:
        print_status(sweep, out, specs)
        return 0
    states = [inspect_run(spec) for spec in specs]
    todo = [spec for spec, state in zip(specs, states) if state.state in ("pending", "failed")]
    _announce(sweep, out, specs, states)
    progress = Progress(len(todo), command.progress_every)
    results = _run_todo(command, sweep, specs, todo, progress)
    failed = _summarise(results, states, progress)
    print_table(specs)
    return 1 if failed else 0

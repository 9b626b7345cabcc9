"""Sweeps: a grid of runs (strategies x scenarios x seeds x ...) run, skipped or resumed.

A sweep is a YAML file or a handful of ``clbench sweep`` flags. It is expanded and every
grid point is resolved by :func:`clbench.runner.resolve_run` *before* anything runs, so an
unknown key, strategy, scenario, backbone, preset or option is one error that names every
offending entry.

Run identity. Each grid point gets a fixed folder,
``<out>/<scenario>/<strategy>/<backbone>_seed<N>_<hash>``, where the hash covers the whole
resolved configuration except the device and the clbench version (the same experiment
resumed on a GPU node, or after an upgrade, is still the same run). Re-running a sweep
therefore skips complete runs, resumes incomplete ones from their last finished experience
(the runner's own resume) and starts the rest. Changing an option, or a preset in the code,
changes the hash and makes a new run rather than silently mixing two settings.

Every run is a separate process (``python -m clbench.sweep FOLDER``, which is
``clbench run --resume FOLDER`` after the folder and its config.json are written), so a
crash, an out-of-memory kill or a segfault of one run never takes the sweep down. Around
each run the sweep keeps three files of its own in the run folder:

.sweep.lock         an flock held by the run's process for its whole life: a second sweep,
                    a retried task or ``--status`` can tell a live run from a dead one
.sweep-worker.json  host, pids and attempt of the process running it
sweep.log           the run's standard output and error, one block per attempt

The local backend runs one run after another, or ``--jobs N`` at a time with
``cores // N`` torch threads and one GPU each; :mod:`clbench.sweep_ray` runs the same jobs
as Ray tasks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from clbench.errors import UsageError

GRID_KEYS = ("strategy", "scenario", "seed", "backbone", "preset", "set", "vary")
FILE_KEYS = (*GRID_KEYS, "description", "out", "device", "resources", "max_retries", "grids")
RESOURCE_KEYS = ("cpus", "gpus")
BACKENDS = ("local", "ray")
STATES = ("done", "running", "failed", "pending")
# Not part of a run's identity: where it runs and which clbench release wrote it.
VOLATILE_CONFIG_KEYS = ("device", "clbench_version")

LOCK_FILE = ".sweep.lock"
WORKER_FILE = ".sweep-worker.json"
LOG_FILE = "sweep.log"
PARENT_ENV = "CLBENCH_SWEEP_PARENT"


class SweepError(UsageError):
    """A sweep that cannot run; ``problems`` lists every offending entry."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s), nothing was run:\n{lines}")


# -- the grid -----------------------------------------------------------------------------


@dataclass
class Resources:
    """What one run reserves on a Ray cluster (locally: threads come from --jobs)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Grid:
    """One block of a sweep: the cartesian product of its lists."""

    strategy: list[str]
    scenario: list[str]
    seed: list[int] = field(default_factory=lambda: [0])
    backbone: list[str | None] = field(default_factory=lambda: [None])
    preset: list[str] = field(default_factory=lambda: ["auto"])
    overrides: dict[str, str] = field(default_factory=dict)  # `set`: KEY -> VALUE
    vary: dict[str, list[str]] = field(default_factory=dict)  # KEY -> values to sweep


@dataclass
class Sweep:
    source: str  # the file, or "command line", for messages
    grids: list[Grid]
    description: str = ""
    out: Path | None = None
    device: str = "auto"
    resources: Resources = field(default_factory=Resources)
    max_retries: int = 2
    # what is wrong in the file's structure; expand() adds the names and options that do
    # not resolve and reports everything at once
    problems: list[str] = field(default_factory=list)


@dataclass
class RunSpec:
    """One grid point: its resolved configuration and the folder it lives in."""

    config: dict[str, Any]
    identity: str
    folder: Path
    overrides: dict[str, str]

    @property
    def label(self) -> str:
        return "/".join(self.folder.parts[-3:])


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_text(value: Any) -> str:
    """A YAML scalar as the string ``--set`` would give (parsed against the option's type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def _names(where: str, key: str, value: Any, problems: list[str]) -> list[str]:
    items = _as_list(value)
    bad = [item for item in items if not isinstance(item, str) or not item]
    if bad or not items:
        problems.append(f"{where}: {key} must be a name or a list of names, got {value!r}")
        return []
    return items


def _seeds(where: str, value: Any, problems: list[str]) -> list[int]:
    items = _as_list(value)
    seeds = []
    for item in items:
        # bool is an int in Python; `seed: yes` is a mistake, not seed 1
        if isinstance(item, int) and not isinstance(item, bool):
            seeds.append(item)
        elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
            seeds.append(int(item))
        else:
            problems.append(f"{where}: seed must be an integer or a list of integers, got {item!r}")
    if not items:
        problems.append(f"{where}: seed is an empty list")
    return seeds


def _overrides(where: str, value: Any, problems: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: set must be a mapping KEY: VALUE, got {value!r}")
        return {}
    result = {}
    for key, item in value.items():
        if isinstance(item, dict):
            problems.append(f"{where}: set {key}: a value, not a mapping")
            continue
        result[str(key)] = _as_text(item)
    return result


def _vary(where: str, value: Any, problems: list[str]) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: vary must be a mapping KEY: [VALUES], got {value!r}")
        return {}
    result = {}
    for key, items in value.items():
        if not isinstance(items, list) or not items:
            problems.append(f"{where}: vary {key}: a non-empty list of values, got {items!r}")
            continue
        result[str(key)] = [_as_text(item) for item in items]
    return result


def _unknown_keys(where: str, entry: dict[str, Any], valid: Iterable[str]) -> list[str]:
    valid = list(valid)
    unknown = [str(key) for key in entry if key not in valid]
    if not unknown:
        return []
    names = ", ".join(map(repr, unknown))
    return [f"{where}: unknown key(s) {names}; valid keys: {', '.join(valid)}"]


def _grid(where: str, entry: dict[str, Any], problems: list[str]) -> Grid | None:
    before = len(problems)
    for key in ("strategy", "scenario"):
        if key not in entry:
            problems.append(f"{where}: no {key} (give it in the grid or at the top of the file)")
    strategy = _names(where, "strategy", entry["strategy"], problems) if "strategy" in entry else []
    scenario = _names(where, "scenario", entry["scenario"], problems) if "scenario" in entry else []
    seed = _seeds(where, entry.get("seed", 0), problems)
    backbone: list[str | None] = [None]
    if entry.get("backbone") not in (None, "default"):
        backbone = list(_names(where, "backbone", entry["backbone"], problems))
    preset = _names(where, "preset", entry.get("preset", "auto"), problems)
    overrides = _overrides(where, entry.get("set"), problems)
    vary = _vary(where, entry.get("vary"), problems)
    if len(problems) > before:
        return None
    return Grid(strategy, scenario, seed, backbone, preset, overrides, vary)


def parse_sweep(data: Any, source: str) -> Sweep:
    """A sweep from the mapping of a YAML file; every problem is reported at once."""
    if not isinstance(data, dict):
        raise SweepError(source, [f"a sweep file is a mapping of keys ({', '.join(FILE_KEYS)})"])
    problems = _unknown_keys("top level", data, FILE_KEYS)
    defaults = {key: data[key] for key in GRID_KEYS if key in data}
    entries = data.get("grids")
    grids: list[Grid] = []
    if entries is None:
        grid = _grid("grid", defaults, problems)
        grids = [grid] if grid else []
    elif not isinstance(entries, list) or not entries:
        problems.append("grids: a non-empty list of grid blocks")
    else:
        for index, entry in enumerate(entries):
            where = f"grids[{index}]"
            if not isinstance(entry, dict):
                problems.append(f"{where}: a mapping of grid keys ({', '.join(GRID_KEYS)})")
                continue
            problems += _unknown_keys(where, entry, GRID_KEYS)
            # a block inherits the file's grid keys; `set` and `vary` are merged, block wins
            merged = {**defaults, **entry}
            for key in ("set", "vary"):
                if isinstance(defaults.get(key), dict) and isinstance(entry.get(key), dict):
                    merged[key] = {**defaults[key], **entry[key]}
            grid = _grid(where, merged, problems)
            if grid:
                grids.append(grid)
    resources = Resources()
    raw_resources = data.get("resources", {}) or {}
    if not isinstance(raw_resources, dict):
        problems.append(f"resources: a mapping with {', '.join(RESOURCE_KEYS)}")
    else:
        problems += _unknown_keys("resources", raw_resources, RESOURCE_KEYS)
        for key in RESOURCE_KEYS:
            value = raw_resources.get(key, getattr(resources, key))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"resources.{key}: a number >= 0, got {value!r}")
            else:
                setattr(resources, key, float(value))
    max_retries = data.get("max_retries", 2)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        problems.append(f"max_retries: an integer >= 0, got {max_retries!r}")
        max_retries = 2
    for key in ("out", "device", "description"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key}: a string, got {data[key]!r}")
    text = {key: data[key] for key in ("out", "device", "description")
            if isinstance(data.get(key), str)}
    return Sweep(
        source=source, grids=grids, description=text.get("description", ""),
        out=Path(text["out"]) if text.get("out") else None, device=text.get("device", "auto"),
        resources=resources, max_retries=max_retries, problems=problems,
    )


def load_sweep(path: Path) -> Sweep:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML: {error}") from None
    return parse_sweep(data, str(path))


def sweep_from_flags(strategies: list[str], scenarios: list[str], seeds: list[str],
                     backbones: list[str], presets: list[str]) -> Sweep:
    """The common case on the command line: one grid block from repeated flags."""
    entry: dict[str, Any] = {"strategy": strategies, "scenario": scenarios,
                             "seed": seeds or [0], "preset": presets or ["auto"]}
    missing = [f"--{key}" for key in ("strategy", "scenario") if not entry[key]]
    if missing:
        raise UsageError(f"sweep needs a SWEEP.yaml file or {' and '.join(missing)} (repeatable)")
    if backbones:
        entry["backbone"] = backbones
    return parse_sweep(entry, "command line")


def run_identity(config: dict[str, Any]) -> str:
    """Short hash of what makes a run this run (everything but device and version)."""
    kept = {key: value for key, value in config.items() if key not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def run_folder(out: Path, config: dict[str, Any], identity: str) -> Path:
    # same <scenario>/<strategy>/ layout as runner.new_run_folder, but a fixed name per point
    strategy_name = config["strategy"].rpartition(":")[2] or config["strategy"]
    name = f"{config['backbone']}_seed{config['seed']}_{identity}"
    return Path(out) / config["scenario"] / strategy_name.replace("/", "_") / name


def _check_names(grid: Grid, where: str, problems: list[str]) -> set[str]:
    """Names that do not exist (reported once each, with the valid choices)."""
    from clbench.registry import BACKBONES, SCENARIOS, load_strategy_class

    bad: set[str] = set()
    checks: list[tuple[Callable[[str], Any], Iterable[str | None]]] = [
        (load_strategy_class, grid.strategy), (SCENARIOS.get, grid.scenario),
        (BACKBONES.get, grid.backbone),
    ]
    for lookup, names in checks:
        for name in names:
            if name is None:
                continue
            try:
                lookup(name)
            except UsageError as error:
                bad.add(name)
                problems.append(f"{where}: {error}")
    return bad


def _resolve_point(point: dict[str, Any], overrides: dict[str, dict[str, str]]) -> dict[str, Any]:
    from clbench.runner import RunRequest, resolve_run

    return resolve_run(RunRequest(
        **point, strategy_overrides=overrides["strategy"],
        scenario_overrides=overrides["scenario"], backbone_overrides=overrides["backbone"],
        device="cpu",
    ))


def _option_problems(point: dict[str, Any], overrides: dict[str, dict[str, str]],
                     first: UsageError) -> list[str]:
    """The runner stops at the first bad option: try each override alone to name them all."""
    errors = [str(first)]
    for group, values in overrides.items():
        for key, value in values.items():
            alone: dict[str, dict[str, str]] = {name: {} for name in overrides}
            alone[group] = {key: value}
            try:
                _resolve_point({**point, "preset": "default"}, alone)
            except UsageError as error:
                errors.append(str(error))
    return list(dict.fromkeys(errors))


def expand(sweep: Sweep, out: Path, device: str,
           extra_overrides: list[str] | None = None) -> list[RunSpec]:
    """Every grid point, resolved and validated; raises SweepError naming each problem.

    ``device`` is written into each configuration as is (the caller decides it: locally
    the resolved device, on Ray the one the run's resources imply); validation resolves
    on the CPU so a CPU-only head node can plan a GPU sweep.
    """
    from clbench.config import parse_set_arguments

    try:
        cli_overrides = parse_set_arguments(extra_overrides or [])
    except UsageError as error:
        raise SweepError("command line", [str(error)]) from None
    problems: list[str] = list(sweep.problems)
    specs: dict[str, RunSpec] = {}
    for index, grid in enumerate(sweep.grids):
        where = f"grids[{index}]" if len(sweep.grids) > 1 else "grid"
        bad_names = _check_names(grid, where, problems)
        varied = [dict(zip(grid.vary, values)) for values in itertools.product(*grid.vary.values())]
        for scenario, strategy, backbone, preset, varying, seed in itertools.product(
            grid.scenario, grid.strategy, grid.backbone, grid.preset, varied, grid.seed
        ):
            if bad_names & {scenario, strategy, backbone}:
                continue
            pairs = [f"{k}={v}" for k, v in {**grid.overrides, **varying}.items()]
            overrides = parse_set_arguments(pairs)
            for group, values in cli_overrides.items():
                overrides[group].update(values)
            point = {"strategy": strategy, "scenario": scenario, "backbone": backbone,
                     "seed": seed, "preset": preset}
            try:
                config = _resolve_point(point, overrides)
            except UsageError as error:
                for message in _option_problems(point, overrides, error):
                    problems.append(f"{where}: {scenario} / {strategy}: {message}")
                continue
            config["device"] = device
            identity = run_identity(config)
            specs.setdefault(identity, RunSpec(
                config=config, identity=identity, folder=run_folder(out, config, identity),
                overrides={**grid.overrides, **varying},
            ))
    if problems:
        raise SweepError(sweep.source, list(dict.fromkeys(problems)))
    if not specs:  # only when every grid block was rejected above
        raise SweepError(sweep.source, ["the grid is empty"])
    return list(specs.values())


# -- the state of a run, from its folder ------------------------------------------------


@dataclass
class RunState:
    state: str  # one of STATES
    detail: str
    finished: int = 0
    total: int | None = None
    error: str | None = None
    faa: float | None = None


def is_locked(folder: Path) -> bool:
    """Whether a live process holds the run's lock (it is running right now)."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return False
    handle = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)  # closing drops the lock if this call took it
    return False


def worker_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / WORKER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def inspect_run(spec: RunSpec) -> RunState:
    from clbench.results import RunFolder

    folder = RunFolder(spec.folder)
    if not folder.exists():
        if is_locked(spec.folder):
            return RunState("running", "starting")
        return RunState("pending", "not started")
    status = folder.status()
    records = folder.records()
    finished = len(records)
    total = len(records[0].accuracy) if records else None
    progress = (f"{finished}/{total} experiences" if total is not None
                else f"{finished} experiences finished")
    state = status.get("state")
    if state == "complete":
        faa = folder.metrics().get("faa")
        return RunState("done", f"FAA {faa:.2f}" if faa is not None else "complete",
                        finished, total, faa=faa)
    if is_locked(spec.folder):
        where = worker_info(spec.folder)
        on = f" on {where.get('host')} pid {where.get('child_pid')}" if where else ""
        return RunState("running", f"{progress}{on}", finished, total)
    if state == "failed":
        error = status.get("error") or "failed"
        return RunState("failed", f"{progress}: {error}", finished, total, error=error)
    # interrupted, or "running" / "unknown" left by a process that is gone: resumable
    detail = f"resumes after {progress}" if finished else f"not started ({state or 'no status'})"
    return RunState("pending", detail, finished, total)


def status_lines(specs: list[RunSpec], states: list[RunState]) -> list[str]:
    width = max(len(spec.label) for spec in specs)
    lines = [f"{state.state:<8} {spec.label:<{width}}  {state.detail}"
             for spec, state in zip(specs, states)]
    counts = {name: sum(state.state == name for state in states) for name in STATES}
    lines.append(", ".join(f"{counts[name]} {name}" for name in STATES) + f" (of {len(specs)})")
    return lines


# -- one run in its own process ------------------------------------------------------------


@dataclass
class Job:
    """What a worker (a thread of the local pool or a Ray task) needs to run one grid point."""

    folder: str
    config: dict[str, Any]
    label: str
    threads: int = 1
    cuda_visible_devices: str | None = None  # None: inherit (Ray sets it for GPU tasks)
    data_root: str | None = None
    lock_wait: float = 600.0  # a retried run waits this long for its killed predecessor


@dataclass
class JobResult:
    label: str
    folder: str
    state: str  # done | failed | interrupted | busy | killed
    seconds: float = 0.0
    returncode: int | None = None
    error: str | None = None
    faa: float | None = None
    attempts: int = 0


class RunKilled(RuntimeError):
    """The run's process died from a signal (OOM killer, a node going away): retryable."""


class _RunLock:
    """An exclusive flock on the run's lock file, handed on to the run's process."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.handle: int | None = None

    def acquire(self, wait: float) -> bool:
        self.handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.release()
                    return False
                time.sleep(0.5)

    def release(self) -> None:
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None


def _tail(path: Path, after: int, limit: int = 4000) -> str:
    """The last non-empty line of what this attempt wrote to the log."""
    try:
        with open(path, "rb") as stream:
            stream.seek(max(after, path.stat().st_size - limit))
            text = stream.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _child_environment(job: Job) -> dict[str, str]:
    environment = dict(os.environ)
    # torch sizes its intra-op pool from these: N jobs on C cores get C // N threads each
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environment[name] = str(job.threads)
    if job.cuda_visible_devices is not None:
        environment["CUDA_VISIBLE_DEVICES"] = job.cuda_visible_devices
    if job.data_root is not None:
        environment["CLBENCH_DATA"] = job.data_root
    environment["PYTHONUNBUFFERED"] = "1"
    environment[PARENT_ENV] = str(os.getpid())
    return environment


def run_job(job: Job, *, attempts: int = 1, raise_if_killed: bool = False,
            on_start: Callable[[subprocess.Popen], None] | None = None,
            on_end: Callable[[subprocess.Popen], None] | None = None,
            stop: threading.Event | None = None) -> JobResult:
    """Run (or resume) one grid point in a child process; up to ``attempts`` tries when the
    child is killed by a signal. A run that fails with an error is not retried: the same
    error would come back. ``stop`` set (the sweep was interrupted) ends it as interrupted."""
    from clbench.results import RunFolder

    path = Path(job.folder)
    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path)
    began = time.perf_counter()
    lock = _RunLock(path)
    if not lock.acquire(job.lock_wait):
        where = worker_info(path)
        return JobResult(job.label, job.folder, "busy", error="another process is running it "
                         f"({where.get('host')} pid {where.get('child_pid')})")
    try:
        if not folder.exists():
            folder.write_config(job.config)
        attempt = int(worker_info(path).get("attempt", 0))
        for tries in range(1, attempts + 1):
            if folder.status().get("state") == "complete":
                return _result(job, folder, "done", began, 0, tries - 1)
            if stop is not None and stop.is_set():
                return _result(job, folder, "interrupted", began, None, tries - 1)
            attempt += 1
            returncode, log_start = _run_child(job, path, lock, attempt, on_start, on_end)
            state = folder.status().get("state")
            if returncode == 0 and state == "complete":
                return _result(job, folder, "done", began, returncode, tries)
            if returncode < 0 and stop is not None and stop.is_set():
                folder.set_status("interrupted", finished_experiences=len(folder.records()))
                return _result(job, folder, "interrupted", began, returncode, tries)
            if returncode < 0:
                number = -returncode
                name = signal.Signals(number).name if number in signal.valid_signals() else number
                error = f"the run's process was killed by {name} (out of memory?)"
                folder_state = "interrupted" if tries < attempts or raise_if_killed else "failed"
                folder.set_status(folder_state, finished_experiences=len(folder.records()),
                                  error=error)
                if raise_if_killed:
                    raise RunKilled(f"{job.label}: {error}")
                if tries < attempts:
                    continue
                return _result(job, folder, "killed", began, returncode, tries, error)
            if state == "interrupted":
                return _result(job, folder, "interrupted", began, returncode, tries)
            error = folder.status().get("error") if state == "failed" else None
            error = error or _tail(path / LOG_FILE, log_start) or f"exit code {returncode}"
            if state != "failed":  # died before the runner could say why (import error, ...)
                folder.set_status("failed", finished_experiences=len(folder.records()),
                                  error=error)
            return _result(job, folder, "failed", began, returncode, tries, error)
        raise AssertionError("unreachable")
    finally:
        lock.release()


def _run_child(job: Job, path: Path, lock: _RunLock, attempt: int,
               on_start: Callable[[subprocess.Popen], None] | None,
               on_end: Callable[[subprocess.Popen], None] | None) -> tuple[int, int]:
    log_path = path / LOG_FILE
    with open(log_path, "ab") as log:
        log.write(f"=== clbench sweep: attempt {attempt} on {socket.gethostname()} pid "
                  f"{os.getpid()}, {datetime.now().isoformat(timespec='seconds')}, "
                  f"{job.threads} thread(s) ===\n".encode())
        log.flush()
        log_start = log.tell()
        # The child inherits the locked file: the lock lives as long as the run does, even
        # when this process is killed, so a retry never runs beside its predecessor.
        process = subprocess.Popen(
            [sys.executable, "-m", "clbench.sweep", str(path)], stdout=log,
            stderr=subprocess.STDOUT, env=_child_environment(job), pass_fds=(lock.handle,),
        )
    from clbench.results import atomic_write_json

    atomic_write_json(path / WORKER_FILE, {
        "host": socket.gethostname(), "pid": os.getpid(), "child_pid": process.pid,
        "attempt": attempt, "started": datetime.now().isoformat(timespec="seconds"),
    })
    if on_start is not None:
        on_start(process)
    try:
        returncode = process.wait()
    finally:
        if on_end is not None:
            on_end(process)
    return returncode, log_start


def _result(job: Job, folder: Any, state: str, began: float, returncode: int | None,
            attempts: int, error: str | None = None) -> JobResult:
    return JobResult(job.label, job.folder, state, time.perf_counter() - began, returncode,
                     error, folder.metrics().get("faa") if state == "done" else None, attempts)


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the sweep worker that started us dies (the runner then
    records the run as interrupted and exits), so a killed worker leaves no orphan run."""
    parent = os.environ.get(PARENT_ENV)
    if not sys.platform.startswith("linux") or parent is None:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(argv: list[str]) -> int:
    """``python -m clbench.sweep RUN_DIR``: the run, in the process a sweep started."""
    _die_with_parent()
    from clbench.cli import main

    return main(["run", "--resume", *argv])


# -- progress -------------------------------------------------------------------------------


class Progress:
    """One line per started / finished run, and a summary line every ``every`` seconds."""

    def __init__(self, total: int, echo: Callable[[str], None] = print,
                 every: float = 30.0) -> None:
        self.total, self.echo, self.every = total, echo, every
        self.finished = 0
        self.began = time.perf_counter()
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        with self._lock:
            self.echo(f"[{time.perf_counter() - self.began:7.1f}s] {line}")
            sys.stdout.flush()

    def started(self, label: str) -> None:
        self._say(f"start   {label}")

    def done(self, result: JobResult) -> None:
        self.finished += 1
        count = f"{self.finished}/{self.total}"
        if result.state == "done":
            faa = f"FAA {result.faa:.2f}, " if result.faa is not None else ""
            self._say(f"done    {result.label} ({faa}{result.seconds:.0f}s) [{count}]")
        else:
            self._say(f"{result.state:<7} {result.label}: {result.error or ''} [{count}]")

    def heartbeat(self, specs: list[RunSpec]) -> None:
        states = [inspect_run(spec) for spec in specs]
        running = [f"{spec.label} {state.finished}/{state.total or '?'}"
                   for spec, state in zip(specs, states) if state.state == "running"]
        waiting = sum(state.state == "pending" for state in states)
        self._say(f"progress: {self.finished}/{self.total} finished, {len(running)} running"
                  + (f" ({', '.join(running)})" if running else "") + f", {waiting} waiting")


# -- the local backend -----------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_gpus(device: str) -> list[str]:
    """GPU ids to hand out one per job slot; empty when runs are on the CPU or pinned."""
    if device != "cuda":
        return []  # cpu, or an explicit cuda:K the user chose for every run
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [item.strip() for item in visible.split(",") if item.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def run_local(jobs: list[Job], specs: list[RunSpec], workers: int, device: str, retries: int,
              progress: Progress) -> list[JobResult]:
    """``workers`` runs at a time, each in its own process with cores // workers threads."""
    threads = max(1, available_cores() // workers)
    gpus = local_gpus(device)
    if gpus and workers > len(gpus):
        progress.echo(f"note: {workers} jobs share {len(gpus)} GPU(s), round robin")
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(workers):
        slots.put(slot)
    active: set[subprocess.Popen] = set()
    stop = threading.Event()

    def started(process: subprocess.Popen) -> None:
        active.add(process)
        if stop.is_set():  # started in the instant the sweep was interrupted
            process.terminate()

    def one(job: Job) -> JobResult:
        slot = slots.get()
        try:
            gpu = gpus[slot % len(gpus)] if gpus else None
            # one sweep process: a locked run is one it skipped as running elsewhere
            job = dataclasses.replace(job, threads=threads, cuda_visible_devices=gpu,
                                      lock_wait=5.0)
            progress.started(job.label)
            return run_job(job, attempts=retries + 1, on_start=started, on_end=active.discard,
                           stop=stop)
        finally:
            slots.put(slot)

    by_label = {spec.label: spec for spec in specs}
    results: list[JobResult] = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clbench-sweep")
    futures: dict[Future[JobResult], Job] = {pool.submit(one, job): job for job in jobs}
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=progress.every, return_when=FIRST_COMPLETED)
            for future in finished:
                result = future.result()
                results.append(result)
                progress.done(result)
            if not finished:
                progress.heartbeat([by_label[futures[f].label] for f in pending])
    except KeyboardInterrupt:
        # stop the queue, then the runs in flight: SIGTERM makes each record itself as
        # interrupted, so the next `clbench sweep` resumes it
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list(active):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


# -- the command ------------------------------------------------------------------------------


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
    grid_flags = [command.strategies, command.scenarios, command.seeds, command.backbones,
                  command.presets]
    if command.file is not None:
        if any(grid_flags):
            raise UsageError("give the grid in SWEEP.yaml or with --strategy / --scenario / "
                             "--seed / --backbone / --preset, not both (--set adds to a file)")
        sweep = load_sweep(command.file)
    else:
        sweep = sweep_from_flags(*grid_flags)
    if command.device is not None:
        sweep.device = command.device
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
        raise UsageError(f"--device {requested!r} on Ray: valid choices: auto, cpu, cuda "
                         "(Ray hands each GPU task its own device)")
    if requested == "cuda" and resources.gpus <= 0:
        raise UsageError("--device cuda on Ray needs --gpus-per-run (or resources.gpus) > 0")
    if requested == "auto":
        return "cuda" if resources.gpus > 0 else "cpu"
    return requested


def default_out() -> Path:
    return Path(os.environ.get("CLBENCH_RESULTS", "results"))


def plan(command: SweepCommand) -> tuple[Sweep, Path, list[RunSpec]]:
    if command.backend not in BACKENDS:
        raise UsageError(f"unknown backend {command.backend!r}; "
                         f"valid choices: {', '.join(BACKENDS)}")
    if command.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {command.jobs}")
    sweep = load_command_sweep(command)
    out = command.out or sweep.out or default_out()
    # --status only reads folders: it must work on a head node without the runs' device
    device = ("cpu" if command.status
              else decide_device(sweep.device, command.backend, sweep.resources))
    specs = expand(sweep, out, device, command.overrides)
    clashes = []
    for spec in specs:
        config_path = spec.folder / "config.json"
        if config_path.is_file():
            if run_identity(json.loads(config_path.read_text())) != spec.identity:
                clashes.append(f"{spec.folder} holds a different configuration than its name says")
    if clashes:
        raise SweepError(sweep.source, clashes)
    return sweep, out, specs


def print_status(sweep: Sweep, out: Path, specs: list[RunSpec],
                 echo: Callable[[str], None]) -> None:
    echo(f"sweep {sweep.source} -> {out}: {len(specs)} runs")
    for line in status_lines(specs, [inspect_run(spec) for spec in specs]):
        echo(f"  {line}")


def print_table(specs: list[RunSpec], echo: Callable[[str], None]) -> None:
    from clbench.tables import TableRequest, build_tables, render

    folders = [spec.folder for spec in specs if (spec.folder / "config.json").is_file()]
    if folders:
        echo(render(build_tables(TableRequest(paths=folders, include_incomplete=True)), "markdown"))


def sweep_command(command: SweepCommand, echo: Callable[[str], None] = print) -> int:
    """``clbench sweep``: 0 when every run is done, 1 when some failed or were interrupted."""
    sweep, out, specs = plan(command)
    if command.status:
        print_status(sweep, out, specs, echo)
        return 0
    states = [inspect_run(spec) for spec in specs]
    runnable = [state.state in ("pending", "failed") for state in states]
    todo = [spec for spec, chosen in zip(specs, runnable) if chosen]
    resumes = sum(state.finished > 0 for state, chosen in zip(states, runnable) if chosen)
    skipped = sum(state.state == "done" for state in states)
    elsewhere = [spec for spec, state in zip(specs, states) if state.state == "running"]
    echo(f"sweep {sweep.source} -> {out}: {len(specs)} runs; {skipped} complete (skipped), "
         f"{len(elsewhere)} running elsewhere (skipped), {len(todo)} to run ({resumes} resume)")
    data_root = str(command.data_root) if command.data_root else os.environ.get("CLBENCH_DATA")
    jobs = [Job(folder=str(spec.folder), config=spec.config, label=spec.label, data_root=data_root)
            for spec in todo]
    progress = Progress(len(jobs), echo, command.progress_every)
    if command.backend == "ray":
        from clbench.sweep_ray import run_on_ray

        results = run_on_ray(jobs, todo, sweep.resources, sweep.max_retries, progress,
                             address=command.ray_address)
    elif jobs:
        workers = min(command.jobs, len(jobs))
        echo(f"local: {workers} job(s) at a time, {max(1, available_cores() // workers)} "
             f"torch thread(s) each")
        results = run_local(jobs, todo, workers, specs[0].config["device"], sweep.max_retries,
                            progress)
    else:
        results = []
    failed = [result for result in results if result.state != "done"]
    echo(f"sweep finished in {time.perf_counter() - progress.began:.0f}s: "
         f"{len(results) - len(failed)} ran, {skipped} were complete, {len(failed)} not done"
         + (f", {len(elsewhere)} running elsewhere" if elsewhere else ""))
    for result in failed:
        echo(f"  {result.state}: {result.label}: {result.error or ''} (log: "
             f"{Path(result.folder) / LOG_FILE})")
    print_table(specs, echo)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))

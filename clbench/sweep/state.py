"""The state of a sweep's run, read from its folder: done, running, failed or pending.

Around each run the sweep keeps three files of its own in the run folder:

.sweep.lock         an flock held by the run's process for its whole life: a second sweep,
                    a retried task or ``--status`` can tell a live run from a dead one
.sweep-worker.json  host, pids and attempt of the process running it
sweep.log           the run's standard output and error, one block per attempt
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.results import RunFolder
from clbench.sweep.plan import RunSpec

STATES = ("done", "running", "failed", "pending")
LOCK_FILE = ".sweep.lock"
WORKER_FILE = ".sweep-worker.json"
LOG_FILE = "sweep.log"


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
    """The run's .sweep-worker.json; {} when there is none (or half of one)."""
    try:
        return json.loads((Path(folder) / WORKER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def inspect_run(spec: RunSpec) -> RunState:
    """What the folder and the lock say about one grid point."""
    folder = RunFolder(spec.folder)
    if not folder.exists():
        if is_locked(spec.folder):
            return RunState("running", "starting")
        return RunState("pending", "not started")
    status = folder.status()
    records = folder.records()
    finished = len(records)
    total = len(records[0].accuracy) if records else None
    state = status.get("state")
    if state == "complete":
        faa = folder.metrics().get("faa")
        detail = f"FAA {faa:.2f}" if faa is not None else "complete"
        return RunState("done", detail, finished, total, faa=faa)
    progress = (
        f"{finished}/{total} experiences"
        if total is not None
        else f"{finished} experiences finished"
    )
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
    """``clbench sweep --status``: one line per run, then the counts."""
    width = max(len(spec.label) for spec in specs)
    lines = [
        f"{state.state:<8} {spec.label:<{width}}  {state.detail}"
        for spec, state in zip(specs, states)
    ]
    counts = {name: sum(state.state == name for state in states) for name in STATES}
    lines.append(", ".join(f"{counts[name]} {name}" for name in STATES) + f" (of {len(specs)})")
    return lines

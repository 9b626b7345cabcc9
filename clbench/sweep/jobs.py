"""One grid point run (or resumed) in a child process of its own, under the run's lock.

Every run is a separate process (``python -m clbench.sweep.child FOLDER``: the run loop's
resume on a folder whose config.json the sweep wrote), so a crash, an out-of-memory kill
or a segfault of one run never takes the sweep down. The same :func:`run_job` serves a
thread of the local pool and a Ray task.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from clbench.fileio import atomic_write_json
from clbench.results import RunFolder
from clbench.sweep.state import LOCK_FILE, LOG_FILE, WORKER_FILE, worker_info

PARENT_ENV = "CLBENCH_SWEEP_PARENT"
CHILD_MODULE = "clbench.sweep.child"

ProcessHook = Callable[[subprocess.Popen], None]

log = logging.getLogger(__name__)


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


class RunLock:
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


# -- the child process ---------------------------------------------------------------------


def child_environment(job: Job) -> dict[str, str]:
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


def die_with_parent() -> None:
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


def _run_child(
    job: Job,
    lock: RunLock,
    attempt: int,
    on_start: ProcessHook | None,
    on_end: ProcessHook | None,
) -> tuple[int, int]:
    """One attempt: the child's exit code, and where its block of sweep.log starts."""
    path = Path(job.folder)
    assert lock.handle is not None, "the run's lock is taken before its process starts"
    with open(path / LOG_FILE, "ab") as log_file:
        log_file.write(
            f"=== clbench sweep: attempt {attempt} on {socket.gethostname()} pid "
            f"{os.getpid()}, {datetime.now().isoformat(timespec='seconds')}, "
            f"{job.threads} thread(s) ===\n".encode()
        )
        log_file.flush()
        log_start = log_file.tell()
        # The child inherits the locked file: the lock lives as long as the run does, even
        # when this process is killed, so a retry never runs beside its predecessor.
        command = [sys.executable, "-m", CHILD_MODULE, str(path)]
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_environment(job),
            pass_fds=(lock.handle,),
        )
    atomic_write_json(
        path / WORKER_FILE,
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "child_pid": process.pid,
            "attempt": attempt,
            "started": datetime.now().isoformat(timespec="seconds"),
        },
        indent=2,
    )
    log.debug(f"{job.label}: attempt {attempt}, pid {process.pid}: {' '.join(command)}")
    if on_start is not None:
        on_start(process)
    try:
        returncode = process.wait()
    finally:
        if on_end is not None:
            on_end(process)
    return returncode, log_start


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


def _signal_name(returncode: int) -> str | int:
    number = -returncode
    return signal.Signals(number).name if number in signal.valid_signals() else number


# -- attempts --------------------------------------------------------------------------------


@dataclass
class _Attempts:
    """The tries of one job under its lock, and what each child's exit means."""

    job: Job
    lock: RunLock
    attempts: int
    raise_if_killed: bool
    on_start: ProcessHook | None
    on_end: ProcessHook | None
    stop: threading.Event | None
    began: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.folder = RunFolder(self.job.folder)

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def result(
        self, state: str, returncode: int | None, attempts: int, error: str | None = None
    ) -> JobResult:
        faa = self.folder.metrics().get("faa") if state == "done" else None
        seconds = time.perf_counter() - self.began
        return JobResult(
            self.job.label, self.job.folder, state, seconds, returncode, error, faa, attempts
        )

    def run(self) -> JobResult:
        if not self.folder.exists():
            self.folder.write_config(self.job.config)
        previous = int(worker_info(self.folder.path).get("attempt", 0))
        for tries in range(1, self.attempts + 1):
            if self.folder.status().get("state") == "complete":
                return self.result("done", 0, tries - 1)
            if self.stopped():
                return self.result("interrupted", None, tries - 1)
            returncode, log_start = _run_child(
                self.job, self.lock, previous + tries, self.on_start, self.on_end
            )
            outcome = self.judge(returncode, log_start, tries)
            if outcome is not None:
                return outcome
        raise AssertionError("unreachable: the last attempt always has an outcome")

    def judge(self, returncode: int, log_start: int, tries: int) -> JobResult | None:
        """The job's result after this attempt; None to try again."""
        state = self.folder.status().get("state")
        if returncode == 0 and state == "complete":
            return self.result("done", returncode, tries)
        if returncode < 0:
            return self.killed(returncode, tries)
        if state == "interrupted":
            return self.result("interrupted", returncode, tries)
        return self.failed(state, returncode, log_start, tries)

    def killed(self, returncode: int, tries: int) -> JobResult | None:
        """A child ended by a signal: our own SIGTERM when the sweep stops, else a kill
        from outside (retried while attempts are left; on Ray, Ray retries)."""
        finished = len(self.folder.records())
        if self.stopped():
            self.folder.set_status("interrupted", finished_experiences=finished)
            return self.result("interrupted", returncode, tries)
        error = f"the run's process was killed by {_signal_name(returncode)} (out of memory?)"
        retry = tries < self.attempts
        state = "interrupted" if retry or self.raise_if_killed else "failed"
        self.folder.set_status(state, finished_experiences=finished, error=error)
        if self.raise_if_killed:
            raise RunKilled(f"{self.job.label}: {error}")
        return None if retry else self.result("killed", returncode, tries, error)

    def failed(self, state: str | None, returncode: int, log_start: int, tries: int) -> JobResult:
        """An error in the run: not retried, the same error would come back."""
        error = self.folder.status().get("error") if state == "failed" else None
        error = error or _tail(self.folder.path / LOG_FILE, log_start) or f"exit code {returncode}"
        if state != "failed":  # died before the runner could say why (import error, ...)
            self.folder.set_status(
                "failed", finished_experiences=len(self.folder.records()), error=error
            )
        return self.result("failed", returncode, tries, error)


def run_job(
    job: Job,
    *,
    attempts: int = 1,
    raise_if_killed: bool = False,
    on_start: ProcessHook | None = None,
    on_end: ProcessHook | None = None,
    stop: threading.Event | None = None,
) -> JobResult:
    """Run (or resume) one grid point in a child process; up to ``attempts`` tries when the
    child is killed by a signal. A run that fails with an error is not retried: the same
    error would come back. ``stop`` set (the sweep was interrupted) ends it as interrupted."""
    path = Path(job.folder)
    path.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    lock = RunLock(path)
    if not lock.acquire(job.lock_wait):
        where = worker_info(path)
        return JobResult(
            job.label,
            job.folder,
            "busy",
            error="another process is running it "
            f"({where.get('host')} pid {where.get('child_pid')})",
        )
    try:
        tries = _Attempts(job, lock, attempts, raise_if_killed, on_start, on_end, stop, began)
        return tries.run()
    finally:
        lock.release()

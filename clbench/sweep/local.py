"""The local backend: one run after another, or ``--jobs N`` at a time, each in its own
process with ``cores // N`` torch threads and, on CUDA, a GPU of its own (round robin when
there are more jobs than GPUs)."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import subprocess
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from clbench.sweep.jobs import Job, JobResult, run_job
from clbench.sweep.plan import RunSpec
from clbench.sweep.progress import Progress

log = logging.getLogger(__name__)

# A run another process holds is skipped after this long: one sweep never waits for itself.
LOCAL_LOCK_WAIT_S = 5.0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(workers: int) -> int:
    return max(1, available_cores() // workers)


def local_gpus(device: str) -> list[str]:
    """GPU ids to hand out one per job slot; empty when runs are on the CPU or pinned."""
    if device != "cuda":
        return []  # cpu, or an explicit cuda:K the user chose for every run
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [item.strip() for item in visible.split(",") if item.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


class _LocalPool:
    """``workers`` job slots; the processes in flight, so that Ctrl-C can stop them."""

    def __init__(self, workers: int, device: str, retries: int, progress: Progress) -> None:
        self.workers, self.retries, self.progress = workers, retries, progress
        self.threads = threads_per_job(workers)
        self.gpus = local_gpus(device)
        if self.gpus and workers > len(self.gpus):
            log.info(f"note: {workers} jobs share {len(self.gpus)} GPU(s), round robin")
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(workers):
            self.slots.put(slot)
        self.active: set[subprocess.Popen] = set()
        self.stop = threading.Event()

    def _started(self, process: subprocess.Popen) -> None:
        self.active.add(process)
        if self.stop.is_set():  # started in the instant the sweep was interrupted
            process.terminate()

    def _run_one(self, job: Job) -> JobResult:
        slot = self.slots.get()
        try:
            gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
            job = dataclasses.replace(
                job, threads=self.threads, cuda_visible_devices=gpu, lock_wait=LOCAL_LOCK_WAIT_S
            )
            self.progress.started(job.label)
            return run_job(
                job,
                attempts=self.retries + 1,
                on_start=self._started,
                on_end=self.active.discard,
                stop=self.stop,
            )
        finally:
            self.slots.put(slot)

    def _interrupt(self, pool: ThreadPoolExecutor) -> None:
        """Stop the queue, then the runs in flight: SIGTERM makes each record itself as
        interrupted, so the next ``clbench sweep`` resumes it."""
        self.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list(self.active):
            process.terminate()

    def run(self, jobs: list[Job], specs: list[RunSpec]) -> list[JobResult]:
        by_label = {spec.label: spec for spec in specs}
        results: list[JobResult] = []
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clbench-sweep")
        futures: dict[Future[JobResult], Job] = {
            pool.submit(self._run_one, job): job for job in jobs
        }
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(
                    pending, timeout=self.progress.every, return_when=FIRST_COMPLETED
                )
                for future in finished:
                    results.append(future.result())
                    self.progress.done(results[-1])
                if not finished:
                    self.progress.heartbeat([by_label[futures[f].label] for f in pending])
        except KeyboardInterrupt:
            self._interrupt(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results


def run_local(
    jobs: list[Job],
    specs: list[RunSpec],
    workers: int,
    device: str,
    retries: int,
    progress: Progress,
) -> list[JobResult]:
    """``workers`` runs at a time, each in its own process with cores // workers threads."""
    return _LocalPool(workers, device, retries, progress).run(jobs, specs)

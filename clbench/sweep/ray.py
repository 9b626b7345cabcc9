"""The sweep on a Ray cluster: every run is one Ray task, Ray does the scheduling.

Why Ray: it is the engine the issue expects, runs the same on a laptop and on a cluster
(``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others, or
Ray's own launchers for Slurm and the clouds), reserves CPUs and GPUs per task, and
retries a task whose worker died. Dask or Slurm job arrays would also do; Ray's resource
reservation and retry-on-worker-death are exactly what a run needs, with nothing to write.

Each task calls :func:`clbench.sweep.jobs.run_job`, the same function the local pool uses:
it takes the run's lock, resumes the run folder in a child process and waits. What that
relies on:

- shared storage: ``--out`` must be a path every node sees (NFS, a parallel file system);
  the run folder is the only state, so any node can resume any run.
- a dead worker: Ray retries the task (``max_retries``). The child had asked the kernel for
  SIGTERM when its parent dies, so the runner records the run as interrupted and exits;
  the retried task waits for the run's lock to be free, then resumes after the last
  finished experience. A child killed by a signal (the OOM killer) raises
  :class:`~clbench.sweep.jobs.RunKilled`, which Ray retries the same way.
- an error in the run (bad data, a bug) is not retried: the same error would come back.
  The task returns it and ``clbench sweep --status`` shows it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from clbench.errors import UsageError
from clbench.sweep.grid import Resources
from clbench.sweep.jobs import Job, JobResult, RunKilled, run_job
from clbench.sweep.plan import RunSpec
from clbench.sweep.progress import Progress

log = logging.getLogger(__name__)


def _run_on_worker(job: Job) -> JobResult:
    # One attempt per task: Ray owns the retries, so a retry may land on another node.
    return run_job(job, attempts=1, raise_if_killed=True)


def _check_cluster(ray: Any, resources: Resources) -> None:
    cluster = ray.cluster_resources()
    log.info(
        f"ray: cluster with {cluster.get('CPU', 0):g} CPU(s), "
        f"{cluster.get('GPU', 0):g} GPU(s); each run reserves "
        f"{resources.cpus:g} CPU(s), {resources.gpus:g} GPU(s)"
    )
    if resources.gpus > cluster.get("GPU", 0) or resources.cpus > cluster.get("CPU", 0):
        raise UsageError(
            "no node of this Ray cluster can hold one run's resources "
            "(--cpus-per-run / --gpus-per-run): the sweep would wait forever"
        )


def _submit(
    ray: Any, jobs: list[Job], resources: Resources, max_retries: int, progress: Progress
) -> dict[Any, Job]:
    """One task per job, each reserving the run's resources; object reference -> job."""
    task = ray.remote(_run_on_worker)
    reservation = {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "max_retries": max_retries,
        "retry_exceptions": [RunKilled],
    }
    threads = max(1, int(resources.cpus))
    submitted = {}
    for job in jobs:
        job = dataclasses.replace(job, threads=threads)
        reference = task.options(**reservation, name=f"clbench {job.label}").remote(job)
        submitted[reference] = job
        progress.started(f"{job.label} (queued)")
    return submitted


def _gather(
    ray: Any, submitted: dict[Any, Job], specs: list[RunSpec], progress: Progress
) -> list[JobResult]:
    by_label = {spec.label: spec for spec in specs}
    results: list[JobResult] = []
    pending = list(submitted)
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1, timeout=progress.every)
            for reference in finished:
                results.append(_collect(ray, reference, submitted[reference]))
                progress.done(results[-1])
            if not finished:
                progress.heartbeat([by_label[submitted[r].label] for r in pending])
    except KeyboardInterrupt:
        # force-cancel kills the workers; their runs get SIGTERM and record themselves
        # as interrupted, so the next sweep resumes them
        for reference in pending:
            ray.cancel(reference, force=True)
        raise
    return results


def run_on_ray(
    jobs: list[Job],
    specs: list[RunSpec],
    resources: Resources,
    max_retries: int,
    progress: Progress,
    *,
    address: str | None = None,
    init_options: dict[str, Any] | None = None,
) -> list[JobResult]:
    """Submit every job as a Ray task and report as they finish.

    ``address``: a running cluster (``HOST:PORT`` or ``auto``); None follows Ray's own rule
    ($RAY_ADDRESS, else a cluster started on this machine with ``ray start``, else a new
    local one for the length of the sweep).
    """
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray: pip install 'clbench[ray]'") from None
    if not jobs:
        return []
    ray.init(address=address, log_to_driver=False, **(init_options or {}))
    try:
        _check_cluster(ray, resources)
        submitted = _submit(ray, jobs, resources, max_retries, progress)
        return _gather(ray, submitted, specs, progress)
    finally:
        ray.shutdown()


def _collect(ray: Any, reference: Any, job: Job) -> JobResult:
    try:
        return ray.get(reference)
    except Exception as error:  # noqa: BLE001 - a lost task is one failed run, not the sweep
        # the task's retries are spent (worker deaths, kills) or Ray lost the task
        cause = getattr(error, "cause", None) or error
        text = str(cause).strip()
        message = text.splitlines()[-1] if text else type(cause).__name__
        return JobResult(job.label, job.folder, "failed", error=f"ray: {message}")

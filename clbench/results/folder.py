"""RunFolder: the only reader and writer of a run folder's JSON and CSV files.

Every file is written through :mod:`clbench.fileio` (temporary name, then rename), so a
killed process leaves either the old or the new version, never half of one. Nothing here
imports torch: the tables, ``clbench tree`` and the sweep status read run folders through
this module as fast as Python starts (the checkpoint lives in
:mod:`clbench.results.checkpoint`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clbench import metrics
from clbench.fileio import atomic_write_json, atomic_write_text

CONFIG = "config.json"
ENVIRONMENT = "environment.json"
PROGRESS = "progress.json"
METRICS = "metrics.json"
ACCURACY_MATRIX = "accuracy_matrix.csv"
STATUS = "status.json"
# A "running" status names the process that wrote it; read back on that host after the
# process is gone (kill -9, a killed sweep, a lost shell) it reads as DEAD_STATE.
RUNNING_STATE = "running"
DEAD_STATE = "dead"

# The family a run made before config.json recorded one is taken to belong to.
LEGACY_FAMILY = "vision"
# Which test experiences the run loop evaluates after each experience: "seen" (0..t, the
# default) or "all" (also the unseen ones, for forward-transfer studies). Runs made before
# config.json recorded it evaluated all of them.
EVALUATE_CHOICES = ("seen", "all")
LEGACY_EVALUATE = "all"


@dataclass
class ExperienceRecord:
    """One finished experience, as progress.json lists it."""

    experience: int
    # per test experience; None (null) where it was not evaluated (unseen ones under
    # evaluate="seen"), 0 % for unseen ones under "all" and in runs made before
    accuracy: list[float | None]  # %
    correct: list[int | None]
    counts: list[int | None]
    train_seconds: float
    eval_seconds: float
    peak_memory_mb: float
    extra: dict[str, Any]
    # what writing this experience's checkpoint cost (checkpoint.pt + its query-cache
    # part); None in runs made before, and in a record restored from the checkpoint
    checkpoint_bytes: int | None = None
    checkpoint_seconds: float | None = None
    # one {"epoch", "loss", "train_accuracy" (%), "seconds"} per training epoch, as the
    # epoch lines say them; [] in runs made before
    epochs: list[dict[str, float]] = field(default_factory=list)
    # parameters the experience's main optimiser trained (each tensor once; the strategies'
    # own sample-trained stages such as a task-identity head are not counted); None in
    # runs made before
    trained_parameters: int | None = None


@dataclass(frozen=True)
class ScenarioFacts:
    """What config.json says about a run's scenario, for tables that name no scenario.

    family: "vision" | "relation-extraction".
    protocol: the paper protocol whose published numbers the run is compared with.
    metrics: the metrics the scenario's papers report (e.g. "seen" for relation extraction).
    """

    family: str
    protocol: str
    metrics: tuple[str, ...]


def scenario_facts(config: dict[str, Any]) -> ScenarioFacts:
    """The run loop writes ``scenario_family``, ``scenario_protocol`` and ``metrics`` from
    the scenario's spec; a run made before it did is a vision run compared under its own
    scenario name."""
    family = str(config.get("scenario_family") or LEGACY_FAMILY)
    protocol = str(config.get("scenario_protocol") or config["scenario"])
    reported = config.get("metrics")
    if reported is None:
        reported = metrics.FAMILY_METRICS.get(family, metrics.FAMILY_METRICS[LEGACY_FAMILY])
    return ScenarioFacts(family, protocol, tuple(str(m) for m in reported))


def evaluation_mode(config: dict[str, Any]) -> str:
    """``config.json``'s "evaluate": "seen" or "all" (runs made before the key existed)."""
    return str(config.get("evaluate", LEGACY_EVALUATE))


# after the backbone of a run on randomly initialised weights (config.json's
# "backbone_random_weights", from the backbone's registration), in show and in tables
RANDOM_WEIGHTS_MARK = " (random weights)"
RANDOM_WEIGHTS_NOTE = (
    "(random weights): runs on a randomly initialised backbone, smoke tests whose "
    "numbers are at chance level, not results of the method."
)


def backbone_label(config: dict[str, Any]) -> str:
    """The backbone's name, marked when the run had no pretrained weights."""
    return str(config["backbone"]) + (
        RANDOM_WEIGHTS_MARK if config.get("backbone_random_weights") else ""
    )


# A strategy whose name changed meaning: a run folder of ``old`` written before the option
# existed ran what ``new`` runs now. ``joint`` was a linear probe until it took
# ``trainable`` (strategies/joint.py): such folders read, show and resume as joint-linear.
RENAMED_STRATEGIES: tuple[tuple[str, str, str], ...] = (("joint", "trainable", "joint-linear"),)


def renamed_strategy(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the strategy's current name (see :data:`RENAMED_STRATEGIES`)."""
    for old, option, new in RENAMED_STRATEGIES:
        if config.get("strategy") == old and option not in (config.get("strategy_options") or {}):
            return {**config, "strategy": new}
    return config


def strategy_label(strategy: str) -> str:
    """A strategy given as ``module:Class`` or ``file.py:Class`` goes by its class name."""
    return strategy.rpartition(":")[2] or strategy


class RunFolder:
    """Reads and writes one run's folder."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # -- writing ----------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / CONFIG, config, indent=2)

    def write_environment(self, device: str) -> None:
        from clbench.results.environment import environment  # imports torch: runs only

        atomic_write_json(self.path / ENVIRONMENT, environment(device), indent=2)

    def set_status(self, state: str, **details: Any) -> None:
        if state == RUNNING_STATE:
            details = {"pid": os.getpid(), "host": socket.gethostname(), **details}
        atomic_write_json(self.path / STATUS, {"state": state, **details}, indent=2)

    def append_record(self, record: ExperienceRecord) -> None:
        """Add a finished experience; metrics.json and accuracy_matrix.csv follow."""
        records = self.records()
        if len(records) != record.experience:
            raise RuntimeError(
                f"experience {record.experience} recorded after {len(records)} finished ones"
            )
        self._write_records([*records, record])

    def _write_records(self, records: Sequence[ExperienceRecord]) -> None:
        # progress first: the derived files are always recomputable from it
        atomic_write_json(self.path / PROGRESS, [vars(r) for r in records], indent=2)
        accuracy = _matrix([r.accuracy for r in records])
        summary = metrics.summarise(
            accuracy, _matrix([r.correct for r in records]), _matrix([r.counts for r in records])
        )
        summary["train_seconds"] = float(sum(r.train_seconds for r in records))
        summary["eval_seconds"] = float(sum(r.eval_seconds for r in records))
        summary["peak_memory_mb"] = float(max(r.peak_memory_mb for r in records))
        atomic_write_json(self.path / METRICS, summary, indent=2)
        header = ",".join(f"exp{i}" for i in range(accuracy.shape[1]))
        lines = [f"after,{header}"] + [
            f"{r.experience}," + ",".join(_csv_cell(a) for a in r.accuracy) for r in records
        ]
        atomic_write_text(self.path / ACCURACY_MATRIX, "\n".join(lines) + "\n")

    # -- reading ----------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / CONFIG).is_file()

    def read_json(self, name: str) -> Any:
        """One file of the folder, parsed: FileNotFoundError when it is not there,
        ValueError when it is not JSON (the readers below give defaults instead)."""
        with open(self.path / name, encoding="utf-8") as stream:
            return json.load(stream)

    def config(self) -> dict[str, Any]:
        return renamed_strategy(self.read_json(CONFIG))

    def environment(self) -> dict[str, Any]:
        return self.read_json(ENVIRONMENT)

    def status(self) -> dict[str, Any]:
        """``{"state": "unknown"}`` before the run loop wrote one; ``dead`` for a run left
        "running" by a process of this host that no longer exists."""
        try:
            status = self.read_json(STATUS)
        except FileNotFoundError:
            return {"state": "unknown"}
        if status.get("state") == RUNNING_STATE and _writer_is_gone(status):
            status = {
                **status,
                "state": DEAD_STATE,
                "error": f"process {status['pid']} on {status['host']} ended without a word "
                f"(killed?); resume with: clbench run --resume {self.path}",
            }
        return status

    def records(self) -> list[ExperienceRecord]:
        """The finished experiences, in order; [] before the first one finishes."""
        try:
            entries = self.read_json(PROGRESS)
        except FileNotFoundError:
            return []
        return [ExperienceRecord(**entry) for entry in entries]

    def metrics(self) -> dict[str, Any]:
        """metrics.json; {} before the first experience finishes."""
        try:
            return self.read_json(METRICS)
        except FileNotFoundError:
            return {}

    def accuracy_matrix(self) -> np.ndarray:
        """A[t, i] in %, NaN where test experience i was not evaluated after t."""
        return _matrix([r.accuracy for r in self.records()])


def _writer_is_gone(status: dict[str, Any]) -> bool:
    """True when the status names a process of this host that does not exist (a run on
    another host, or one recorded before statuses named their process, is taken as alive)."""
    pid, host = status.get("pid"), status.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def _matrix(rows: Sequence[Sequence[float | int | None]]) -> np.ndarray:
    """Rows of progress.json as floats; None (not evaluated) becomes NaN."""
    return np.array(rows, dtype=float)


def _csv_cell(accuracy: float | None) -> str:
    # an empty cell, not 0: a test experience not evaluated has no accuracy
    return "" if accuracy is None else f"{accuracy:.4f}"


def write_run_folder(
    path: Path | str,
    config: dict[str, Any],
    accuracy: Sequence[Sequence[float]] | np.ndarray,
    counts: Sequence[int],
    *,
    state: str = "complete",
    seconds_per_task: float = 1.0,
    family: str | None = None,
    protocol: str | None = None,
) -> Path:
    """A run folder from an accuracy matrix (rows = finished experiences, in %) and the
    test items per experience, written as the run loop writes one (same methods, so the
    files cannot drift apart) but without torch.

    For tests, benchmarks and for bringing results computed elsewhere into clbench's
    tables. Correct counts are rounded from the accuracies, and accuracies recomputed
    from them, so every file agrees with every other; an entry given as None (or NaN)
    was not evaluated and is written as such (null accuracy, correct and count). ``family`` (and ``protocol``,
    default the scenario's name) add the keys the run loop writes from the scenario's
    spec; without them the folder reads as a run made before those keys existed.
    """
    folder = RunFolder(path)
    if family is not None:
        config = {
            **config,
            "scenario_family": family,
            "scenario_protocol": protocol or str(config["scenario"]),
            "metrics": list(metrics.FAMILY_METRICS[family]),
        }
    counts_array = np.asarray(counts, dtype=int)
    rows = np.asarray(accuracy, dtype=float).reshape(-1, len(counts_array))  # None -> NaN
    evaluated = ~np.isnan(rows)
    correct = np.rint(np.where(evaluated, rows, 0.0) / 100.0 * counts_array).astype(int)
    matrix = 100.0 * correct / counts_array

    def entry(value: Any, t: int, i: int) -> Any:
        return value if evaluated[t, i] else None

    records = [
        ExperienceRecord(
            experience=t,
            accuracy=[entry(float(a), t, i) for i, a in enumerate(matrix[t])],
            correct=[entry(int(c), t, i) for i, c in enumerate(correct[t])],
            counts=[entry(int(n), t, i) for i, n in enumerate(counts_array)],
            train_seconds=seconds_per_task,
            eval_seconds=seconds_per_task / 10,
            peak_memory_mb=100.0,
            extra={},
        )
        for t in range(matrix.shape[0])
    ]
    folder.write_config(config)
    if records:
        folder._write_records(records)
    folder.set_status(state, finished_experiences=len(records))
    return folder.path

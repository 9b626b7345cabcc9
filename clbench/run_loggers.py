"""``clbench run --logger tensorboard|wandb|csv|text``: Avalanche's own loggers for a run.

Under ``clbench run`` a strategy's Avalanche evaluator has no metrics and no loggers
(:func:`clbench.training.quiet_evaluator`): the run loop measures what it reports. A run
that names loggers instead gets an evaluator with clbench's metrics and Avalanche's
``TensorboardLogger``, ``WandBLogger``, ``CSVLogger`` and ``TextLogger``, writing beside
the run's files::

    RUN_DIR/logs/tensorboard/  event files (tensorboard --logdir RUN_DIR/logs)
    RUN_DIR/logs/csv/          training_results.csv, eval_results.csv (Avalanche's
                               format) and clbench_metrics.csv (FAA, CAA, FFM, seen acc)
    RUN_DIR/logs/text/log.txt  Avalanche's text log
    RUN_DIR/logs/wandb/        the W&B run (offline without an API key), its id in run-id

They receive the training loss and accuracy of every epoch, the accuracy on each test
experience after each experience, and the papers' FAA / CAA / FFM so far (the same
numbers as metrics.json); :mod:`clbench.avalanche_loggers` says under which names.

The choice is part of config.json (key ``loggers``, present only when loggers were asked
for, so the configuration and a sweep's run identity are otherwise as before), and
``--resume`` opens the same loggers on the same folders. This module imports neither torch
nor Avalanche: names are checked before anything is built or written.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clbench.errors import UsageError
from clbench.fileio import atomic_write_text
from clbench.results import RunFolder

log = logging.getLogger(__name__)

LOGGER_KINDS = ("tensorboard", "wandb", "csv", "text")
LOGS_FOLDER = "logs"
WANDB_ID_FILE = "run-id"
CLBENCH_CSV = "clbench_metrics.csv"
TEXT_LOG = "log.txt"


def parse_logger_kinds(values: Iterable[str]) -> list[str]:
    """``--logger`` values (repeated, or comma lists) as logger kinds, in the order given,
    each once. UsageError for an unknown name, or for wandb when it is not installed."""
    kinds: list[str] = []
    valid = ", ".join(LOGGER_KINDS)
    for value in values:
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        if not names:
            raise UsageError(f"--logger {value!r}: give a logger name; valid choices: {valid}")
        for name in names:
            if name not in LOGGER_KINDS:
                raise UsageError(f"unknown logger {name!r}; valid choices: {valid}")
            if name not in kinds:
                kinds.append(name)
    if "wandb" in kinds:
        require_wandb()
    return kinds


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError(
            '--logger wandb needs the wandb package: pip install -e ".[wandb]"'
        ) from None


def run_evaluator(config: dict[str, Any]) -> Any:
    """The Avalanche evaluator a run's strategy is built with: clbench's metrics when
    config.json names loggers (they are attached by :meth:`RunLoggers.open`), else none."""
    if not config.get("loggers"):
        from clbench.training import quiet_evaluator

        return quiet_evaluator
    from clbench.avalanche_loggers import logging_evaluator

    return logging_evaluator()


class RunLoggers:
    """The loggers of one run: opened when the run loop knows where it starts, fed after
    each finished experience, closed when the run ends in any way. A run without loggers
    gets one too, which does nothing."""

    def __init__(self, folder: RunFolder, config: dict[str, Any], strategy: Any) -> None:
        self.folder = folder
        self.config = config
        self.strategy = strategy
        self.kinds: list[str] = list(config.get("loggers") or [])
        self.loggers: dict[str, Any] = {}

    @property
    def root(self) -> Path:
        return self.folder.path / LOGS_FOLDER

    def open(self, finished: int, resumed: bool) -> None:
        """Open each logger in ``RUN_DIR/logs/<kind>`` and attach it to the strategy's
        evaluator. ``finished``: experiences already done (a resumed run's start)."""
        if not self.kinds:
            return
        from clbench import avalanche_loggers as avalanche

        opened: dict[str, Any] = {}
        for kind in self.kinds:
            where = self.root / kind
            if kind == "tensorboard":
                purge = avalanche.epochs_done(self.strategy, finished) + 1 if resumed else None
                opened[kind] = avalanche.ResumingTensorboardLogger(where, purge)
            elif kind == "csv":
                opened[kind] = avalanche.open_csv_logger(where, finished)
            elif kind == "text":
                opened[kind] = avalanche.open_text_logger(where / TEXT_LOG, finished)
            elif kind == "wandb":
                opened[kind] = avalanche.open_wandb_logger(
                    where, self._wandb_run_id(where), self.folder.path.name, self.config, resumed
                )
                opened[kind].exp_count = finished  # its "TrainingExperience" counter
        self.loggers = opened
        self.strategy.evaluator.loggers = list(opened.values())
        log.info(f"logging ({', '.join(self.kinds)}) into {self.root}")

    def _wandb_run_id(self, where: Path) -> str:
        """The W&B run id of this run folder: made once, then read back on resume."""
        path = where / WANDB_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        # W&B's own ids: 8 lowercase letters and digits (its helper moved between releases)
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        atomic_write_text(path, run_id + "\n")
        return run_id

    def after_experience(self) -> None:
        """Log the papers' numbers after the experience the run folder recorded last."""
        if not self.loggers:
            return
        from clbench import avalanche_loggers as avalanche

        records = self.folder.records()
        record = records[-1]
        x = avalanche.epochs_done(self.strategy, record.experience + 1)
        values = avalanche.clbench_metric_values(self, record.accuracy, self.folder.metrics(), x)
        for kind, logger in self.loggers.items():
            if kind == "csv":  # Avalanche's CSV files have no column for these
                atomic_write_text(self.root / kind / CLBENCH_CSV, clbench_csv(records))
                continue
            logger.log_metrics(values)
            if kind == "text":  # the text logger prints what it holds at its own events
                print(
                    f"-- clbench metrics after experience {record.experience} "
                    "(accuracy in %; FAA, CAA, FFM as the papers define them) --",
                    file=logger.file,
                )
                logger.print_current_metrics()
                logger.metric_vals = {}
                logger.file.flush()
            elif kind == "tensorboard":
                logger.writer.flush()

    def close(self) -> None:
        """Flush and close every logger (W&B marks a run that did not complete as failed)."""
        loggers, self.loggers = self.loggers, {}
        if not loggers:
            return
        self.strategy.evaluator.loggers = []
        complete = self.folder.status().get("state") == "complete"
        for kind, logger in loggers.items():
            try:
                if kind == "wandb":
                    logger.wandb.finish(exit_code=0 if complete else 1)
                elif kind == "text":
                    logger.file.close()
                else:
                    logger.close()
            except Exception as error:  # a logger must never hide the run's own outcome
                log.warning(f"closing the {kind} logger failed: {error}")


def clbench_csv(records: list[Any]) -> str:
    """``after,faa,caa,ffm,seen_accuracy``: the metrics of the run stopped after each
    finished experience (the last row is metrics.json's)."""
    import numpy as np

    from clbench import metrics

    def matrix(rows: list[list[Any]]) -> Any:
        return np.array(rows, dtype=float)  # None (not evaluated) -> NaN

    accuracy = matrix([r.accuracy for r in records])
    correct = matrix([r.correct for r in records])
    counts = matrix([r.counts for r in records])
    seen = metrics.seen_accuracy(correct, counts)
    lines = ["after,faa,caa,ffm,seen_accuracy"]
    for t in range(len(records)):
        prefix = accuracy[: t + 1]
        lines.append(
            f"{records[t].experience},{metrics.final_average_accuracy(prefix):.4f},"
            f"{metrics.average_incremental_accuracy(prefix):.4f},"
            f"{metrics.final_forgetting(prefix):.4f},{seen[t]:.4f}"
        )
    return "\n".join(lines) + "\n"

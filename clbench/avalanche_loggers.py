"""The Avalanche side of ``clbench run --logger``: the metrics clbench feeds Avalanche's
own loggers with, and those loggers opened in a run folder so that a resumed run goes on
writing where the killed one stopped.

Imports Avalanche's logging (TensorBoard, W&B) at module level: only
:mod:`clbench.run_loggers` imports this module, and only when a run asks for a logger.

**Names and units.** The per-epoch and per-test-experience values carry Avalanche's own
metric names and units, so Avalanche's CSV and text loggers file them as they do for
``loss_metrics`` / ``accuracy_metrics``: ``Loss_Epoch/train_phase/train_stream/Task000``,
``Top1_Acc_Epoch/...`` (a fraction; the training accuracy as the loss sees it, over the
current task's classes when the strategy masks training logits, as the console's epoch
line), ``Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp003`` and ``Loss_Exp/...``.
The papers' numbers after each experience (the accuracy row A[t, i] and FAA / CAA / FFM,
in %, from :mod:`clbench.metrics`) go out under ``clbench/...`` (see
:func:`clbench_metric_values`). Avalanche's forgetting (from A[i, i]) is never computed:
the forgetting clbench logs is the papers' (from the best accuracy reached).

**The x axis** of every value is the number of training epochs done so far (1, 2, ...
during training; ``(t + 1) * epochs`` for what is measured after experience t). One
increasing axis for everything is what W&B needs (it drops a value logged at a step lower
than the last), and it depends only on the experience and epoch, never on Avalanche's
iteration clock, which starts again at 0 when a run resumes.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.logging import CSVLogger, TensorboardLogger, TextLogger, WandBLogger
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.tensorboard import SummaryWriter


def epochs_done(strategy: Any, finished_experiences: int, epochs_into_next: int = 0) -> int:
    """The x value after ``finished_experiences`` whole experiences and ``epochs_into_next``
    epochs of the next one (every experience trains ``strategy.train_epochs`` epochs)."""
    return finished_experiences * int(strategy.train_epochs) + epochs_into_next


class EpochTrainingMetrics(PluginMetric[float]):
    """Mean training loss and training accuracy of each epoch (``Loss_Epoch``,
    ``Top1_Acc_Epoch``), summed on the device and read once per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._loss: torch.Tensor | float = 0.0
        self._correct: torch.Tensor | float = 0.0
        self._seen = 0

    def result(self) -> float | None:
        return None if self._seen == 0 else float(self._loss) / self._seen

    def before_training_epoch(self, strategy: Any) -> None:
        self.reset()

    def after_training_iteration(self, strategy: Any) -> None:
        size = int(strategy.mb_y.shape[0])
        logits = strategy.mb_output
        if getattr(strategy.config, "mask_train_logits", False):
            logits = strategy.mask_to(logits, strategy.current_class_mask)
        self._loss = self._loss + strategy.loss.detach().sum() * size
        self._correct = self._correct + (logits.argmax(1) == strategy.mb_y).sum()
        self._seen += size

    def after_training_epoch(self, strategy: Any) -> list[MetricValue]:
        if self._seen == 0:
            return []
        x = epochs_done(strategy, strategy.current_task, strategy.clock.train_exp_epochs + 1)
        loss = float(self._loss) / self._seen
        accuracy = float(self._correct) / self._seen
        return [
            MetricValue(self, get_metric_name("Loss_Epoch", strategy), loss, x),
            MetricValue(self, get_metric_name("Top1_Acc_Epoch", strategy), accuracy, x),
        ]


class EvalExperienceMetrics(PluginMetric[float]):
    """Accuracy (a fraction, from the same correct / item counts as the run's accuracy
    matrix) and mean loss on each evaluated test experience (``Top1_Acc_Exp``,
    ``Loss_Exp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._loss: torch.Tensor | float = 0.0
        self._correct: torch.Tensor | int = 0
        self._count = 0

    def result(self) -> float | None:
        return None if self._count == 0 else int(self._correct) / self._count

    def before_eval_exp(self, strategy: Any) -> None:
        self.reset()

    def after_eval_iteration(self, strategy: Any) -> None:
        size = int(strategy.mb_y.shape[0])
        self._correct = self._correct + (strategy.mb_output.argmax(dim=1) == strategy.mb_y).sum()
        self._loss = self._loss + strategy.loss.detach().sum() * size
        self._count += size

    def after_eval_exp(self, strategy: Any) -> list[MetricValue]:
        if self._count == 0:
            return []
        x = epochs_done(strategy, strategy.current_task + 1)
        accuracy = int(self._correct) / self._count
        loss = float(self._loss) / self._count
        return [
            MetricValue(self, get_metric_name("Top1_Acc_Exp", strategy, True), accuracy, x),
            MetricValue(self, get_metric_name("Loss_Exp", strategy, True), loss, x),
        ]


def logging_evaluator() -> EvaluationPlugin:
    """An evaluator with clbench's metrics and no loggers yet: the loggers are attached
    (``evaluator.loggers``) once the run folder exists, so bad input still writes nothing."""
    import warnings

    with warnings.catch_warnings():  # "no loggers": they come later
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(EpochTrainingMetrics(), EvalExperienceMetrics(), loggers=[])


def clbench_metric_values(
    origin: Any, record_accuracy: list[float | None], summary: dict[str, Any], x: int
) -> list[MetricValue]:
    """The papers' numbers after one experience, in %: the accuracy row A[t, i] of the
    evaluated test experiences (``clbench/accuracy/exp<i>``, as accuracy_matrix.csv names
    its columns), FAA, CAA, FFM and the seen-class accuracy so far."""
    values = [
        MetricValue(origin, f"clbench/accuracy/exp{i}", float(a), x)
        for i, a in enumerate(record_accuracy)
        if a is not None
    ]
    for key, name in (("faa", "FAA"), ("caa", "CAA"), ("ffm", "FFM")):
        values.append(MetricValue(origin, f"clbench/{name}", float(summary[key]), x))
    values.append(
        MetricValue(origin, "clbench/seen_accuracy", float(summary["seen_accuracy"][-1]), x)
    )
    learned = int(summary["experiences_finished"])
    values.append(MetricValue(origin, "clbench/experiences", learned, x))
    return values


# -- loggers opened in a run folder ---------------------------------------------------------


class ResumingTensorboardLogger(TensorboardLogger):
    """Avalanche's TensorBoard logger whose writer purges, on resume, what the killed
    process logged for the experience it did not finish: TensorBoard hides every event at
    or after ``purge_step`` (a SessionLog START), so the curves read as one unbroken run."""

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        self._purge_step = purge_step
        super().__init__(tb_log_dir=log_dir)

    def _make_writer(self, tb_log_dir: Any, filename_suffix: str) -> SummaryWriter:
        writer = SummaryWriter(
            tb_log_dir, filename_suffix=filename_suffix, purge_step=self._purge_step
        )
        weakref.finalize(self, SummaryWriter.close, writer)  # as Avalanche's own does
        return writer

    def close(self) -> None:
        self.writer.close()


# CSVLogger's files, and the column holding the training experience in each
CSV_FILES = {"training_results.csv": 0, "eval_results.csv": 1}


def open_csv_logger(log_dir: Path, finished: int) -> CSVLogger:
    """Avalanche's CSV logger on ``log_dir``. It truncates its files when it opens them, so
    on resume the rows of the experiences already finished are read first and written
    back (the killed process's rows of the unfinished experience are dropped: the
    resumed run logs them again)."""
    kept: dict[str, list[str]] = {}
    for name, column in CSV_FILES.items():
        path = log_dir / name
        lines = path.read_text().splitlines()[1:] if finished and path.is_file() else []
        kept[name] = [line for line in lines if _row_experience(line, column) < finished]
    logger = CSVLogger(log_folder=str(log_dir))
    streams = {"training_results.csv": logger.training_file, "eval_results.csv": logger.eval_file}
    for name, stream in streams.items():
        for line in kept[name]:
            print(line, file=stream)
        stream.flush()
    return logger


def _row_experience(line: str, column: int) -> int:
    """The training experience of one CSV row; a large number for a row cut short."""
    cells = line.split(",")
    try:
        return int(cells[column]) if len(cells) >= 5 else 1 << 30
    except ValueError:
        return 1 << 30


def open_text_logger(path: Path, finished: int) -> TextLogger:
    """Avalanche's text logger appending to ``path`` (a resumed run goes on below)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", encoding="utf-8")  # closed by RunLoggers.close
    if finished:
        print(f"-- resumed after {finished} finished experiences --", file=stream, flush=True)
    return TextLogger(file=stream)


class ScalarWandBLogger(WandBLogger):
    """Avalanche's W&B logger, with numbers logged without its ``wandb.viz`` check:
    avalanche-lib 0.6.0 names ``wandb.viz.CustomChart`` for every value, which recent
    wandb releases (0.31 here) no longer have. Numbers (everything clbench logs) go to
    ``wandb.log`` as Avalanche's own method sends them; anything else to that method."""

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        if isinstance(value, (int, float)) and not name.startswith("WeightCheckpoint"):
            self.step = x_plot
            self.wandb.log({name: value}, step=self.step)
            return
        super().log_single_metric(name, value, x_plot)


def open_wandb_logger(
    log_dir: Path, run_id: str, run_name: str, config: dict[str, Any], resume: bool
) -> Any:
    """Avalanche's W&B logger writing under ``log_dir`` as W&B run ``run_id`` (kept in the
    run folder, so a resumed run continues the same W&B run). Offline (``WANDB_MODE``
    wins; else online only with an API key in $WANDB_API_KEY or ~/.netrc)."""
    mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")
    params: dict[str, Any] = {"id": run_id, "mode": mode}
    if resume and mode == "online":
        params["resume"] = "allow"
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = ScalarWandBLogger(
        project_name=os.environ.get("WANDB_PROJECT", "clbench"),
        run_name=run_name,
        save_code=False,
        config=config,
        dir=str(log_dir),
        params=params,
    )
    return logger


def has_wandb_key() -> bool:
    """An API key W&B would find without asking: $WANDB_API_KEY or a ~/.netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False

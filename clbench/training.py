"""The training settings every strategy has, and the parts of the training loop that are
not a method's business: loader workers and autocast precision resolved for the device,
the per-epoch learning-rate schedule, Avalanche's evaluator switched off, and the
per-epoch progress line. :mod:`clbench.strategy` re-exports what a method author needs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from clbench.config import Options, option
from clbench.errors import UsageError
from clbench.logs import TO_STDERR
from clbench.progress import Progress, progress

if TYPE_CHECKING:
    from clbench.strategy import CLStrategy

log = logging.getLogger(__name__)


@dataclass
class StrategyConfig(Options):
    """Training settings every strategy has."""

    epochs: int = option(5, "training epochs per experience")
    batch_size: int = option(32, "training mini-batch size")
    eval_batch_size: int = option(128, "evaluation mini-batch size")
    lr: float = option(1e-3, "learning rate of the trainable modules", symbol="eta")
    optimizer: Literal["adam", "sgd"] = option("adam", "optimizer of the trainable modules")
    weight_decay: float = option(0.0, "weight decay")
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)")
    lr_schedule: Literal["constant", "cosine", "step"] = option(
        "constant", "learning-rate schedule over each experience's epochs (stepped per epoch)"
    )
    lr_step_epoch: int = option(0, "with lr_schedule=step: multiply the lr by 0.1 after this epoch")
    num_workers: int = option(
        -1, "data-loader worker processes (-1: auto = min(8, CPU cores - 1) on a GPU, 0 on a CPU)"
    )
    cache_queries: bool = option(
        True, "compute each input's un-prompted query feature once and reuse it"
    )
    cache_train_queries: bool = option(
        False,
        "also cache training images' queries, so later epochs skip the query pass: "
        "exact, and worth it, only when the training stream is not augmented (a scenario's "
        "augment=false); text queries are always cached",
    )
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "forward passes in fp32 or under bf16 autocast (auto: bf16 on a GPU that has it)"
    )
    # a method whose head covers every class but trains on one task's classes at a time
    # overrides the default in its own Config (prompt methods do)
    mask_train_logits: bool = option(False, "cross-entropy over the current task's classes only")


def quiet_evaluator() -> EvaluationPlugin:
    """No Avalanche metrics or loggers: clbench's run loop measures what it reports."""
    import warnings

    with warnings.catch_warnings():  # "no loggers" is exactly what we ask for
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(loggers=[])


class EpochProgress(SupervisedPlugin):
    """One line per training epoch (logged to stderr): experience, epoch, mean loss,
    train accuracy, seconds. During the epoch a bar with the running loss and an ETA on
    a terminal, else a line every 30 s (a full-size epoch on a CPU takes minutes).

    ``epochs`` keeps the same numbers for the experience being trained (one
    ``{epoch, loss, train_accuracy, seconds}`` per epoch, reset when an experience
    starts): the run loop writes them into the experience's record in progress.json."""

    _bar: Progress | None = None

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[dict[str, float]] = []

    def before_training_exp(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        self.epochs = []

    def before_training_epoch(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        self._loss = torch.zeros((), device=strategy.device)
        self._correct = torch.zeros((), device=strategy.device)
        self._seen = 0
        if self._bar is not None:  # the previous epoch raised: its bar is stale
            self._bar.close()
        epoch = f"{strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs}"
        self._bar = progress(
            _length(strategy.dataloader),
            f"  experience {strategy.current_task} epoch {epoch}",
            unit="batches",
            start_line=False,
            end_line=False,
        )

    def after_training_iteration(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        # accumulated on the device: no host round trip per iteration
        size = strategy.mb_y.shape[0]
        self._loss += strategy.loss.detach().sum() * size
        logits = strategy.mb_output
        if strategy.config.mask_train_logits:  # accuracy as the loss sees it
            logits = strategy.mask_to(logits, strategy.current_class_mask)
        self._correct += (logits.argmax(1) == strategy.mb_y).sum()
        self._seen += size
        if self._bar is not None:  # the loss is read (a host sync) only when drawn
            self._bar.update(1, detail=self._running_loss)

    def _running_loss(self) -> str:
        return f"loss {self._loss.item() / max(self._seen, 1):.4f}"

    def after_training_epoch(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        seen = max(self._seen, 1)
        epoch = strategy.clock.train_exp_epochs + 1
        loss, accuracy = self._loss.item() / seen, 100 * self._correct.item() / seen
        seconds = time.perf_counter() - self._start
        self.epochs.append(
            {"epoch": epoch, "loss": loss, "train_accuracy": accuracy, "seconds": seconds}
        )
        log.info(
            f"  experience {strategy.current_task} epoch {epoch}/{strategy.train_epochs}: "
            f"loss {loss:.4f}, train acc {accuracy:.1f}%, {seconds:.1f}s",
            extra=TO_STDERR,
        )


class EvalProgress(SupervisedPlugin):
    """Says ``evaluating experiences 0-3 (640 test items) ...`` when an evaluation pass
    starts, then draws a bar with an ETA on a terminal or logs a line every 30 s: the
    first pass over a test set also computes every item's query, and a full-size one
    takes minutes on a CPU. The run loop's per-experience line gives the pass's time, so
    there is no end line."""

    _bar: Progress | None = None

    def before_eval(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        stream = strategy.current_eval_stream
        if isinstance(stream, Iterator):  # a generator: counting it would consume it
            self._bar = progress(None, "evaluating", unit="test items", end_line=False)
            return
        experiences = list(stream)
        if experiences:
            indices = [int(e.current_experience) for e in experiences]
            total = sum(len(e.dataset) for e in experiences)
            label = f"evaluating {_experience_range(indices)}"
            self._bar = progress(total, label, unit="test items", end_line=False)

    def after_eval_iteration(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(int(strategy.mb_y.shape[0]))

    def after_eval(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _experience_range(indices: list[int]) -> str:
    """``experience 2``, ``experiences 0-3`` (consecutive), ``experiences 0, 2, 5``."""
    if len(indices) == 1:
        return f"experience {indices[0]}"
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return f"experiences {indices[0]}-{indices[-1]}"
    return "experiences " + ", ".join(map(str, indices))


def _length(loader: Any) -> int | None:
    """Batches in ``loader``; None for one without a length (an iterable dataset)."""
    try:
        return len(loader)
    except TypeError:
        return None


def resolve_num_workers(num_workers: int, device: torch.device) -> int:
    """Loader workers for ``num_workers`` (-1 = auto) on ``device``.

    On a GPU the model outruns a single loading process (decoding, resizing, augmenting
    224-px images), so auto uses workers; on a CPU they would compete with the model
    for the same cores, so auto uses none.
    """
    if num_workers >= 0:
        return num_workers
    if num_workers != -1:
        raise UsageError(f"num_workers must be >= 0, or -1 for auto; got {num_workers}")
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None for plain fp32.

    bf16 keeps fp32's exponent range, so no loss scaling is needed, and autocast keeps
    softmax, layer norm and the losses in fp32. auto means bf16 only on a GPU that has
    fast bf16 (on a CPU it is usually slower than fp32 and changes results for nothing).
    """
    if precision == "fp32":
        return None
    has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if has_bf16 else None
    if precision == "bf16":
        if device.type == "cuda" and not has_bf16:
            raise UsageError("precision=bf16: this GPU has no bf16 support; use fp32")
        return torch.bfloat16
    raise UsageError(f"unknown precision {precision!r}; valid choices: auto, fp32, bf16")


def make_scheduler(optimizer: torch.optim.Optimizer, config: StrategyConfig) -> Any:
    """The per-epoch learning-rate schedule of ``config`` (None for a constant rate)."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    if config.lr_schedule == "step":
        if config.lr_step_epoch <= 0:
            raise UsageError("lr_schedule=step needs lr_step_epoch > 0")
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_epoch, gamma=0.1)
    return None

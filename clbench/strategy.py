"""The strategy base: an Avalanche ``SupervisedTemplate`` with the few hooks a method needs.

A method author writes one class::

    @STRATEGIES.register("my-method", "one line for `clbench list`")
    class MyMethod(CLStrategy):
        Config = MyConfig                      # typed hyper-parameters (paper symbols in help)
        presets = {"quick": {...}}             # named settings, e.g. per scenario

        def setup(self, model): ...            # add trainable modules to `model`
        def train_logits(self, x): ...         # logits while training (+ self.auxiliary_loss)
        def predict(self, x): ...              # logits over all classes at test time
        def training_loss(self, logits, y): ...    # optional; default CE + auxiliary loss
        def begin_task(self, task, classes): ...   # optional
        def end_task(self, task, classes): ...     # optional

and it works in a plain Avalanche script (``strategy.train(exp)``, ``strategy.eval(stream)``,
plugins, loggers) as well as under ``clbench run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from clbench.config import Options, option
from clbench.encoders.base import PromptableEncoder
from clbench.errors import UsageError
from clbench.query_cache import QueryCache


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
        False, "also cache training images' queries, so later epochs skip the query pass: "
        "exact, and worth it, only when the training stream is not augmented (a scenario's "
        "augment=false); text queries are always cached"
    )
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "forward passes in fp32 or under bf16 autocast (auto: bf16 on a GPU that has it)"
    )


class StrategyModel(nn.Module):
    """The shared frozen encoder plus the strategy's trainable modules."""

    def __init__(self, encoder: PromptableEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:  # Avalanche never calls it: the strategy does
        raise RuntimeError("call the strategy's train_logits / predict instead")


def quiet_evaluator() -> EvaluationPlugin:
    """No Avalanche metrics or loggers: clbench's run loop measures what it reports."""
    import warnings

    with warnings.catch_warnings():  # "no loggers" is exactly what we ask for
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(loggers=[])


class EpochProgress(SupervisedPlugin):
    """One line per training epoch: experience, epoch, mean loss, train accuracy, seconds."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr

    def before_training_epoch(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        self._loss = torch.zeros((), device=strategy.device)
        self._correct = torch.zeros((), device=strategy.device)
        self._seen = 0

    def after_training_iteration(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        # accumulated on the device: no host round trip per iteration
        size = strategy.mb_y.shape[0]
        self._loss += strategy.loss.detach().sum() * size
        logits = strategy.mb_output
        if getattr(strategy.config, "mask_train_logits", False):  # accuracy as the loss sees it
            logits = strategy.mask_to(logits, strategy.current_class_mask)
        self._correct += (logits.argmax(1) == strategy.mb_y).sum()
        self._seen += size

    def after_training_epoch(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        seen = max(self._seen, 1)
        print(
            f"  experience {strategy.current_task} epoch {strategy.clock.train_exp_epochs + 1}"
            f"/{strategy.train_epochs}: loss {self._loss.item() / seen:.4f}, "
            f"train acc {100 * self._correct.item() / seen:.1f}%, "
            f"{time.perf_counter() - self._start:.1f}s",
            file=self.stream, flush=True,
        )


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


class CLStrategy(SupervisedTemplate):
    """Base of every clbench strategy. See the module docstring for the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    # named presets: field -> value, e.g. {"quick": {"epochs": 1}, "fewrel-offline": {...}}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # True for a method that infers each test input's task (its predict calls
    # score_task_identity): evaluation_summary then reports task-identity accuracy
    infers_task: ClassVar[bool] = False

    def __init__(
        self,
        *,
        encoder: PromptableEncoder,
        num_classes: int,
        config: StrategyConfig | None = None,
        device: str | torch.device = "cpu",
        plugins: list[Any] | None = None,
        evaluator: Any = quiet_evaluator,
        class_names: list[str] | None = None,
    ) -> None:
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise UsageError(f"{type(self).__name__} takes a {self.Config.__name__}")
        # auto settings resolved for this device once, so every loader reads a plain count
        workers = resolve_num_workers(config.num_workers, torch.device(device))
        self.config = dataclasses.replace(config, num_workers=workers)
        self.amp_dtype = resolve_precision(config.precision, torch.device(device))
        self.encoder = encoder.freeze()
        self.num_classes = num_classes
        # the scenario's class names (the run loop passes them; e.g. a label taxonomy file
        # names classes); by default the class ids as text
        self.class_names = list(class_names) if class_names is not None else [
            str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise UsageError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.current_task = -1
        self.current_classes: list[int] = []
        self.task_classes: list[list[int]] = []
        # task-identity hits / counts per test experience (see score_task_identity)
        self._identity_hits: dict[int, Tensor] = {}
        self._identity_counts: dict[int, int] = {}
        self.auxiliary_loss: Tensor | None = None
        self.scheduler: Any = None
        self.query_cache = QueryCache()
        model = StrategyModel(encoder)
        self.setup(model)
        # Avalanche wants an optimizer now; the real one is built per experience.
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=self.config.batch_size,
            train_epochs=self.config.epochs,
            eval_mb_size=self.config.eval_batch_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
        )
        self.model.to(self.device)
        self.seen_classes = torch.zeros(num_classes, dtype=torch.bool, device=self.device)

    # -- hooks for method authors ------------------------------------------------------
    def setup(self, model: StrategyModel) -> None:
        """Add the trainable modules (prompts, heads) to ``model``."""

    def begin_task(self, task: int, classes: list[int]) -> None:
        """Called before training on experience ``task`` (after the class bookkeeping)."""

    def end_task(self, task: int, classes: list[int]) -> None:
        """Called after training on experience ``task``."""

    def train_logits(self, x: Tensor) -> Tensor:
        """Logits over all classes for a training batch; may set ``self.auxiliary_loss``."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Logits over all classes for a test batch (unseen classes are masked out)."""
        raise NotImplementedError

    def training_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy (over the current classes when ``mask_train_logits``) + aux loss."""
        if getattr(self.config, "mask_train_logits", False):
            logits = self.mask_to(logits, self.current_class_mask)
        loss = F.cross_entropy(logits, targets)
        if self.auxiliary_loss is not None:
            loss = loss + self.auxiliary_loss
        return loss

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimizer; default: every parameter that requires grad."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def evaluation_summary(self) -> dict[str, Any]:
        """Diagnostics gathered during the last evaluation; the run loop stores them with
        the experience's record. By default, for a method that infers the task
        (``infers_task``), the task-identity accuracy (%) per test experience that
        ``score_task_identity`` scored (None for unseen ones)."""
        if not self.infers_task:
            return {}
        learned = len(self.task_classes)
        hits, counts = self._identity_hits, self._identity_counts
        accuracy = [
            100.0 * float(hits[i]) / counts[i] if i < learned else None for i in sorted(counts)
        ]
        self._identity_hits, self._identity_counts = {}, {}
        return {"task_identity_accuracy": accuracy}

    def extra_state(self) -> dict[str, Any]:
        """Checkpointed state that is not a module parameter or buffer."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------
    def query(self, x: Tensor) -> Tensor:
        """The frozen encoder's un-prompted feature of ``x``, from the cache when seen before.

        Inputs are cached when they cannot be augmented views: always at evaluation, and
        while training on text (our text scenarios have no augmentation) or on images with
        ``cache_train_queries`` (for un-augmented streams: an augmented view is new at every
        epoch, so caching it would only fill memory). Lookups are exact either way.
        """
        if not self.config.cache_queries:
            return self.encoder.query(x)
        insert = (not self.is_training or self.encoder.modality == "text"
                  or self.config.cache_train_queries)
        return self.query_cache.get_or_compute(x, self.encoder.query, insert=insert)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the strategy's device when ``precision`` asks for it, else a
        no-op; ``forward`` runs in it, and end-of-task feature passes may use it too."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def seen_class_list(self) -> list[int]:
        """Every class trained on so far, task by task."""
        return [label for classes in self.task_classes for label in classes]

    def class_to_task(self) -> Tensor:
        """[num_classes] long: the task that brought each class (-1: not seen yet)."""
        lookup = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        for task, classes in enumerate(self.task_classes):
            lookup[classes] = task
        return lookup

    def scenario_tasks(self, task: int) -> int:
        """How many tasks the training stream has (at least ``task + 1``), so that a method
        with a fixed number of per-task slots can fail on the first task, not hours later."""
        stream = getattr(self.experience, "origin_stream", None)
        return max(task + 1, len(stream) if stream is not None else 0)

    def score_task_identity(self, x: Tensor, tasks: Tensor, lookup: Tensor | None = None) -> None:
        """During Avalanche's evaluation loop, count how often ``tasks`` [B] (the task a
        method inferred for each input of ``x``) is the task of the true class.
        ``lookup``: ``class_to_task()`` when the caller has it already."""
        if self.is_training or self.mbatch is None or self.mbatch[0] is not x:
            return
        lookup = self.class_to_task() if lookup is None else lookup
        index = int(self.experience.current_experience)
        hits = (tasks == lookup[self.mb_y]).sum()  # stays on the device
        self._identity_hits[index] = self._identity_hits.get(index, 0) + hits
        self._identity_counts[index] = self._identity_counts.get(index, 0) + len(tasks)

    @property
    def current_class_mask(self) -> Tensor:
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        mask[self.current_classes] = True
        return mask

    @staticmethod
    def mask_to(logits: Tensor, allowed: Tensor) -> Tensor:
        """Logits outside ``allowed`` set to the lowest finite value (losses stay finite)."""
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)

    def mask_unseen(self, logits: Tensor) -> Tensor:
        return self.mask_to(logits, self.seen_classes)

    # -- Avalanche plumbing -----------------------------------------------------------
    def _before_training_exp(self, **kwargs: Any) -> None:
        classes = sorted(int(c) for c in self.experience.classes_in_this_experience)
        self.current_task = int(self.experience.current_experience)
        self.current_classes = classes
        if self.current_task == len(self.task_classes):
            self.task_classes.append(classes)
        self.seen_classes[classes] = True
        self.begin_task(self.current_task, classes)
        super()._before_training_exp(**kwargs)  # builds the loader and the optimizer

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.end_task(self.current_task, self.current_classes)
        super()._after_training_exp(**kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        groups = [g for g in self.trainable_parameters() if g["params"]]
        if not groups:
            raise RuntimeError(f"{self.name}: nothing to train in experience {self.current_task}")
        if self.config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(
                groups, lr=self.config.lr, weight_decay=self.config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                groups, lr=self.config.lr, momentum=0.9, weight_decay=self.config.weight_decay
            )
        self.optimized_param_id = {}
        self.scheduler = make_scheduler(self.optimizer, self.config)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        super()._after_training_epoch(**kwargs)
        if self.scheduler is not None:
            self.scheduler.step()

    def forward(self) -> Tensor:
        with self.autocast():
            if self.is_training:
                self.auxiliary_loss = None
                logits = self.train_logits(self.mb_x)
            else:
                logits = self.predict(self.mb_x)
        # losses and argmax in fp32 (a no-op without autocast); backward runs outside
        # autocast, as torch recommends
        return logits.float()

    def criterion(self) -> Tensor:
        if self.is_training:
            return self.training_loss(self.mb_output, self.mb_y)
        return F.cross_entropy(self.mb_output, self.mb_y)

    def optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                self.config.grad_clip,
            )
        super().optimizer_step()

    def train(self, experiences: Any, eval_streams: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("num_workers", self.config.num_workers)
        # workers live across the epochs of an experience instead of restarting each epoch
        # (Avalanche already pins memory when the device is a GPU)
        kwargs.setdefault("persistent_workers", kwargs["num_workers"] > 0)
        # evaluation is the run loop's job; [] keeps Avalanche from evaluating per epoch
        return super().train(experiences, eval_streams=eval_streams or [], **kwargs)

    def eval(self, experiences: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("num_workers", self.config.num_workers)
        return super().eval(experiences, **kwargs)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the frozen encoder weights, which are never copied."""
        model_state = {
            key: value.detach().cpu().clone()
            for key, value in self.model.state_dict().items()
            if not key.startswith("encoder.")
        }
        return {
            "strategy": self.name,
            "config": self.config.to_dict(),
            "model": model_state,
            "requires_grad": {n: p.requires_grad for n, p in self.model.named_parameters()
                              if not n.startswith("encoder.")},
            "task_classes": self.task_classes,
            "seen_classes": self.seen_classes.cpu(),
            "current_task": self.current_task,
            "query_cache": self.query_cache.state_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not match {self.name}: missing {missing}, unexpected {unexpected}"
            )
        for name, parameter in self.model.named_parameters():
            if name in state["requires_grad"]:
                parameter.requires_grad_(state["requires_grad"][name])
        self.task_classes = [list(c) for c in state["task_classes"]]
        self.seen_classes = state["seen_classes"].to(self.device)
        self.current_task = state["current_task"]
        self.query_cache.load_state_dict(state["query_cache"], self.device)
        self.current_classes = self.task_classes[-1] if self.task_classes else []
        self.load_extra_state(state["extra"])

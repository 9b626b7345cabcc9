"""The strategy base: an Avalanche ``SupervisedTemplate`` with the few hooks a method needs.

A method author writes one class::

    @STRATEGIES.register("my-method", "one line for `clbench list`")   # sets cls.name
    class MyMethod(CLStrategy):
        Config = MyConfig                      # typed hyper-parameters (paper symbols in help)
        presets = {"quick": {...}}             # named settings, e.g. per scenario

        def setup(self, model): ...            # add trainable modules to `model`
        def train_logits(self, x): ...         # logits, or TrainOutput(logits, aux_loss, features)
        def predict(self, x): ...              # logits, or Prediction(logits, tasks, features)
        def training_loss(self, output, y): ...    # optional; default CE + output.aux_loss
        def begin_task(self, task, classes): ...   # optional
        def end_task(self, task, classes): ...     # optional

and it works in a plain Avalanche script (``strategy.train(exp)``, ``strategy.eval(stream)``,
plugins, loggers) as well as under ``clbench run``.

**Construction order.** ``CLStrategy.__init__`` resolves the config for the device, builds
the Avalanche template around a :class:`StrategyModel` holding the frozen encoder, then
calls ``setup(model)``: ``self.device``, ``self.model``, ``self.config``,
``self.num_classes``, ``self.class_names``, ``self.seen_classes`` and ``self.num_tasks``
exist by then, and the model (with what ``setup`` added) is moved to the device right
after. ``num_tasks`` is the scenario's number of tasks (``clbench run`` passes it). A
method with per-task slots (prompts, pools, components; see :meth:`CLStrategy.task_slots`)
builds ``num_task_slots()`` of them: the option's value, or one per task when the option
is 0. If such a method is built without ``num_tasks`` and its option is 0, ``setup`` waits
for the first experience, whose stream gives the count. An explicit slot count is checked
against the number of tasks once, before anything trains.

**What the base does for every method.** Training: ``forward`` calls ``train_logits`` under
the strategy's autocast and ``criterion`` calls ``training_loss`` with its output (the
output of the current batch is ``self.train_output``, the one slot between the two).
Prediction: ``forward`` calls ``predict``, masks the classes not seen yet and, for a method
that infers each input's task (``infers_task``), scores the tasks ``predict`` returned;
``classify(x)`` gives the same logits outside Avalanche's loops. After ``end_task`` nothing
else happens: the run loop evaluates.

The template's own attributes (``mbatch``, ``mb_x``, ``clock``, ``loss``, ``plugins``,
``experience``, ``optimizer``, ``model``, ``device``, ...) share the namespace with a
method's: name a method's state after what it is (``task_prefixes``), not ``loss`` or
``model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from clbench.encoders.base import PromptableEncoder
from clbench.errors import UsageError
from clbench.query_cache import QueryCache
from clbench.training import (
    EpochProgress,
    StrategyConfig,
    make_scheduler,
    quiet_evaluator,
    resolve_num_workers,
    resolve_precision,
)

__all__ = [
    "CLStrategy",
    "EpochProgress",
    "Prediction",
    "StrategyConfig",
    "StrategyModel",
    "TaskSlots",
    "TrainOutput",
]


@dataclass
class TrainOutput:
    """What ``train_logits`` returns (a plain logits tensor means only ``logits``).

    logits: [B, num_classes]. aux_loss: added to the training loss by the default
    ``training_loss`` (a prompt module's pull term, a regulariser). features: what a
    subclass's ``training_loss`` needs besides the logits (e.g. the prompted features).
    """

    logits: Tensor
    aux_loss: Tensor | None = None
    features: Tensor | None = None


@dataclass
class Prediction:
    """What ``predict`` returns (a plain logits tensor means only ``logits``).

    logits: [B, num_classes], unseen classes need not be masked (the base does it).
    tasks: [B] the task a method inferred for each input (required when ``infers_task``;
    the base scores them against the true classes' tasks during evaluation). features:
    for a subclass's test-time step (e.g. a rescaling that reads the prompted features).
    """

    logits: Tensor
    tasks: Tensor | None = None
    features: Tensor | None = None


@dataclass(frozen=True)
class TaskSlots:
    """A method's per-task slots: ``count`` of them from the option ``option`` (0 = one per
    task of the scenario); ``what`` names them in messages ("prompt slots")."""

    option: str
    count: int
    what: str


class StrategyModel(nn.Module):
    """The shared frozen encoder plus the strategy's trainable modules."""

    def __init__(self, encoder: PromptableEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:  # Avalanche never calls it: the strategy does
        raise RuntimeError("call the strategy's train_logits / predict instead")


class CLStrategy(SupervisedTemplate):
    """Base of every clbench strategy. See the module docstring for the hooks."""

    name: ClassVar[str] = ""  # set by the registry's decorator
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    # named presets: field -> value, e.g. {"quick": {"epochs": 1}, "fewrel-offline": {...}}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # True for a method that infers each test input's task: its predict returns
    # Prediction(tasks=...), and evaluation_summary reports task-identity accuracy
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
        num_tasks: int | None = None,
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
        self.class_names = (
            list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        )
        if len(self.class_names) != num_classes:
            raise UsageError(f"{len(self.class_names)} class names for {num_classes} classes")
        if num_tasks is not None and num_tasks < 1:
            raise UsageError(f"num_tasks must be at least 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.current_task = -1
        self.current_classes: list[int] = []
        self.task_classes: list[list[int]] = []
        # task-identity hits / counts per test experience (see _score_task_identity)
        self._identity_hits: dict[int, Tensor] = {}
        self._identity_counts: dict[int, int] = {}
        self.train_output: TrainOutput | None = None  # of the current training batch
        self.scheduler: Any = None
        self.query_cache = QueryCache()
        # Avalanche wants an optimizer now; the real one is built per experience.
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
        super().__init__(
            model=StrategyModel(encoder),
            optimizer=placeholder,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=self.config.batch_size,
            train_epochs=self.config.epochs,
            eval_mb_size=self.config.eval_batch_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
        )
        self.seen_classes = torch.zeros(num_classes, dtype=torch.bool, device=self.device)
        self.is_set_up = False
        slots = self.task_slots()
        if num_tasks is not None:
            self._check_task_count(num_tasks)
        if num_tasks is not None or slots is None or slots.count > 0:
            self._set_up()  # else the first experience tells how many slots to build

    # -- hooks for method authors ------------------------------------------------------
    def task_slots(self) -> TaskSlots | None:
        """The per-task slots the config asks for (None: the method has none). Read when
        the config is resolved, before ``setup``."""
        return None

    def setup(self, model: StrategyModel) -> None:
        """Add the trainable modules (prompts, heads) to ``model`` (see the module
        docstring for what exists when this runs)."""

    def begin_task(self, task: int, classes: list[int]) -> None:
        """Called before training on experience ``task`` (after the class bookkeeping)."""

    def end_task(self, task: int, classes: list[int]) -> None:
        """Called after training on experience ``task``."""

    def train_logits(self, x: Tensor) -> Tensor | TrainOutput:
        """Logits over all classes for a training batch, or a :class:`TrainOutput`."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor | Prediction:
        """Logits over all classes for a test batch, or a :class:`Prediction` (with the
        inferred tasks for a method that ``infers_task``). The base masks unseen classes."""
        raise NotImplementedError

    def training_loss(self, output: TrainOutput, targets: Tensor) -> Tensor:
        """Cross-entropy (over the current classes when ``mask_train_logits``) + aux loss."""
        logits = output.logits
        if self.config.mask_train_logits:
            logits = self.mask_to(logits, self.current_class_mask)
        loss = F.cross_entropy(logits, targets)
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        return loss

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimizer; default: every parameter that requires grad."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def evaluation_summary(self) -> dict[str, Any]:
        """Diagnostics gathered during the last evaluation; the run loop stores them with
        the experience's record. By default, for a method that infers the task
        (``infers_task``), the task-identity accuracy (%) per test experience (None for
        unseen ones)."""
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
    def num_task_slots(self) -> int:
        """How many per-task slots ``setup`` builds: the option's value, or (0) one per
        task of the scenario."""
        slots = self.task_slots()
        if slots is not None and slots.count > 0:
            return slots.count
        if self.num_tasks is None:
            raise RuntimeError("the number of tasks is not known yet (pass num_tasks=)")
        return self.num_tasks

    def query(self, x: Tensor) -> Tensor:
        """The frozen encoder's un-prompted feature of ``x``, from the cache when seen before.

        Inputs are cached when they cannot be augmented views: always at evaluation, and
        while training on text (our text scenarios have no augmentation) or on images with
        ``cache_train_queries`` (for un-augmented streams: an augmented view is new at every
        epoch, so caching it would only fill memory). Lookups are exact either way.
        """
        if not self.config.cache_queries:
            return self.encoder.query(x)
        insert = (
            not self.is_training
            or self.encoder.modality == "text"
            or self.config.cache_train_queries
        )
        return self.query_cache.get_or_compute(x, self.encoder.query, insert=insert)

    def classify(self, x: Tensor) -> Tensor:
        """Logits over all classes for ``x`` as evaluation computes them: ``predict`` under
        the strategy's autocast, unseen classes masked, in fp32."""
        with self.autocast():
            logits = self._prediction(x).logits
        return logits.float()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
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

    def task_of_best_class(self, class_logits: Tensor) -> Tensor:
        """[B] the task that brought the seen class with the highest logit: task-identity
        inference by a head over classes (HiDe's TII head, WAVE-CRE's task predictor)."""
        return self.class_to_task()[self.mask_unseen(class_logits).argmax(1)]

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

    # -- the base's own steps ---------------------------------------------------------
    def _set_up(self) -> None:
        reset = getattr(self.encoder, "reset_run_state", None)  # see BertEncoder
        if reset is not None:
            reset()
        self.setup(self.model)
        self.model.to(self.device)
        self.is_set_up = True

    def _check_task_count(self, num_tasks: int) -> None:
        """An explicit slot count must cover the scenario's tasks: fail before training."""
        slots = self.task_slots()
        if slots is not None and 0 < slots.count < num_tasks:
            raise UsageError(
                f"{self.name} has {slots.count} {slots.what} ({slots.option}={slots.count}) "
                f"but the scenario has {num_tasks} tasks: use --set {slots.option}={num_tasks}, "
                f"or {slots.option}=0 for one per task"
            )

    def _stream_length(self, task: int) -> int:
        """How many tasks the training stream has (at least ``task + 1``)."""
        stream = getattr(self.experience, "origin_stream", None)
        return max(task + 1, len(stream) if stream is not None else 0)

    def _prediction(self, x: Tensor) -> Prediction:
        prediction = self.predict(x)
        if isinstance(prediction, Tensor):
            prediction = Prediction(prediction)
        prediction.logits = self.mask_unseen(prediction.logits)
        return prediction

    def _score_task_identity(self, tasks: Tensor) -> None:
        """Count how often ``tasks`` [B], the tasks inferred for the current evaluation
        batch, are the tasks of its true classes (per test experience, on the device)."""
        index = int(self.experience.current_experience)
        hits = (tasks == self.class_to_task()[self.mb_y]).sum()
        self._identity_hits[index] = self._identity_hits.get(index, 0) + hits
        self._identity_counts[index] = self._identity_counts.get(index, 0) + len(tasks)

    # -- Avalanche plumbing -----------------------------------------------------------
    def _before_training_exp(self, **kwargs: Any) -> None:
        classes = sorted(int(c) for c in self.experience.classes_in_this_experience)
        self.current_task = int(self.experience.current_experience)
        if self.num_tasks is None:  # a plain Avalanche script: the stream tells
            self.num_tasks = self._stream_length(self.current_task)
            self._check_task_count(self.num_tasks)
        if not self.is_set_up:
            self._set_up()
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
        optimizer: torch.optim.Optimizer
        if self.config.optimizer == "adam":
            optimizer = torch.optim.Adam(
                groups, lr=self.config.lr, weight_decay=self.config.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                groups, lr=self.config.lr, momentum=0.9, weight_decay=self.config.weight_decay
            )
        self.optimizer = optimizer
        # what this task trains, for the run's record (tables' Params/task): each tensor once
        trained = {id(p): p for g in groups for p in g["params"] if p.requires_grad}
        self.trained_parameter_count = sum(p.numel() for p in trained.values())
        self.optimized_param_id: dict[Any, Any] = {}  # Avalanche's: no parameter to carry over
        self.scheduler = make_scheduler(self.optimizer, self.config)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        super()._after_training_epoch(**kwargs)
        if self.scheduler is not None:
            self.scheduler.step()

    def forward(self) -> Tensor:
        # losses and argmax in fp32 (a no-op without autocast); backward runs outside
        # autocast, as torch recommends
        with self.autocast():
            if not self.is_training:
                prediction = self._prediction(self.mb_x)
                if self.infers_task:
                    if prediction.tasks is None:
                        raise RuntimeError(
                            f"{self.name} infers tasks (infers_task) but its predict returned "
                            "no tasks: return Prediction(logits, tasks=...)"
                        )
                    self._score_task_identity(prediction.tasks)
                return prediction.logits.float()
            output = self.train_logits(self.mb_x)
        output = output if isinstance(output, TrainOutput) else TrainOutput(output)
        output.logits = output.logits.float()  # what training_loss sees
        self.train_output = output
        return output.logits

    def criterion(self) -> Tensor:
        if self.is_training:
            assert self.train_output is not None
            return self.training_loss(self.train_output, self.mb_y)
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
    def state_dict(self, *, include_query_cache: bool = True) -> dict[str, Any]:
        """Everything but the frozen encoder weights, which are never copied.

        ``include_query_cache=False`` leaves the query cache out ("query_cache": None): the
        run loop's checkpoints write it incrementally beside the state
        (:func:`clbench.results.checkpoint.save_checkpoint`), since it grows with every
        input seen while the rest stays the same size.
        """
        model_state = {
            key: value.detach().cpu().clone()
            for key, value in self.model.state_dict().items()
            if not key.startswith("encoder.")
        }
        requires_grad = {
            n: p.requires_grad
            for n, p in self.model.named_parameters()
            if not n.startswith("encoder.")
        }
        return {
            "strategy": self.name,
            "config": self.config.to_dict(),
            "num_tasks": self.num_tasks,
            "model": model_state,
            "requires_grad": requires_grad,
            "task_classes": self.task_classes,
            "seen_classes": self.seen_classes.cpu(),
            "current_task": self.current_task,
            "query_cache": self.query_cache.state_dict() if include_query_cache else None,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state`` (from :meth:`state_dict`, or from a run's checkpoint, whose
        query cache :func:`~clbench.results.checkpoint.load_checkpoint` gives as parts)."""
        if self.num_tasks is None:  # checkpoints before num_tasks was stored have None here
            self.num_tasks = state.get("num_tasks")
        if not self.is_set_up:
            if self.num_tasks is None:
                raise RuntimeError(
                    f"{self.name}: the checkpoint does not say how many tasks "
                    "the slots were built for: pass num_tasks="
                )
            self._set_up()
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
        if state["query_cache"] is not None:  # None: left out, the cache stays as it is
            self.query_cache.load_state_dict(state["query_cache"], self.device)
        self.current_classes = self.task_classes[-1] if self.task_classes else []
        self.load_extra_state(state["extra"])

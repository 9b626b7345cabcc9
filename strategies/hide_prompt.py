"""HiDe-Prompt: hierarchical decomposition of prompt-based continual learning
(Wang et al., NeurIPS 2023), and the shared per-task prefix prompts NoRGa builds on.

The objective splits into three parts, each trained on its own:

* **Task-identity inference (TII)**: an auxiliary classifier reads the frozen encoder's
  un-prompted feature (the same encoder run without prompt); trained per task with
  cross-entropy over the task's classes, then aligned on Gaussian samples of every seen
  class. Predicted class -> its task -> that task's prompt.
* **Within-task prediction (WTP)**: one prefix prompt per task (layers 0-4, length L_p),
  initialised from the previous task's prompt, trained with cross-entropy over the task's
  classes plus a contrastive regulariser that keeps batch features away from the stored
  means of old classes; after training, prompt momentum m mixes the mean of the old
  prompts into the stored prompt (as the authors' code does).
* **Task-adaptive prediction (TAP)**: after each task, class-wise statistics of the
  prompted features are stored and the head alone is retrained on samples of all seen
  classes (no stored data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.config import option
from clbench.consolidation import GaussianConsolidation, TaskIdentityHead, train_on_features
from clbench.prompted_cache import PromptedFeatureCache, Rows, flat_parameters
from clbench.prompts import TaskPrefixPrompts, require_layers
from clbench.prompts.reparam import PrefixParamOptions
from clbench.prompts.vapt import VAPTOptions, vapt_prompts
from clbench.registry import STRATEGIES
from clbench.strategies.quick import QUICK_DATA
from clbench.strategy import (
    CLStrategy,
    Prediction,
    StrategyConfig,
    StrategyModel,
    TaskSlots,
    TrainOutput,
)


@dataclass
class HiDePromptConfig(VAPTOptions, PrefixParamOptions, StrategyConfig):
    num_tasks: int = option(
        0, "prompt slots, one per task (0: the scenario's number of tasks)", symbol="T"
    )
    prompt_layers: list[int] = option([0, 1, 2, 3, 4], "layers with a task prefix")
    prompt_length: int = option(5, "prefix length (5 CIFAR, 20 ImageNet-R)", symbol="L_p")
    prompt_momentum: float = option(
        0.01, "weight of the old prompts' mean while training", symbol="m"
    )
    contrastive_weight: float = option(
        0.1, "WTP contrastive regulariser (0.1 CIFAR, 0.5 ImageNet-R)", symbol="reg"
    )
    contrastive_temperature: float = option(0.8, "temperature of the contrastive regulariser")
    head_lr_scale: float = option(0.1, "head learning rate = lr x this")
    tii_epochs: int = option(20, "epochs of the task-identity classifier per task (Adam)")
    tii_lr: float = option(5e-4, "learning rate of the task-identity classifier (Adam)")
    tii_align_epochs: int = option(30, "epochs aligning the task-identity classifier on samples")
    tap_epochs: int = option(30, "epochs retraining the head on samples of all seen classes")
    replay_lr: float = option(0.005, "SGD learning rate of the two sample-trained stages")
    samples_per_class: int = option(640, "Gaussian samples per class and epoch (5 x batch)")
    statistics: Literal["covariance", "centroids"] = option("covariance", "class statistics")
    num_centroids: int = option(10, "k of the centroids mode")
    shrinkage: float = option(1e-4, "added to the covariance diagonal")
    mask_train_logits: bool = option(True, "cross-entropy over the current task's classes only")
    prompted_cache: bool = option(
        True,
        "keep each test input's prompted feature per frozen task prompt (exact: a prompt "
        "that changes drops its entries), so an evaluation runs the encoder only on inputs "
        "that pick a prompt they had not used",
    )
    # the authors' CIFAR setting: Adam, lr 0.03 x 128 / 256, clip 1.0, 50 epochs, x0.1 at 30
    lr: float = option(0.015, "prompt learning rate (0.03 x batch / 256)", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")
    epochs: int = option(50, "epochs per experience")
    grad_clip: float = option(1.0, "gradient-norm clip")
    lr_schedule: Literal["constant", "cosine", "step"] = option("step", "lr schedule")
    lr_step_epoch: int = option(30, "step schedule: x0.1 after this epoch")

    @property
    def prefix_gate(self) -> str | None:
        """The activation of a residual gate on every prefix's logits (NoRGa's config
        names one); None: plain prefix tuning."""
        return None


# fmt: off
HIDE_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 1, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant",
              "tii_epochs": 2, "tii_align_epochs": 2, "tap_epochs": 2, "samples_per_class": 64,
              **QUICK_DATA},
    "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant",
                       "tii_epochs": 10, "tii_align_epochs": 10, "tap_epochs": 10,
                       "samples_per_class": 160},
    "fewrel-offline": {"epochs": 1, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant",
                       "samples_per_class": 160},
    "split-cifar100": {},  # the defaults are the authors' CIFAR setting
    "imagenet-r": {"epochs": 150, "lr_schedule": "cosine", "prompt_length": 20,
                   "contrastive_weight": 0.5},
}
# fmt: on


@STRATEGIES.register(
    "hide-prompt",
    "HiDe-Prompt: task prefixes, task-identity inference, Gaussian head consolidation",
)
class HiDePrompt(CLStrategy):
    Config = HiDePromptConfig
    infers_task = True  # the TII head picks the task prompt
    presets = HIDE_PRESETS
    config: HiDePromptConfig

    def task_slots(self) -> TaskSlots:
        return TaskSlots("num_tasks", self.config.num_tasks, "prompt slots")

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        require_layers(c.prompt_layers, encoder.num_layers, "prompt_layers")
        if c.prompt == "vapt":  # VAPT's adaptive prompts instead of prefixes (vision only)
            model.prompts = vapt_prompts(
                encoder, c, self.num_task_slots(), c.prompt_layers, momentum=c.prompt_momentum,
                gate_activation=c.prefix_gate, prefix_param=c.prefix_param,
            )  # fmt: skip
        else:
            model.prompts = TaskPrefixPrompts(
                self.num_task_slots(),
                c.prompt_layers,
                c.prompt_length,
                encoder.embed_dim,
                c.prompt_momentum,
                c.prefix_gate,
                reparam=c.prefix_reparam,
            )
        model.head = nn.Linear(encoder.feature_dim, self.num_classes)
        model.task_identity = TaskIdentityHead(encoder.feature_dim, self.num_classes)
        model.task_identity.requires_grad_(False)
        self.consolidation = GaussianConsolidation(
            encoder.feature_dim, c.statistics, shrinkage=c.shrinkage, num_centroids=c.num_centroids
        )
        self.prompted_cache = PromptedFeatureCache(self.num_task_slots())

    # -- training (WTP) -----------------------------------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        self.model.prompts.begin_task(task)  # P_t starts from P_{t-1}; only P_t trains

    def trainable_parameters(self) -> list[dict[str, Any]]:
        prompts = [p for p in self.model.prompts.parameters() if p.requires_grad]  # NoRGa: + gates
        return [
            {"params": prompts, "lr": self.config.lr},
            {
                "params": list(self.model.head.parameters()),
                "lr": self.config.lr * self.config.head_lr_scale,
            },
        ]

    def train_logits(self, x: Tensor) -> TrainOutput:
        selection = self.model.prompts(task=self.current_task, train=True)
        features = self.encoder(x, selection.prompt).pooled
        contrastive = None
        if self.config.contrastive_weight > 0:
            old_classes = [c for classes in self.task_classes[: self.current_task] for c in classes]
            statistics = self.consolidation.prompted_statistics
            old_means = statistics.class_means(old_classes, self.device)
            contrastive = self.config.contrastive_weight * self.contrastive(features, old_means)
        # the features go with the logits: subclasses add losses on them (hier-ot)
        return TrainOutput(self.model.head(features), contrastive, features)

    def contrastive(self, features: Tensor, old_means: Tensor) -> Tensor:
        """CE((M M^T) / temperature, I) over M = [old class means; batch features].

        As in the authors' code: raw (un-normalised) features, and in the first task, with
        no old class yet, over the batch features alone.
        """
        stacked = torch.cat([old_means.to(features.dtype), features])
        logits = stacked @ stacked.T / self.config.contrastive_temperature
        return F.cross_entropy(logits, torch.arange(len(stacked), device=logits.device))

    # -- end of task: statistics, TII, TAP ------------------------------------------------
    def end_task(self, task: int, classes: list[int]) -> None:
        c = self.config
        self.model.prompts.end_task(task)  # momentum: the stored prompt is final now
        prompt = self.model.prompts(task=task).prompt
        query, _, labels = self.consolidation.fit_task(
            self, lambda x, _query: self.encoder(x, prompt).pooled
        )
        # the task-identity head first learns the task's classes on its fixed features
        train_on_features(
            self.model.task_identity,
            query.to(self.device),
            labels.to(self.device),
            epochs=c.tii_epochs,
            lr=c.tii_lr,
            batch_size=c.batch_size,
            allowed=self.current_class_mask,
        )
        if task > 0:
            # consolidation on samples of every seen class, old and new; as in the authors'
            # code, batches of 5 x batch_size samples, one step per old class per epoch
            replay = {
                "samples_per_class": c.samples_per_class,
                "lr": c.replay_lr,
                "batch_size": c.samples_per_class,
                "device": self.device,
                "steps_per_epoch": sum(len(t) for t in self.task_classes[:task]),
                "allowed": self.seen_classes,
            }
            seen = self.seen_class_list
            self.consolidation.refit(
                self.model.task_identity, "query", seen, epochs=c.tii_align_epochs, **replay
            )
            self.consolidation.refit(
                self.model.head, "prompted", seen, epochs=c.tap_epochs, **replay
            )

    # -- prediction -------------------------------------------------------------------------
    def predict(self, x: Tensor) -> Prediction:
        inferred = self.task_of_best_class(self.model.task_identity(self.query(x)))
        features = self.prompted_features(x, inferred)
        return Prediction(self.model.head(features), tasks=inferred, features=features)

    def prompted_features(self, x: Tensor, tasks: Tensor) -> Tensor:
        """encoder(x, P_task) per input; with ``prompted_cache`` only the inputs whose
        (prompt, prompt version) was not seen yet run the encoder (the head changes after
        every task, so features are kept, not logits)."""
        prompts = self.model.prompts

        def compute(rows: Rows) -> Tensor:
            return self.encoder(x[rows], prompts(task=tasks[rows]).prompt).pooled

        if not self.config.prompted_cache:
            return compute(slice(None))
        # every slot's prefix, plus NoRGa's gates (shared by all slots): a change in either
        # starts a new version of the slots it touches
        slots = torch.stack([p.detach() for p in prompts.prompts]).flatten(1)
        self.prompted_cache.sync(slots, flat_parameters(prompts.gates.parameters()))
        return self.prompted_cache.features(x, tasks, compute)

    # -- checkpoints ------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return self.consolidation.state_dict()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.consolidation.load_state_dict(state)

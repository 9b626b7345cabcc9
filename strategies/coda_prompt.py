"""CODA-Prompt: COntinual Decomposed Attention-based Prompting (Smith et al., CVPR 2023).

Instead of picking prompts from a pool, CODA-Prompt assembles one prompt per input from
a set of components. At each prompted layer (0-4) there are M components, M/T of them
added per task; component m has a key K_m, an attention vector A_m (both the size of the
query) and a prompt P_m (L_p x D). With q the frozen encoder's un-prompted pooled feature,

    alpha_m = cos(q * A_m, K_m),    p = sum_m alpha_m P_m,

over the components of the tasks learnt so far (those of future tasks are not in the
sum). p is split along its length: the first L_p/2 rows are prefix keys, the rest prefix
values (the authors' code). Everything is end-to-end differentiable: no key-matching loss.

Training task t: task t's M/T components are initialised as random unit vectors
orthogonal to all earlier components (Gram-Schmidt, per layer, for K, A and P) and are
the only components that train, with the classifier; earlier ones are frozen, so old
prompts change only through the new components' weights. The loss is the cross-entropy
of a linear classifier on the prompted pooled feature over task t's classes, plus an
optional orthogonality regulariser mu * ||B B^T - I||^2 on K, A and P (mu = 0 in the
authors' best configuration). Adam, lr 1e-3, cosine decay over each task's epochs
(stepped per epoch by the base strategy's scheduler).

``--preset authors`` runs the authors' official code (GT-RIPL/CODA-Prompt) instead: its
quarter-cosine schedule and dropped last batch (named options below), inputs in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from clbench.config import option
from clbench.errors import UsageError
from clbench.prompts import ComponentPrompt, require_layers
from clbench.prompts.reparam import PrefixParamOptions
from clbench.registry import STRATEGIES
from clbench.strategies.quick import QUICK_DATA
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel, TaskSlots, TrainOutput


@dataclass
class CodaPromptConfig(PrefixParamOptions, StrategyConfig):
    pool_size: int = option(100, "prompt components per layer, in total", symbol="M")
    num_tasks: int = option(
        0,
        "tasks the components are split over: M/T new ones per task (0: the scenario's "
        "number of tasks)",
        symbol="T",
    )
    prompt_length: int = option(
        8, "component length; first half prefix keys, second half values", symbol="L_p"
    )
    layers: tuple[int, ...] = option((0, 1, 2, 3, 4), "prompted layers")
    ortho_weight: float = option(0.0, "orthogonality regulariser on K, A and P", symbol="mu")
    mask_train_logits: bool = option(True, "cross-entropy over the current task's classes only")
    # the authors' settings: Adam, lr 1e-3, cosine decay, batch 128; 20 epochs for Split
    # CIFAR-100, 50 for ImageNet-R
    lr: float = option(1e-3, "learning rate of components and classifier", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")
    lr_schedule: Literal["constant", "cosine", "step"] = option(
        "cosine", "learning-rate schedule over each task's epochs (stepped per epoch)"
    )
    cosine_form: Literal["half", "quarter"] = option(
        "half",
        "with lr_schedule=cosine, the lr of epoch e of K: half = lr (1 + cos(pi e / K)) / 2 "
        "(to 0 after the last epoch); quarter = lr cos(99 pi e / (200 (K - 1))), which "
        "ends at lr cos(99 pi / 200) = 0.016 lr in the last epoch",
        quirk="GT-RIPL/CODA-Prompt utils/schedulers.py CosineSchedule, stepped at each "
        "epoch's start from epoch 1 (learners/default.py)",
    )
    drop_last: bool = option(
        False,
        "drop each epoch's last partial training batch",
        quirk="GT-RIPL/CODA-Prompt trainer.py line 185: DataLoader(..., drop_last=True)",
    )


# How the authors' code (GT-RIPL/CODA-Prompt configs/*_prompt.yaml, experiments/*.sh with
# --prompt_param 100 8 0.0) trains: Adam (0.9, 0.999), lr 1e-3, no weight decay or
# clipping, batch 128, the quarter cosine, drop_last, inputs in [0, 1] (mean 0 / std 1 in
# dataloaders/utils.py); backbone vit-b16-augreg-in21k-ft-in1k (timm 0.4.12's
# vit_base_patch16_224). Its class order: seed s > 0 shuffles with random.seed(s) as
# class_order=seed does; its seed 0 keeps the natural order (--set
# scenario.class_order=natural for that run). Its ImageNet-R split files are its own.
AUTHORS_TRAINING: dict[str, Any] = {
    "batch_size": 128,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "grad_clip": 0.0,
    "pool_size": 100,
    "prompt_length": 8,
    "ortho_weight": 0.0,
    "lr_schedule": "cosine",
    "cosine_form": "quarter",
    "drop_last": True,
    "scenario.normalize": "none",
    "backbone": "vit-b16-augreg-in21k-ft-in1k",  # timm 0.4.12's vit_base_patch16_224
}


@STRATEGIES.register(
    "coda-prompt",
    "CODA-Prompt: prefix prompts as attention-weighted sums of per-task orthogonal components",
)
class CodaPrompt(CLStrategy):
    Config = CodaPromptConfig
    presets = {
        # 10 components per task as in the paper; 50 fit the tiny ViT's width of 64. quick
        # runs on any scenario: 40 components split evenly into 4, 5, 8 or 10 tasks. Batch 32
        # at lr 1e-3 stayed at chance on digits-offline (one epoch is 9 steps a task); batch
        # 4 at lr 0.03 learns on both offline scenarios
        "quick": {"epochs": 1, "batch_size": 4, "lr": 0.03, "pool_size": 40, **QUICK_DATA},
        "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 0.01, "pool_size": 50},
        # MiniLM-L6 on 2 CPU cores: one epoch per task (~6-8 min a run), so the larger lr of
        # the other prompt methods' CPU presets
        "fewrel-offline": {"epochs": 1, "batch_size": 32, "lr": 0.01, "pool_size": 40},
        "split-cifar100": {"epochs": 20, "batch_size": 128, "lr": 1e-3, "pool_size": 100},
        "imagenet-r": {"epochs": 50, "batch_size": 128, "lr": 1e-3, "pool_size": 100},
        "authors:split-cifar100": {**AUTHORS_TRAINING, "epochs": 20},
        # RandomResizedCrop(224) with torchvision's default scale (0.08, 1)
        "authors:imagenet-r": {**AUTHORS_TRAINING, "epochs": 50, "scenario.crop_scale_min": 0.08},
    }
    config: CodaPromptConfig

    def task_slots(self) -> TaskSlots:
        return TaskSlots("num_tasks", self.config.num_tasks, "component sets")

    def setup(self, model: StrategyModel) -> None:
        c, encoder = self.config, self.encoder
        require_layers(tuple(c.layers), encoder.num_layers, "layers")
        if c.prefix_reparam.generated:
            # a component's prompt is one of an orthogonal set (Gram-Schmidt at its task's
            # start) summed with learnt weights: a generated prompt is not orthogonal
            raise UsageError(
                f"coda-prompt takes prefix_param=free only, not {c.prefix_param}: its "
                "components are initialised orthogonal to earlier ones, which a generated "
                "prompt would not be"
            )
        try:
            model.components = ComponentPrompt(
                c.pool_size,
                self.num_task_slots(),
                c.prompt_length,
                encoder.embed_dim,
                encoder.feature_dim,
                layers=c.layers,
                ortho_weight=c.ortho_weight,
            )
        except ValueError as error:  # a bad pool setting is the user's to fix
            raise UsageError(f"coda-prompt: {error}") from None
        model.head = nn.Linear(encoder.feature_dim, self.num_classes)

    def begin_task(self, task: int, classes: list[int]) -> None:
        # orthogonal initialisation of task t's components (first visit only); freeze others
        self.model.components.begin_task(task)

    def make_optimizer(self, **kwargs: Any) -> None:
        super().make_optimizer(**kwargs)
        c = self.config
        if c.lr_schedule == "cosine" and c.cosine_form == "quarter":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, quarter_cosine(c.epochs)
            )

    def make_train_dataloader(self, **kwargs: Any) -> None:
        if self.config.drop_last:
            kwargs["drop_last"] = True
        super().make_train_dataloader(**kwargs)

    def _forward(self, x: Tensor, train: bool) -> TrainOutput:
        query = self.query(x)  # frozen, un-prompted, cached
        selection = self.model.components(query, task=max(self.current_task, 0), train=train)
        output = self.encoder(x, selection.prompt, readout="pooled")
        return TrainOutput(self.model.head(output.pooled), selection.aux_loss)

    def train_logits(self, x: Tensor) -> TrainOutput:
        return self._forward(x, train=True)

    def predict(self, x: Tensor) -> Tensor:
        return self._forward(x, train=False).logits


def quarter_cosine(epochs: int) -> Callable[[int], float]:
    """The authors' CosineSchedule as a factor of the lr per epoch e (0-based): cos(99 pi e /
    (200 (K - 1))) for K epochs (their K = 1 divides by zero; here it is 1)."""
    span = 200 * max(epochs - 1, 1)
    return lambda epoch: math.cos(99 * math.pi * epoch / span)

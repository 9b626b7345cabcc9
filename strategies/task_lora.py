"""What the LoRA-based continual learners share: adapters on the frozen encoder and a head.

InfLoRA, SD-LoRA, O-LoRA and the null-space LoRA all run the frozen encoder with
low-rank deltas on some projections of some blocks (``Prompt.deltas``, the one attention
path) and read a linear head over every class off the adapted pooled feature; none of
them infers the task. They differ in how each task's adapter is built, what of it trains,
which deltas are on while training and testing, and what happens at a task's end: those
are the hooks below, and each method's file holds only its own maths.

The adapters are built in ``setup`` (one set per task, or one shared set), so the
checkpoint layout never changes and a run resumes from any finished experience.
Cross-entropy runs over the current task's classes (all four methods train the new
classes' logits only), so an old class's head row gets no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from clbench.adapters import LayerAdapters, LowRankAdapter, merge_deltas
from clbench.config import option
from clbench.encoders import Prompt
from clbench.encoders.deltas import TARGETS, LayerDelta
from clbench.errors import UsageError
from clbench.strategies.quick import QUICK_DATA
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel, TaskSlots, TrainOutput


@dataclass
class LowRankConfig(StrategyConfig):
    num_tasks: int = option(
        0, "adapter sets, one per task (0: the scenario's number of tasks)", symbol="T"
    )
    lora_layers: list[int] = option([], "blocks with adapters ([]: every block)")
    lora_targets: list[str] = option(["k", "v"], "adapted projections: q, k, v, o, fc1, fc2")
    rank: int = option(10, "rank of each task's adapter", symbol="r")
    mask_train_logits: bool = option(True, "cross-entropy over the current task's classes only")


# The CPU settings every LoRA strategy starts from: a few optimiser steps per task on the
# quick subset (64 sentences a task: 8 steps at batch 8), at a rate the head can follow.
CPU_QUICK: dict[str, Any] = {"epochs": 1, "batch_size": 8, "lr": 0.01, **QUICK_DATA}
CPU_FULL: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 0.005}


class LowRankStrategy(CLStrategy):
    """Base of the LoRA continual learners (see the module docstring)."""

    config: LowRankConfig

    # -- hooks of a method ------------------------------------------------------------
    def make_adapter(self, weight: Tensor, layer: int, target: str, slot: int) -> LowRankAdapter:
        """The adapter of slot ``slot`` on (layer, target); ``weight`` the frozen one."""
        raise NotImplementedError

    def train_slot(self, slot: int) -> None:
        """Turn on ``requires_grad`` of what slot ``slot`` trains (all of it by default)."""
        self.model.adapters[slot].requires_grad_(True)

    def active_deltas(self, task: int, train: bool) -> dict[int, LayerDelta]:
        """The deltas the encoder runs with while training ``task`` / after learning
        tasks 0..``task``."""
        raise NotImplementedError

    def regulariser(self) -> Tensor | None:
        """A method's extra training loss (O-LoRA's orthogonality); None: none."""
        return None

    def num_adapter_sets(self) -> int:
        return self.num_task_slots()

    # -- shared ---------------------------------------------------------------------------
    def task_slots(self) -> TaskSlots:
        return TaskSlots("num_tasks", self.config.num_tasks, "adapter sets")

    @property
    def adapter_layers(self) -> list[int]:
        layers = self.config.lora_layers or list(range(self.encoder.num_layers))
        if not all(0 <= layer < self.encoder.num_layers for layer in layers):
            raise UsageError(
                f"lora_layers {tuple(layers)} must lie in 0..{self.encoder.num_layers - 1}"
            )
        return layers

    def setup(self, model: StrategyModel) -> None:
        targets = self.config.lora_targets
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise UsageError(
                f"lora_targets {targets} must be distinct names among {', '.join(TARGETS)}"
            )
        model.head = nn.Linear(self.encoder.feature_dim, self.num_classes)
        model.adapters = nn.ModuleList(
            LayerAdapters.build(
                self.encoder,
                self.adapter_layers,
                targets,
                partial(self.make_adapter, slot=slot),
            ).freeze()
            for slot in range(self.num_adapter_sets())
        )

    def begin_task(self, task: int, classes: list[int]) -> None:
        for adapters in self.model.adapters:
            adapters.requires_grad_(False)
        self.train_slot(min(task, len(self.model.adapters) - 1))

    def end_task(self, task: int, classes: list[int]) -> None:
        self.model.adapters[min(task, len(self.model.adapters) - 1)].freeze()

    @property
    def learned_tasks(self) -> int:
        return len(self.task_classes)

    def adapted_features(self, x: Tensor, deltas: dict[int, LayerDelta]) -> Tensor:
        return self.encoder(x, Prompt(deltas=deltas), readout="pooled").pooled

    def train_logits(self, x: Tensor) -> TrainOutput:
        features = self.adapted_features(x, self.active_deltas(self.current_task, train=True))
        return TrainOutput(self.model.head(features), self.regulariser(), features)

    def predict(self, x: Tensor) -> Tensor:
        deltas = self.active_deltas(max(self.learned_tasks - 1, 0), train=False)
        return self.model.head(self.adapted_features(x, deltas))

    def trainable_count(self) -> int:
        """Parameters the optimiser sees in the current task (head included)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def slot_deltas(sets: list[LayerAdapters]) -> dict[int, LayerDelta]:
    """Every given adapter set at once (a sum of their updates)."""
    return merge_deltas(*(adapters.deltas() for adapters in sets))


def frobenius(tensor: Tensor) -> Tensor:
    return torch.linalg.vector_norm(tensor.float())

"""SD-LoRA: scalable decoupled LoRA for class-incremental learning (Wu et al., ICLR 2025;
code WuYichen-97/SD-Lora-CL).

A LoRA per task on the query and value projections of every block, read as a direction
and a magnitude:

    W = W_0 + sum_{i<t} alpha_i B_i A_i / (||B_i||_F ||A_i||_F) + alpha_t B_t A_t

* while task t trains, its own B_t A_t (Kaiming A, zero B) and every magnitude
  alpha_0..alpha_t (one scalar per task, shared by all adapted projections, 0.8 at the
  start) learn; the earlier directions are frozen;
* once a task is over its direction is frozen and normalised; what it contributes from
  then on is its magnitude times that unit direction;
* cross-entropy over the new classes' logits only; test: the final model, no task
  identity, one head over every seen class.

The magnitudes: the paper describes them as learned throughout, so by default each task
keeps the value it ended with and goes on learning it (``relearn_magnitudes=false``); the
authors' code re-creates every earlier magnitude at 0.8 at the start of each task and
re-learns it on the new task's data (the ``authors`` presets). The most recent task is
used un-normalised until the next one starts, as in the code (its evaluation after
training is of the model as trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from clbench.adapters import LoRA, LowRankAdapter
from clbench.config import option
from clbench.encoders.deltas import LayerDelta, LowRankTerm
from clbench.registry import STRATEGIES
from clbench.strategies.task_lora import (
    CPU_FULL,
    CPU_QUICK,
    LowRankConfig,
    LowRankStrategy,
    frobenius,
)
from clbench.strategy import StrategyModel


@dataclass
class SDLoRAConfig(LowRankConfig):
    lora_targets: list[str] = option(["q", "v"], "adapted projections")
    rank: int = option(10, "rank of each task's LoRA", symbol="r")
    initial_magnitude: float = option(0.8, "a magnitude's starting value", symbol="alpha_0")
    relearn_magnitudes: bool = option(
        False,
        "re-create every earlier task's magnitude at initial_magnitude at the start of "
        "each task and re-learn it on the new task's data",
        quirk="WuYichen-97/SD-Lora-CL models/sdlora.py update_network rebuilds the LoRA "
        "wrapper every task (backbone/lora.py: magnitudes nn.Parameter([0.8])); "
        "save_wrap_param is never called",
    )
    # the paper: Adam, lr 8e-3, batch 128, 30 epochs (ImageNet-R)
    lr: float = option(8e-3, "learning rate of the LoRAs, magnitudes and head", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")
    epochs: int = option(30, "epochs per experience")


# The authors' code: SGD (momentum 0.9, hard-coded whatever the config names), no weight
# decay, batch 128, 20 epochs, a constant rate (the milestones never fall inside them);
# backbone timm vit_base_patch16_224.augreg2_in21k_ft_in1k (vit-b16-augreg2-in21k-ft-in1k)
AUTHORS: dict[str, Any] = {"rank": 10, "optimizer": "sgd", "weight_decay": 0.0,
                           "batch_size": 128, "epochs": 20, "lr_schedule": "constant",
                           "relearn_magnitudes": True,
                           "backbone": "vit-b16-augreg2-in21k-ft-in1k"}  # fmt: skip


@STRATEGIES.register(
    "sd-lora", "SD-LoRA: earlier tasks' LoRAs as frozen unit directions with learned magnitudes"
)
class SDLoRA(LowRankStrategy):
    Config = SDLoRAConfig
    presets = {
        "quick": CPU_QUICK,
        "fewrel-offline": CPU_FULL,
        "digits-offline": {"epochs": 2, "batch_size": 32, "lr": 0.01},
        "authors:split-cifar100": {**AUTHORS, "lr": 8e-3},  # exps/sdlora_c100.json
        "authors:imagenet-r": {**AUTHORS, "lr": 1e-2},  # exps/sdlora_inr.json
    }
    config: SDLoRAConfig

    def setup(self, model: StrategyModel) -> None:
        super().setup(model)
        start = self.config.initial_magnitude
        model.magnitudes = nn.ParameterList(
            nn.Parameter(torch.tensor(start), requires_grad=False)
            for _ in range(self.num_adapter_sets())
        )

    def make_adapter(self, weight: Tensor, layer: int, target: str, slot: int) -> LowRankAdapter:
        d_out, d_in = weight.shape
        rank = self.config.rank
        return LoRA(d_in, d_out, rank, target=target)  # W += B A: s = 1 (alpha = r)

    def begin_task(self, task: int, classes: list[int]) -> None:
        magnitudes = self.model.magnitudes
        if self.config.relearn_magnitudes and task > 0:
            with torch.no_grad():
                for magnitude in magnitudes[:task]:
                    magnitude.fill_(self.config.initial_magnitude)
        super().begin_task(task, classes)  # trains B_t, A_t
        for slot, magnitude in enumerate(magnitudes):
            magnitude.requires_grad_(slot <= task)

    def end_task(self, task: int, classes: list[int]) -> None:
        super().end_task(task, classes)
        self.model.magnitudes[task].requires_grad_(False)

    def active_deltas(self, task: int, train: bool) -> dict[int, LayerDelta]:
        """Tasks < ``task`` as alpha_i times their unit direction, task ``task`` as
        alpha_t B_t A_t."""
        deltas: dict[int, LayerDelta] = {}
        for slot in range(task + 1):
            magnitude = self.model.magnitudes[slot]
            for layer, adapter in self.model.adapters[slot].items():
                assert isinstance(adapter, LoRA)
                scale = magnitude * adapter.scale
                if slot < task:
                    norms = frobenius(adapter.up) * frobenius(adapter.down)
                    scale = scale / norms.clamp_min(1e-12)  # an untrained B: 0, not NaN
                term = LowRankTerm(adapter.down, adapter.up, scale)
                delta = deltas.setdefault(layer, LayerDelta())
                delta.terms.setdefault(adapter.target, []).append(term)
        return deltas

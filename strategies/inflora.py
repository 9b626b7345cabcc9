"""InfLoRA: interference-free low-rank adaptation for continual learning (Liang & Li,
CVPR 2024; code liangyanshuo/InfLoRA).

Each task t adds a branch on the key and value projections of every block,
k += x (G_t^k F_t)^T and v += x (G_t^v F_t)^T, with x the block's attention input:

* **the input factor F_t is designed, not trained**: before task t, the covariance
  C_t = mean over all tokens of x x^T is taken on the task's training inputs (every
  earlier branch on), the old tasks' input space is projected out of it with the
  DualGPM memory (:class:`clbench.subspace.DualGPM`), and F_t = the top-r left singular
  vectors of what is left, / sqrt(3); K and V share it. An update G_t F_t x is then zero
  for every input x the old tasks used, so their keys and values do not move;
* **only G_t (zero at the start) and the head train**, cross-entropy over the task's
  classes;
* **after the task** the covariance is taken again with the trained branch and the
  memory keeps the fraction epsilon_t = lambda + (lambda_e - lambda) t / T of its energy
  (T, the task count, comes from the scenario);
* **test**: every branch on, one head over all seen classes, no task identity.

Text inputs (clbench's addition; the paper is on images): padding positions are left out
of the covariance, since they are not part of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from clbench.adapters import LoRA, LowRankAdapter
from clbench.config import option
from clbench.consolidation import extract_features
from clbench.encoders.deltas import QKV, LayerDelta, merge_deltas
from clbench.errors import UsageError
from clbench.registry import STRATEGIES
from clbench.strategies.task_lora import (
    CPU_FULL,
    CPU_QUICK,
    LowRankConfig,
    LowRankStrategy,
    slot_deltas,
)
from clbench.strategy import StrategyModel
from clbench.subspace import DualGPM


@dataclass
class InfLoRAConfig(LowRankConfig):
    lora_targets: list[str] = option(["k", "v"], "adapted projections (K and V share F_t)")
    rank: int = option(10, "rank of each task's branch", symbol="r")
    threshold: float = option(
        0.95,
        "DualGPM energy kept after the first task (0.95 CIFAR, 0.98 ImageNet-R)",
        symbol="lambda",
    )
    threshold_end: float = option(1.0, "DualGPM energy kept after the last task", symbol="lambda_e")
    # the authors' CIFAR-100 setting: Adam (0.9, 0.999), lr 5e-4, no weight decay, cosine
    # schedule, batch 128, 20 epochs
    lr: float = option(5e-4, "learning rate of G_t and the head", symbol="eta")
    batch_size: int = option(128, "training mini-batch size")
    epochs: int = option(20, "epochs per experience")
    lr_schedule: Literal["constant", "cosine", "step"] = option("cosine", "lr schedule")


# configs/cifar100_inflora.json and imagenet-r_inflora.json, with the repo's timm-0.6
# vit_base_patch16_224_in21k (augreg IN-21k weights: vit-b16-in21k); natural class order.
AUTHORS: dict[str, Any] = {"rank": 10, "lr": 5e-4, "batch_size": 128, "optimizer": "adam",
                           "weight_decay": 0.0, "lr_schedule": "cosine", "threshold_end": 1.0,
                           "scenario.class_order": "natural",
                           "backbone": "vit-b16-in21k"}  # fmt: skip


@STRATEGIES.register(
    "inflora", "InfLoRA: K/V LoRA whose input factor avoids the old tasks' input subspace"
)
class InfLoRA(LowRankStrategy):
    Config = InfLoRAConfig
    presets = {
        "quick": CPU_QUICK,
        "fewrel-offline": CPU_FULL,
        "digits-offline": {"epochs": 2, "batch_size": 32, "lr": 0.01},
        "authors:split-cifar100": {**AUTHORS, "epochs": 20, "threshold": 0.95},
        "authors:imagenet-r": {**AUTHORS, "epochs": 50, "threshold": 0.98},
    }
    config: InfLoRAConfig

    def setup(self, model: StrategyModel) -> None:
        if not set(self.config.lora_targets) <= set(QKV):
            raise UsageError(
                f"inflora designs one input factor for q / k / v (they share their input); "
                f"lora_targets {self.config.lora_targets} must be among q, k, v"
            )
        super().setup(model)
        self.memory = DualGPM()

    def make_adapter(self, weight: Tensor, layer: int, target: str, slot: int) -> LowRankAdapter:
        d_out, d_in = weight.shape
        rank = self.config.rank
        # s = 1 (the code adds lora_B(lora_A(x)) unscaled); F_t is written in begin_task
        return LoRA(
            d_in, d_out, rank, target=target, down=torch.zeros(rank, d_in), train_down=False
        )

    def train_slot(self, slot: int) -> None:
        for _, adapter in self.model.adapters[slot].items():
            assert isinstance(adapter, LoRA)
            adapter.up.requires_grad_(True)  # G_t only

    def active_deltas(self, task: int, train: bool) -> dict[int, LayerDelta]:
        return slot_deltas(list(self.model.adapters[: task + 1]))

    # -- the input subspace --------------------------------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        covariances = self.input_covariances(task)  # branches 0..task-1 on (task's G is 0)
        with torch.no_grad():
            for layer, covariance in covariances.items():
                projected = self.memory.project(layer, covariance)
                u, _, _ = torch.linalg.svd(projected, full_matrices=False)
                design = (u[:, : self.config.rank].T / math.sqrt(3)).float()
                for target in self.config.lora_targets:
                    adapter = self.model.adapters[task][layer, target]
                    assert isinstance(adapter, LoRA)
                    adapter.down.copy_(design.to(adapter.down.device))
        super().begin_task(task, classes)

    def end_task(self, task: int, classes: list[int]) -> None:
        super().end_task(task, classes)
        c = self.config
        total = max(self.num_tasks or 1, task + 1)
        threshold = c.threshold + (c.threshold_end - c.threshold) * task / total
        self.memory.update(self.input_covariances(task + 1), threshold)

    def input_covariances(self, branches: int) -> dict[int, Tensor]:
        """Per adapted layer, the mean of x x^T over the current experience's training
        tokens, x the attention input, with branches 0..``branches - 1`` on."""
        width = self.encoder.embed_dim
        sums = {
            layer: torch.zeros(width, width, dtype=torch.float64) for layer in self.adapter_layers
        }
        counts = dict.fromkeys(sums, 0)
        pad = getattr(self.encoder, "pad_token_id", None)
        tap_target = self.config.lora_targets[0]
        token_mask: list[Tensor | None] = [None]

        def tap_for(layer: int) -> Any:
            def tap(x: Tensor) -> None:
                tokens = x.detach().double()
                mask = token_mask[0]
                if mask is not None:
                    tokens = tokens[mask[:, : tokens.shape[1]]]
                tokens = tokens.reshape(-1, width)
                sums[layer] += (tokens.T @ tokens).cpu()
                counts[layer] += tokens.shape[0]

            return tap

        taps = {layer: LayerDelta(taps={tap_target: tap_for(layer)}) for layer in sums}
        deltas = merge_deltas(self.active_deltas(branches - 1, train=False), taps)

        def observe(x: Tensor) -> Tensor:
            token_mask[0] = (x != pad) if pad is not None and x.dtype == torch.long else None
            self.adapted_features(x, deltas)
            return x.new_zeros(len(x), 1, dtype=torch.float32)

        was_training = self.model.training
        self.model.eval()
        extract_features(
            observe,
            self.experience.dataset.eval(),
            batch_size=self.config.eval_batch_size,
            device=self.device,
            num_workers=self.config.num_workers,
            label="InfLoRA: input covariance",
        )
        self.model.train(was_training)
        return {layer: sums[layer] / max(counts[layer], 1) for layer in sums}

    # -- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])

"""A null-space LoRA in the spirit of NuSA-CL (Jo & Kim, ICLR 2026; code ZoYujin/NuSA-CL).

Per task and per adapted projection (query, key, value and output of every block):

1. take the SVD of the *current merged* weight W_t = W_0 + dW_acc = U S V^T;
2. its principal rank p is the smallest k with sum_{i<=k} s_i^2 / sum s^2 >= rho; the
   effective rank is e = min(n - p, r);
3. freeze A = the last e rows of V^T and B = the last e columns of U (the weight's
   lowest-energy directions) and train only M (r x r, zero at the start):
   dW = s B M A with s = alpha / sqrt(r);
4. at the task's end merge dW into dW_acc (a frozen offset beside the shared encoder,
   :class:`clbench.adapters.MergedOffsets`) and start again from the merged weight.

Nothing is stored beyond the merged model, the trained size is fixed (r^2 per
projection) and there is no task identity. Where e < r the unused rows of A and columns
of B are zero, so those entries of M get no gradient. The paper is on CLIP (both
encoders, a text-embedding head with label smoothing); here, on clbench's encoders, a
linear head over every class reads the adapted feature, trained on the task's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from clbench.adapters import LoRA, LowRankAdapter, MergedOffsets
from clbench.config import option
from clbench.encoders.deltas import LayerDelta, merge_deltas
from clbench.registry import STRATEGIES
from clbench.strategies.task_lora import CPU_FULL, CPU_QUICK, LowRankConfig, LowRankStrategy
from clbench.strategy import StrategyModel
from clbench.subspace import principal_count


@dataclass
class NuSALoRAConfig(LowRankConfig):
    lora_targets: list[str] = option(["q", "k", "v", "o"], "adapted projections")
    rank: int = option(128, "rank of the null-space adapter", symbol="r")
    alpha: float = option(2.0, "scale s = alpha / sqrt(r)", symbol="alpha")
    energy: float = option(0.95, "energy of the principal subspace left alone", symbol="rho")
    lora_dropout: float = option(0.25, "dropout on the adapter's input while training")
    # scripts/run_mtil.sh: AdamW lr 3e-4 with cosine and warm-up, batch 16
    lr: float = option(3e-4, "learning rate of M and the head", symbol="eta")
    batch_size: int = option(16, "training mini-batch size")
    epochs: int = option(3, "epochs per experience")
    lr_schedule: Literal["constant", "cosine", "step"] = option("cosine", "lr schedule")


# scripts/run_mtil.sh (CLIP ViT-B/16 on MTIL, 1000 iterations of batch 16 per task): no
# published number on these benchmarks. Carried over: r, alpha, dropout, rho, lr, batch and
# the cosine schedule (clbench's Adam without warm-up stands in for AdamW); 3 epochs is
# about 1000 iterations of 16 on a 5,000-image CIFAR-100 task.
AUTHORS: dict[str, Any] = {"rank": 128, "alpha": 2.0, "energy": 0.95, "lora_dropout": 0.25,
                           "lr": 3e-4, "batch_size": 16, "epochs": 3, "optimizer": "adam",
                           "lr_schedule": "cosine"}  # fmt: skip


@STRATEGIES.register(
    "nusa-lora", "null-space LoRA (NuSA-CL): train an r x r core in each weight's minor subspace"
)
class NuSALoRA(LowRankStrategy):
    Config = NuSALoRAConfig
    presets = {
        "quick": {**CPU_QUICK, "rank": 16},
        "fewrel-offline": {**CPU_FULL, "rank": 16},
        "digits-offline": {"epochs": 2, "batch_size": 32, "lr": 0.01, "rank": 4},
        "authors:split-cifar100": AUTHORS,
        "authors:imagenet-r": AUTHORS,
    }
    config: NuSALoRAConfig

    def num_adapter_sets(self) -> int:
        return 1  # one adapter, re-designed every task from the merged weight

    def setup(self, model: StrategyModel) -> None:
        super().setup(model)
        model.offsets = MergedOffsets(self.encoder, self.adapter_layers, self.config.lora_targets)

    def make_adapter(self, weight: Tensor, layer: int, target: str, slot: int) -> LowRankAdapter:
        c = self.config
        d_out, d_in = weight.shape
        return LoRA(d_in, d_out, c.rank, target=target, alpha=c.alpha, rslora=True,
                    dropout=c.lora_dropout, down=torch.zeros(c.rank, d_in),
                    up=torch.zeros(d_out, c.rank), train_down=False, train_up=False,
                    middle=torch.zeros(c.rank, c.rank))  # fmt: skip

    def train_slot(self, slot: int) -> None:
        for _, adapter in self.model.adapters[slot].items():
            assert isinstance(adapter, LoRA) and adapter.middle is not None
            adapter.middle.requires_grad_(True)  # M only

    def begin_task(self, task: int, classes: list[int]) -> None:
        """Frozen bases from the merged weight's minor singular directions; M = 0."""
        offsets: MergedOffsets = self.model.offsets
        with torch.no_grad():
            for layer, adapter in self.model.adapters[0].items():
                assert isinstance(adapter, LoRA) and adapter.middle is not None
                target = adapter.target
                merged = self.encoder.projection_weight(layer, target).double()
                merged = merged + offsets.offset(layer, target).double().to(merged.device)
                u, s, vh = torch.linalg.svd(merged, full_matrices=False)
                null = len(s) - principal_count(s, self.config.energy)
                effective = min(null, adapter.rank)
                adapter.down.zero_()
                adapter.up.zero_()
                adapter.middle.zero_()
                if effective > 0:
                    adapter.down[:effective] = vh[len(s) - effective :].float()
                    adapter.up[:, :effective] = u[:, len(s) - effective :].float()
        super().begin_task(task, classes)

    def end_task(self, task: int, classes: list[int]) -> None:
        super().end_task(task, classes)
        adapters = self.model.adapters[0]
        self.model.offsets.absorb(adapters)  # dense B M A: no dropout in it
        with torch.no_grad():
            for _, adapter in adapters.items():
                assert isinstance(adapter, LoRA) and adapter.middle is not None
                adapter.middle.zero_()  # merged: the adapter adds nothing until re-designed

    def active_deltas(self, task: int, train: bool) -> dict[int, LayerDelta]:
        # after end_task the adapter's M is zero and adds exactly nothing
        return merge_deltas(self.model.offsets.deltas(), self.model.adapters[0].deltas())

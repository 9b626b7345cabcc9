"""Bounds for every table: a linear classifier on the frozen encoder's features.

* ``seq-ft`` trains it task after task with nothing against forgetting: cross-entropy
  over all classes pushes the old classes' logits down (the lower bound).
* ``joint`` trains it on the union of every experience's data seen so far, so after the
  last experience it is one model trained on all tasks at once (the upper bound of a
  classifier on these features). It stores data: it is a reference, not a CL method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from avalanche.benchmarks.utils import concat_datasets
from torch import Tensor, nn

from clbench.config import option
from clbench.registry import STRATEGIES
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel


@dataclass
class LinearProbeConfig(StrategyConfig):
    lr: float = option(1e-3, "learning rate of the classifier", symbol="eta")


class _LinearProbe(CLStrategy):
    Config = LinearProbeConfig

    def setup(self, model: StrategyModel) -> None:
        model.head = nn.Linear(self.encoder.feature_dim, self.num_classes)

    def train_logits(self, x: Tensor) -> Tensor:
        return self.model.head(self.encoder.query(x))

    def predict(self, x: Tensor) -> Tensor:
        return self.mask_unseen(self.model.head(self.encoder.query(x)))


@STRATEGIES.register("seq-ft", "lower bound: a linear classifier on frozen features, trained task after task")
class SequentialFineTuning(_LinearProbe):
    name = "seq-ft"
    presets = {
        "quick": {"epochs": 1, "batch_size": 32},
        "fewrel-offline": {"epochs": 3, "batch_size": 32, "lr": 1e-3},
        "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 1e-3},
    }


@STRATEGIES.register("joint", "upper bound: a linear classifier on frozen features, trained on all data seen so far")
class Joint(_LinearProbe):
    name = "joint"
    presets = SequentialFineTuning.presets

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen_datasets: list[Any] = []

    def begin_task(self, task: int, classes: list[int]) -> None:
        if task == len(self._seen_datasets):
            self._seen_datasets.append(self.experience.dataset)

    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        super().train_dataset_adaptation(**kwargs)
        self.adapted_dataset = concat_datasets(self._seen_datasets).train()

    def training_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        # cross-entropy over every class seen so far: the joint model knows them all
        return nn.functional.cross_entropy(self.mask_unseen(logits), targets)

    def extra_state(self) -> dict[str, Any]:
        return {"seen_datasets": self._seen_datasets}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._seen_datasets = list(state["seen_datasets"])

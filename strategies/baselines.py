"""Bounds for every table: a linear classifier on the frozen encoder's features.

* ``seq-ft`` trains it task after task with nothing against forgetting: cross-entropy
  over all classes pushes the old classes' logits down (the lower bound).
* ``joint-linear`` trains it on the union of every experience seen so far, so after the
  last experience it is one model trained on all tasks at once (the upper bound of a
  classifier on these features). It keeps the features of past data: it is a
  reference, not a continual-learning method. It was ``joint`` until ``joint`` trained
  the prompt methods' own parts (strategies/joint.py, where ``trainable=head`` is this).

The encoder is frozen, so each training item's feature is computed once per experience
(one pass over the un-augmented inputs) and the epochs run on the features alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks.utils import as_classification_dataset
from torch import Tensor, nn

from clbench.config import option
from clbench.consolidation import extract_features
from clbench.registry import STRATEGIES
from clbench.scenario import TensorClassificationDataset
from clbench.strategies.quick import QUICK_DATA
from clbench.strategy import CLStrategy, StrategyConfig, StrategyModel, TrainOutput


@dataclass
class LinearProbeConfig(StrategyConfig):
    lr: float = option(1e-3, "learning rate of the classifier", symbol="eta")


class _LinearProbe(CLStrategy):
    Config = LinearProbeConfig
    presets = {
        # one epoch at batch 8 and a 10x rate: 36 steps a digits task (9 at batch 32 left
        # the head at chance on the random tiny ViT's features), 8 a fewrel-offline one
        "quick": {"epochs": 1, "batch_size": 8, "lr": 0.01, **QUICK_DATA},
        "fewrel-offline": {"epochs": 3, "batch_size": 32, "lr": 1e-3},
        "digits-offline": {"epochs": 3, "batch_size": 32, "lr": 1e-3},
    }

    def setup(self, model: StrategyModel) -> None:
        model.head = nn.Linear(self.encoder.feature_dim, self.num_classes)

    def experience_features(self) -> TensorClassificationDataset:
        """The frozen features and labels of the current experience's training items."""
        features, labels = extract_features(
            self.query,
            self.experience.dataset.eval(),
            batch_size=self.config.eval_batch_size,
            device=self.device,
            num_workers=self.config.num_workers,
        )
        return TensorClassificationDataset(features, labels)

    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        super().train_dataset_adaptation(**kwargs)
        self.adapted_dataset = as_classification_dataset(self.training_features())

    def training_features(self) -> TensorClassificationDataset:
        return self.experience_features()

    def train_logits(self, x: Tensor) -> Tensor:
        return self.model.head(x)  # training batches are features already

    def predict(self, x: Tensor) -> Tensor:
        return self.model.head(self.query(x))


@STRATEGIES.register(
    "seq-ft", "lower bound: a linear classifier on frozen features, trained task after task"
)
class SequentialFineTuning(_LinearProbe):
    """The lower bound: nothing against forgetting."""


@STRATEGIES.register(
    "joint-linear",
    "upper bound of a linear probe: a linear classifier on frozen features, trained on all "
    "data seen so far",
)
class JointLinear(_LinearProbe):
    """The linear probe's upper bound: trains on the features of every experience seen so far."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen_features: list[TensorClassificationDataset] = []

    def training_features(self) -> TensorClassificationDataset:
        if self.current_task == len(self._seen_features):
            self._seen_features.append(self.experience_features())
        parts = self._seen_features
        return TensorClassificationDataset(
            torch.cat([p.inputs for p in parts]), torch.cat([p.labels for p in parts])
        )

    def training_loss(self, output: TrainOutput, targets: Tensor) -> Tensor:
        # cross-entropy over every class seen so far: the joint model knows them all
        return nn.functional.cross_entropy(self.mask_unseen(output.logits), targets)

    def extra_state(self) -> dict[str, Any]:
        return {"seen_features": [(p.inputs, p.labels) for p in self._seen_features]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._seen_features = [TensorClassificationDataset(x, y) for x, y in state["seen_features"]]

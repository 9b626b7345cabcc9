"""Consolidation without stored data: class-wise Gaussians of features, and heads refit
on samples of them (HiDe-Prompt, NoRGa, hier-ot, WAVE-CRE).

* :mod:`~clbench.consolidation.statistics`: ``ClassStatistics``, ``extract_features``;
* :mod:`~clbench.consolidation.heads`: the heads and their one training loop;
* :mod:`~clbench.consolidation.gaussian`: ``GaussianConsolidation``, the component a
  strategy holds (two statistics, the end-of-task pass, refits, checkpoint state).
"""

from clbench.consolidation.gaussian import GaussianConsolidation
from clbench.consolidation.heads import (
    RelationMLP,
    TaskIdentityHead,
    fit_head,
    reset_linear_layers,
    train_on_feature_passes,
    train_on_features,
    train_on_samples,
)
from clbench.consolidation.statistics import ClassStatistics, extract_features

__all__ = [
    "ClassStatistics",
    "GaussianConsolidation",
    "RelationMLP",
    "TaskIdentityHead",
    "extract_features",
    "fit_head",
    "reset_linear_layers",
    "train_on_feature_passes",
    "train_on_features",
    "train_on_samples",
]

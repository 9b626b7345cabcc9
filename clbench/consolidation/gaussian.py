"""Gaussian consolidation: what HiDe-Prompt, NoRGa, hier-ot and WAVE-CRE keep of a task.

After each task these methods store, per class, a Gaussian of the frozen encoder's
un-prompted *query* features (for the task-identity / task-predictor head) and one of the
*prompted* features (for the classifier), and retrain those heads on samples of every
seen class: no example of a past task is kept. :class:`GaussianConsolidation` owns that
shared part: the two :class:`ClassStatistics`, the end-of-task feature pass (at the
strategy's precision, like an evaluation), the sample-trained refits and the checkpoint
state. What differs between the methods (which prompt makes the prompted feature, which
heads, which recipe) stays in the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from clbench.consolidation.heads import train_on_samples
from clbench.consolidation.statistics import ClassStatistics, class_batches, extract_features

if TYPE_CHECKING:
    from clbench.strategy import CLStrategy

# (inputs x, their query features) -> the prompted features of x, [B, D]
PromptedFeatures = Callable[[Tensor, Tensor], Tensor]


class GaussianConsolidation:
    """Class-wise statistics of query and prompted features, fitted at the end of a task.

    ``mode``, ``shrinkage`` and ``num_centroids`` are those of :class:`ClassStatistics`;
    both statistics use the same.
    """

    def __init__(
        self,
        dim: int,
        mode: Literal["covariance", "centroids"] = "covariance",
        *,
        shrinkage: float = 1e-4,
        num_centroids: int = 10,
    ) -> None:
        def statistics() -> ClassStatistics:
            return ClassStatistics(dim, mode, shrinkage=shrinkage, num_centroids=num_centroids)

        self.query_statistics = statistics()
        self.prompted_statistics = statistics()

    def fit_task(
        self,
        strategy: CLStrategy,
        prompted: PromptedFeatures,
        *,
        forget_queries: bool = False,
        per_class_batches: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One pass over the current experience's training items (un-augmented, in order):
        fit both statistics of its classes; return the query features, the prompted
        features and the labels (on the CPU, fp32).

        ``per_class_batches``: batches of one class each, in a random order, as the
        HiDe / NoRGa code's per-class loaders give them (for a prompt layout that mixes
        the samples of a batch, ``prefix_layout=authors_batch_mix``, what a feature is
        depends on its batch); features and labels then come back in that order.

        The pass costs as much as an evaluation, so it runs at the same precision (the
        strategy's autocast); the statistics (means, covariances) accumulate in fp32.
        ``forget_queries`` drops the items from the strategy's query cache afterwards, so
        that nothing per-example of the task is kept, features included (WAVE-CRE).
        """
        fingerprints: list[Tensor] = []

        def query_and_prompted(x: Tensor) -> tuple[Tensor, Tensor]:
            if forget_queries:
                keys = strategy.query_cache.fingerprint(x)
                if keys is not None:
                    fingerprints.append(keys)
            with strategy.autocast():
                query = strategy.query(x)
                return query.float(), prompted(x, query).float()

        dataset = strategy.experience.dataset.eval()
        batch_size = strategy.config.eval_batch_size
        batches = None
        if per_class_batches:
            targets = torch.as_tensor(list(dataset.targets))
            batches = class_batches(targets, batch_size)
        features, labels = extract_features(
            query_and_prompted,
            dataset,
            batch_size=batch_size,
            device=strategy.device,
            num_workers=strategy.config.num_workers,
            label="computing features for the class statistics",
            batches=batches,
        )
        query, prompted_features = features
        self.query_statistics.update(query, labels)
        self.prompted_statistics.update(prompted_features, labels)
        if fingerprints:
            strategy.query_cache.forget(torch.cat(fingerprints))
        return query, prompted_features, labels

    def refit(
        self,
        head: nn.Module,
        features: Literal["query", "prompted"],
        classes: list[int],
        **recipe: Any,
    ) -> None:
        """Retrain ``head`` on samples of ``classes`` from the query or the prompted
        statistics; ``recipe`` holds :func:`train_on_samples`'s settings."""
        statistics = self.query_statistics if features == "query" else self.prompted_statistics
        train_on_samples(head, statistics, classes, **recipe)

    def state_dict(self) -> dict[str, Any]:
        return {
            "query_statistics": self.query_statistics.state_dict(),
            "prompted_statistics": self.prompted_statistics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.query_statistics.load_state_dict(state["query_statistics"])
        self.prompted_statistics.load_state_dict(state["prompted_statistics"])

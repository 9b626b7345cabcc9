"""Class-wise Gaussian feature statistics, and the feature pass that fits them.

After a task, the features of each new class are summarised as a Gaussian (full
covariance + shrinkage * I), or as k centroids with diagonal variances; later, heads are
(re)trained on samples of every seen class (:mod:`clbench.consolidation.heads`), so no
example of a past task is kept. Everything is batched over classes: sampling is one call,
not a loop over classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from torch import Tensor

from clbench.progress import counted, progress


class ClassStatistics:
    """Per-class feature distributions.

    mode="covariance": mean and full covariance (+ ``shrinkage`` * I), sampled as a
        multivariate normal (HiDe-Prompt's default; WAVE-CRE's).
    mode="centroids": ``num_centroids`` k-means centroids per class, each with a diagonal
        variance; a sample picks a centroid uniformly (HiDe-Prompt's multi-centroid mode).
    """

    def __init__(
        self,
        dim: int,
        mode: Literal["covariance", "centroids"] = "covariance",
        *,
        shrinkage: float = 1e-4,
        num_centroids: int = 10,
    ) -> None:
        if mode not in ("covariance", "centroids"):
            raise ValueError(f"unknown statistics mode {mode!r}; valid: covariance, centroids")
        self.dim = dim
        self.mode = mode
        self.shrinkage = shrinkage
        self.num_centroids = num_centroids
        # class id -> tensors on the CPU (moved to the sampling device on demand)
        self.means: dict[int, Tensor] = {}
        self.scales: dict[int, Tensor] = {}  # cholesky factor [D, D] or std [k, D]
        self.centroids: dict[int, Tensor] = {}

    @property
    def classes(self) -> list[int]:
        return sorted(self.means)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Fit (or refit) the statistics of every class present in ``labels``.

        Quiet unless slow (k-means over many classes): then a bar, or a line every 30 s.
        """
        features = features.detach().double().cpu()
        labels = labels.cpu()
        classes = labels.unique().tolist()
        label = f"fitting class statistics ({self.mode}, dim {self.dim})"
        with progress(len(classes), label, unit="classes", start_line=False, end_line=False) as bar:
            for class_id in counted(classes, bar):
                self._fit_class(class_id, features[labels == class_id])

    def _fit_class(self, class_id: int, rows: Tensor) -> None:
        self.means[class_id] = rows.mean(0).float()
        if self.mode == "covariance":
            centred = rows - rows.mean(0)
            covariance = centred.T @ centred / max(len(rows) - 1, 1)
            covariance += self.shrinkage * torch.eye(self.dim, dtype=covariance.dtype)
            self.scales[class_id] = torch.linalg.cholesky(covariance).float()
        else:
            centroids, stds = _kmeans_with_spread(rows, self.num_centroids)
            self.centroids[class_id] = centroids.float()
            self.scales[class_id] = stds.float()

    def class_means(self, classes: list[int], device: Any = "cpu") -> Tensor:
        if not classes:
            return torch.empty(0, self.dim, device=device)
        return torch.stack([self.means[c] for c in classes]).to(device)

    def sample(
        self,
        classes: list[int],
        per_class: int,
        *,
        device: Any = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``per_class`` samples of every class in ``classes``: features [n, D], labels [n]."""
        missing = [c for c in classes if c not in self.means]
        if missing:
            raise KeyError(f"no statistics for classes {missing}")
        labels = torch.tensor(classes).repeat_interleave(per_class)
        noise = torch.randn(len(classes), per_class, self.dim, generator=generator)
        if self.mode == "covariance":
            means = torch.stack([self.means[c] for c in classes])  # [C, D]
            factors = torch.stack([self.scales[c] for c in classes])  # [C, D, D]
            samples = means[:, None] + noise @ factors.transpose(1, 2)
        else:
            centroids = torch.stack([self.centroids[c] for c in classes])  # [C, k, D]
            stds = torch.stack([self.scales[c] for c in classes])
            pick = torch.randint(centroids.shape[1], (len(classes), per_class), generator=generator)
            chosen = torch.gather(centroids, 1, pick[..., None].expand(-1, -1, self.dim))
            spread = torch.gather(stds, 1, pick[..., None].expand(-1, -1, self.dim))
            samples = chosen + noise * spread
        return samples.reshape(-1, self.dim).to(device), labels.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "dim": self.dim,
            "shrinkage": self.shrinkage,
            "num_centroids": self.num_centroids,
            "means": self.means,
            "scales": self.scales,
            "centroids": self.centroids,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode or state["dim"] != self.dim:
            raise RuntimeError(
                f"class statistics of mode {state['mode']} / dim {state['dim']} do not match "
                f"{self.mode} / {self.dim}"
            )
        self.means, self.scales = dict(state["means"]), dict(state["scales"])
        self.centroids = dict(state["centroids"])


def _kmeans_with_spread(rows: Tensor, k: int, iterations: int = 20) -> tuple[Tensor, Tensor]:
    """k-means (deterministic init: evenly spaced rows) -> centroids [k, D], stds [k, D]."""
    k = min(k, len(rows))
    centroids = rows[torch.linspace(0, len(rows) - 1, k).long()].clone()
    for _ in range(iterations):
        assignment = torch.cdist(rows, centroids).argmin(1)
        for j in range(k):
            members = rows[assignment == j]
            if len(members):
                centroids[j] = members.mean(0)
    assignment = torch.cdist(rows, centroids).argmin(1)
    stds = torch.stack(
        [
            rows[assignment == j].std(0, unbiased=False)
            if (assignment == j).sum() > 1
            else torch.zeros(rows.shape[1], dtype=rows.dtype)
            for j in range(k)
        ]
    )
    return centroids, stds


def class_batches(labels: Tensor, batch_size: int) -> list[list[int]]:
    """Batches of at most ``batch_size`` items of one class each, every class's items in a
    random order: what per-class loaders with a random sampler yield (HiDe / NoRGa's
    statistics pass, ``dataloader_per_cls[c]['train']``)."""
    batches = []
    for label in labels.unique().tolist():
        items = torch.nonzero(labels == label).flatten()
        items = items[torch.randperm(len(items))]
        batches += [chunk.tolist() for chunk in items.split(batch_size)]
    return batches


@overload
def extract_features(
    feature_fn: Callable[[Tensor], Tensor],
    dataset: Any,
    *,
    batch_size: int,
    device: Any,
    num_workers: int = 0,
    label: str = ...,
    batches: list[list[int]] | None = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def extract_features(
    feature_fn: Callable[[Tensor], tuple[Tensor, ...]],
    dataset: Any,
    *,
    batch_size: int,
    device: Any,
    num_workers: int = 0,
    label: str = ...,
    batches: list[list[int]] | None = ...,
) -> tuple[tuple[Tensor, ...], Tensor]: ...


@torch.no_grad()
def extract_features(
    feature_fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]],
    dataset: Any,
    *,
    batch_size: int,
    device: Any,
    num_workers: int = 0,
    label: str = "computing features",
    batches: list[list[int]] | None = None,
) -> tuple[Tensor | tuple[Tensor, ...], Tensor]:
    """Run ``feature_fn`` over a dataset (in order, no shuffling): features, labels.

    ``feature_fn`` may return several feature tensors per batch (e.g. the query and the
    prompted feature from one pass over the data); they come back as a tuple. The pass
    costs as much as an evaluation, so it says so (``label``) with a progress bar / lines.
    ``batches`` (lists of item indices) replaces the in-order batches of ``batch_size``.
    """
    if batches is not None:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers
        )
    else:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
    outputs: list[Any] = []
    labels = []
    with progress(len(dataset), label) as bar:
        for batch in loader:
            x, y = batch[0].to(device), batch[1]
            result = feature_fn(x)
            outputs.append(
                tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()
            )
            labels.append(y.cpu())
            bar.update(len(y))
    if outputs and isinstance(outputs[0], tuple):
        features: Any = tuple(torch.cat(parts) for parts in zip(*outputs))
    else:
        features = torch.cat(outputs)
    return features, torch.cat(labels)

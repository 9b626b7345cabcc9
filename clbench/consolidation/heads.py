"""Heads trained on features rather than inputs, with one mini-batch loop for all of them.

HiDe-Prompt, NoRGa, hier-ot and WAVE-CRE (re)train small heads after each task on
Gaussian samples of every seen class (:func:`train_on_samples`), and HiDe also fits its
task-identity head on a task's fixed un-prompted features (:func:`train_on_features`).
Both go through :func:`fit_head`: fresh data (samples, or the same features) every
epoch, a random order, masked cross-entropy, one optimizer step per mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.consolidation.statistics import ClassStatistics
from clbench.progress import track

# What one epoch trains on: features [n, D] and labels [n], on the training device.
EpochData = Callable[[], tuple[Tensor, Tensor]]


def fit_head(
    module: nn.Module,
    epoch_data: EpochData,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    scheduler: Any = None,
    logits_fn: Callable[[Tensor], Tensor] | None = None,
    allowed: Tensor | None = None,
    steps_per_epoch: int | None = None,
    grad_clip: float = 0.0,
) -> None:
    """Cross-entropy training of ``module`` for ``epochs`` epochs of ``epoch_data()``.

    ``allowed`` (bool [num_classes]) masks the logits to those classes (lowest finite
    value elsewhere, so the loss stays finite); ``steps_per_epoch`` stops an epoch early
    (HiDe's code: one step per old class); ``scheduler`` is stepped after each epoch;
    ``grad_clip`` > 0 clips the gradient norm of each step to it.
    """
    forward = logits_fn or module
    module.train()
    label = "training a head on features"  # quiet unless slow: no start or end line
    for _ in track(range(epochs), label, unit="epochs", start_line=False, end_line=False):
        features, labels = epoch_data()
        order = torch.randperm(len(labels), device=features.device)
        starts = range(0, len(order), batch_size)
        if steps_per_epoch is not None:
            starts = starts[:steps_per_epoch]
        for start in starts:
            batch = order[start : start + batch_size]
            logits = forward(features[batch])
            if allowed is not None:
                logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    module.eval()


def train_on_samples(
    module: nn.Module,
    statistics: ClassStatistics,
    classes: list[int],
    *,
    epochs: int,
    samples_per_class: int,
    lr: float,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: Any = "cpu",
    logits_fn: Callable[[Tensor], Tensor] | None = None,
    allowed: Tensor | None = None,
    steps_per_epoch: int | None = None,
    optimizer_name: Literal["sgd", "adam"] = "sgd",
) -> None:
    """(Re)train ``module`` on Gaussian samples of ``classes``: SGD with momentum, cosine.

    The recipe HiDe-Prompt uses for its task-adaptive head and its task-identity
    alignment; fresh samples every epoch. ``allowed`` (bool [num_classes]) masks the
    logits to the seen classes. ``optimizer_name="adam"`` uses Adam instead of SGD (the
    WAVE-CRE authors' code trains its heads on samples with Adam; momentum is then unused).
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    if optimizer_name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(
            parameters, lr=lr, weight_decay=weight_decay
        )
    elif optimizer_name == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; valid: sgd, adam")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))

    def samples() -> tuple[Tensor, Tensor]:
        return statistics.sample(classes, samples_per_class, device=device)

    fit_head(
        module, samples, optimizer, epochs=epochs, batch_size=batch_size, scheduler=scheduler,
        logits_fn=logits_fn, allowed=allowed, steps_per_epoch=steps_per_epoch,
    )  # fmt: skip


def train_on_features(
    module: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    allowed: Tensor | None = None,
    grad_clip: float = 0.0,
) -> None:
    """Train every parameter of ``module`` on fixed ``features`` with Adam, constant lr
    (HiDe-Prompt's task-identity head on one task's un-prompted features)."""
    train_on_feature_passes(
        module, lambda: (features, labels), epochs=epochs, lr=lr, batch_size=batch_size,
        allowed=allowed, grad_clip=grad_clip,
    )  # fmt: skip


def train_on_feature_passes(
    module: nn.Module,
    epoch_data: EpochData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    allowed: Tensor | None = None,
    grad_clip: float = 0.0,
) -> None:
    """:func:`train_on_features` on new features every epoch: ``epoch_data()`` gives them
    (e.g. a pass over augmented training images, as the HiDe / NoRGa code trains TII)."""
    module.requires_grad_(True)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    fit_head(
        module, epoch_data, optimizer, epochs=epochs, batch_size=batch_size, allowed=allowed,
        grad_clip=grad_clip,
    )  # fmt: skip


class TaskIdentityHead(nn.Module):
    """HiDe's auxiliary classifier: MLP D-2D-D with a residual and LayerNorm, then linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.norm(features + self.mlp(features)))


class RelationMLP(nn.Module):
    """WAVE-CRE's heads: Linear(Dq, D) - ReLU - Linear(D, D) - ReLU - Linear(D, C)."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def reset_linear_layers(module: nn.Module) -> None:
    """Fresh random weights for every linear layer of ``module`` (a head refit from scratch)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()

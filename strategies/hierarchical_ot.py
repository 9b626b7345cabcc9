"""Hierarchical label taxonomy + optimal transport on HiDe-Prompt (arXiv 2410.04327).

HiDe-Prompt (task prefixes, task-identity inference, Gaussian head consolidation) with a
label tree over the classes seen so far, whose leaf groups hold classes that are easily
confused. While a task trains, the loss is

    CE + HiDe's contrastive term + reg_glob * SupCon(all features)
       + reg_sub * mean over leaf groups g of SupCon(features of g)

with temperature 0.1 on L2-normalised prompted features. With the OT weighting on, the
within-group similarity logits are multiplied by Gamma[y_i, y_j] = exp(-W[y_i, y_j] / delta),
W the OT distance between the classes' frozen-feature distributions (clbench.ot_distance):
pairs of close classes keep their full logit, far ones fade to 0. Pseudo-features of old
classes, sampled from the stored prompted-feature statistics, join the contrastive batch,
so the new classes are pushed away from the old ones they resemble (the authors meant to
do this; in their code the sample buffer is never filled).

The tree (clbench.taxonomy) comes from a file, from CIFAR-100's superclasses, or from
agglomerative clustering of the OT distances; it is rebuilt over the seen classes when a
task begins. Optional test-time step: probabilities rescaled per leaf group by an energy
score exp(eta_0 * best logit in the group - eta * Gamma-weighted Mahalanobis distance of
the feature to the group's classes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.config import option
from clbench.consolidation import extract_features
from clbench.errors import UsageError
from clbench.ot_distance import ClassDistances
from clbench.registry import STRATEGIES
from clbench.strategies.hide_prompt import HIDE_PRESETS, HiDePrompt, HiDePromptConfig
from clbench.strategy import Prediction, StrategyModel, TrainOutput
from clbench.taxonomy import (
    Taxonomy,
    cifar100_superclasses,
    cluster_taxonomy,
    load_taxonomy_file,
    number_of_groups,
)

TREE_SOURCES = ("auto", "cifar100-superclasses")


@dataclass
class HierarchicalOTConfig(HiDePromptConfig):
    taxonomy: str = option(
        "auto",
        "label tree: auto (clustering of OT class distances), "
        "cifar100-superclasses, or a JSON / YAML file of nested groups of class names",
    )
    reg_glob: float = option(
        0.001,
        "weight of SupCon over all features (0.001 CIFAR, 0.002 ImageNet-R)",
        symbol="reg_glob",
    )
    reg_sub: float = option(
        0.01,
        "weight of the mean within-leaf-group SupCon (0.01 CIFAR, 0.015 ImageNet-R)",
        symbol="reg_sub",
    )
    supcon_temperature: float = option(0.1, "SupCon temperature", symbol="tau")
    pseudo_features: int = option(
        640,
        "old-class pseudo-features in each step's contrastive "
        "batch (5 x batch in the authors' code; 0: none)",
    )
    ot_weighting: bool = option(
        True, "multiply the within-group SupCon logits by Gamma = exp(-W / delta)"
    )
    ot_delta: float = option(
        100.0,
        "delta of Gamma = exp(-W / delta) (<= 0: the median distance between seen classes)",
        symbol="delta",
    )
    ot_samples: int = option(
        256,
        "samples per class, drawn from its frozen-feature statistics, "
        "between which the OT distance is computed",
    )
    ot_solver: Literal["emd", "sinkhorn"] = option(
        "emd", "exact EMD (network simplex) or entropic OT batched over pairs"
    )
    sinkhorn_reg: float = option(
        0.05, "ot_solver=sinkhorn: entropic regularisation relative to the mean cost"
    )
    group_size: float = option(4.0, "taxonomy=auto: about this many classes per leaf group")
    linkage: Literal["average", "complete", "single", "weighted"] = option(
        "average", "taxonomy=auto: linkage of the agglomerative clustering"
    )
    eval_rescale: bool = option(
        False,
        "test time: rescale within each leaf group by an energy "
        "score with a Mahalanobis distance to the class statistics",
    )
    energy_eta0: float = option(
        1.0, "energy score: weight of the group's best logit", symbol="eta_0"
    )
    energy_eta: float = option(
        0.1, "energy score: weight of the group's Mahalanobis distance", symbol="eta"
    )


def supcon(similarity: Tensor, labels: Tensor, groups: Tensor | None = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) from similarity logits [N, N].

    For anchor i with positives P(i) (same label, j != i) and contrast set A(i) (j != i):
    l_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip) / sum_{a in A(i)} exp(s_ia)); the loss is
    the mean of l_i over anchors that have a positive. With ``groups`` ([N] group ids) A(i)
    and P(i) are restricted to i's group, and the loss is the mean over groups of the mean
    l_i in the group (groups without a positive pair do not count). The authors' code
    keeps i in its own denominator and averages over pairs; we follow the SupCon paper.
    """
    n = len(labels)
    allowed = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    if groups is not None:
        allowed &= groups[:, None] == groups[None, :]
    positive = allowed & (labels[:, None] == labels[None, :])
    # a finite floor, not -inf: an anchor alone in its group must not make NaN gradients
    logits = similarity.masked_fill(~allowed, torch.finfo(similarity.dtype).min)
    log_prob = logits - logits.logsumexp(1, keepdim=True)
    counts = positive.sum(1)
    anchor_loss = -log_prob.masked_fill(~positive, 0.0).sum(1) / counts.clamp_min(1)
    has_positive = counts > 0
    if not has_positive.any():
        return similarity.sum() * 0.0
    if groups is None:
        return anchor_loss[has_positive].mean()
    _, group_of_anchor = torch.unique(groups[has_positive], return_inverse=True)
    size = int(group_of_anchor.max()) + 1
    totals = torch.zeros(size, dtype=anchor_loss.dtype, device=anchor_loss.device)
    totals.index_add_(0, group_of_anchor, anchor_loss[has_positive])
    members = torch.bincount(group_of_anchor, minlength=size).to(anchor_loss.dtype)
    return (totals / members).mean()


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {**HIDE_PRESETS["quick"], "pseudo_features": 160},
    "digits-offline": {**HIDE_PRESETS["digits-offline"], "pseudo_features": 160},
    # CPU-sized like hide-prompt's; the weights of the authors' released CIFAR script (the
    # paper's 0.01 / 0.001 barely move 2 epochs of training)
    "fewrel-offline": {
        **HIDE_PRESETS["fewrel-offline"],
        "pseudo_features": 160,
        "reg_sub": 0.1,
        "reg_glob": 0.05,
    },
    "split-cifar100": {
        **HIDE_PRESETS["split-cifar100"],
        "taxonomy": "cifar100-superclasses",
        "reg_sub": 0.01,
        "reg_glob": 0.001,
    },
    "imagenet-r": {**HIDE_PRESETS["imagenet-r"], "reg_sub": 0.015, "reg_glob": 0.002},
}


@STRATEGIES.register(
    "hier-ot", "HiDe-Prompt + label-taxonomy SupCon with OT class weighting (arXiv 2410.04327)"
)
class HierarchicalOT(HiDePrompt):
    Config = HierarchicalOTConfig
    presets = PRESETS
    config: HierarchicalOTConfig

    def setup(self, model: StrategyModel) -> None:
        super().setup(model)
        c = self.config
        # a named tree is read and checked now, before any training: a bad file fails the run
        self.full_taxonomy: Taxonomy | None = None
        if c.taxonomy == "cifar100-superclasses":
            self.full_taxonomy = cifar100_superclasses(self.class_names)
        elif c.taxonomy != "auto":
            if not Path(c.taxonomy).suffix:
                raise UsageError(
                    f"taxonomy {c.taxonomy!r}: valid choices are "
                    f"{', '.join(TREE_SOURCES)} or a .json / .yaml file"
                )
            self.full_taxonomy = load_taxonomy_file(c.taxonomy, self.class_names)
        self.distances = ClassDistances(c.ot_solver, sinkhorn_regularisation=c.sinkhorn_reg)
        self.taxonomy: Taxonomy | None = None
        self.group_of = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        self.gamma = torch.ones(self.num_classes, self.num_classes, device=self.device)
        self.pseudo_pool: tuple[Tensor, Tensor] | None = None
        self._mahalanobis: tuple[tuple[int, ...], Tensor, Tensor] | None = None
        self.ot_seconds = 0.0

    @property
    def uses_distances(self) -> bool:
        c = self.config
        return c.taxonomy == "auto" or c.ot_weighting or c.eval_rescale

    # -- when a task begins: distances, tree, pseudo-features ------------------------------------
    def begin_task(self, task: int, classes: list[int]) -> None:
        super().begin_task(task, classes)
        if self.uses_distances:
            self.update_distances()
        self.build_tree()
        self.pseudo_pool = None
        c = self.config
        old = [k for previous in self.task_classes[:task] for k in previous]
        if old and c.pseudo_features > 0 and (c.reg_glob > 0 or c.reg_sub > 0):
            # one pool per task, subsampled every step (the authors draw 5 x batch per class)
            statistics = self.consolidation.prompted_statistics
            self.pseudo_pool = statistics.sample(old, c.pseudo_features, device=self.device)

    def update_distances(self) -> None:
        """OT distances of the new classes to every seen class, on frozen query features.

        Each class is represented by samples of its query-feature statistics (HiDe fits
        them at the end of a task; here we fit the new classes now, on the same features),
        so no features are stored; a fixed generator per class makes them reproducible.
        ``ot_seconds`` counts the sampling and the OT solves, not the feature pass, which
        HiDe makes anyway (text queries are cached; images pay one extra frozen pass).
        HiDe's end_task refits these statistics on its own pass, which runs at the
        strategy's precision where this one runs in fp32: under bf16 the two differ, so
        the refit stays (in fp32 it reproduces these statistics exactly).
        """
        statistics = self.consolidation.query_statistics
        (query,), labels = extract_features(
            lambda x: (self.query(x),),
            self.experience.dataset.eval(),
            batch_size=self.config.eval_batch_size,
            device=self.device,
        )
        statistics.update(query, labels)
        began = time.perf_counter()
        seen = self.seen_class_list
        samples = {}
        for label in seen:
            generator = torch.Generator().manual_seed(label)
            samples[label] = statistics.sample(
                [label], self.config.ot_samples, device=self.device, generator=generator
            )[0]
        self.distances.update(samples)
        self.ot_seconds += time.perf_counter() - began

    def build_tree(self) -> None:
        seen = self.seen_class_list
        if self.full_taxonomy is not None:
            self.taxonomy = self.full_taxonomy.restricted(seen)
        else:
            groups = number_of_groups(len(seen), self.config.group_size)
            self.taxonomy = cluster_taxonomy(
                self.distances.submatrix(seen), seen, groups, self.config.linkage
            )
        self.group_of = self.taxonomy.group_index(self.num_classes).to(self.device)
        self.gamma = self.class_weights().to(self.device)

    def class_weights(self) -> Tensor:
        """Gamma = exp(-W / delta) over class ids; 1 on the diagonal and without distances."""
        if not self.distances.classes:
            return torch.ones(self.num_classes, self.num_classes)
        delta = self.config.ot_delta
        if delta <= 0:  # scale-free: the median distance between distinct seen classes
            matrix = self.distances.matrix
            off_diagonal = matrix[~torch.eye(len(matrix), dtype=torch.bool)]
            delta = float(off_diagonal.median()) if len(off_diagonal) else 1.0
        return torch.exp(-self.distances.dense(self.num_classes) / max(delta, 1e-12)).float()

    # -- the loss -----------------------------------------------------------------------------
    def training_loss(self, output: TrainOutput, targets: Tensor) -> Tensor:
        loss = super().training_loss(output, targets)  # CE + HiDe's contrastive term
        c = self.config
        if c.reg_glob == 0 and c.reg_sub == 0:
            return loss
        assert output.features is not None  # HiDe's train_logits returns them
        features, labels = self.contrastive_batch(output.features, targets)
        return loss + self.hierarchy_loss(features, labels)

    def contrastive_batch(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's features plus ``pseudo_features`` old-class samples (constants)."""
        if self.pseudo_pool is None:
            return features, labels
        pool, pool_labels = self.pseudo_pool
        pick = torch.randperm(len(pool_labels), device=pool.device)[: self.config.pseudo_features]
        return (
            torch.cat([features, pool[pick].to(features.dtype)]),
            torch.cat([labels, pool_labels[pick]]),
        )

    def hierarchy_loss(self, features: Tensor, labels: Tensor) -> Tensor:
        c = self.config
        normalised = F.normalize(features, dim=1)
        similarity = normalised @ normalised.T / c.supcon_temperature
        loss: Tensor | float = c.reg_glob * supcon(similarity, labels) if c.reg_glob > 0 else 0.0
        if c.reg_sub > 0:
            if c.ot_weighting:  # as in the authors' code: within the groups only
                similarity = similarity * self.gamma[labels][:, labels]
            loss = loss + c.reg_sub * supcon(similarity, labels, self.group_of[labels])
        assert isinstance(loss, Tensor), "called only with reg_glob > 0 or reg_sub > 0"
        return loss

    # -- prediction: the optional energy rescaling -----------------------------------------------
    def predict(self, x: Tensor) -> Prediction:
        prediction = super().predict(x)
        if self.config.eval_rescale and self.taxonomy is not None:
            assert prediction.features is not None  # HiDe's predict returns them
            prediction.logits = self.rescale_by_energy(prediction.logits, prediction.features)
        return prediction

    def rescale_by_energy(self, logits: Tensor, features: Tensor) -> Tensor:
        """Class probabilities times a per-group weight, renormalised (log-probabilities).

        p'(c) ~ p(c) * softmax_g(eta_0 * s_g - eta * d_g) for c in leaf group g, with s_g the
        best logit in g, n_g its class and d_g the Gamma[n_g, .]-weighted mean over k in g
        of maha(x, k). With eta = 0 the top class stays on top. Two changes to the authors'
        code: they sum the weighted distances (a large group then always loses to a small
        one) where we average, and they multiply the raw logits by the group weights, which
        flips meaning for negative logits, where we weight the probabilities.
        """
        c = self.config
        seen = self.seen_class_list
        index = torch.tensor(seen, device=logits.device)
        groups = self.group_of[index]  # [C]
        membership = (
            groups[None, :] == torch.arange(int(groups.max()) + 1, device=groups.device)[:, None]
        )
        seen_logits = logits[:, index]
        floor = torch.finfo(logits.dtype).min
        in_group = seen_logits[:, None, :].masked_fill(~membership[None], floor)  # [B, G, C]
        best, nearest = in_group.max(-1)  # [B, G]
        weights = self.gamma[index][:, index][nearest] * membership[None]  # [B, G, C]
        distance = (weights * self.mahalanobis(features, seen)[:, None, :]).sum(-1) / weights.sum(
            -1
        )
        group_weight = torch.log_softmax(c.energy_eta0 * best - c.energy_eta * distance, dim=1)
        rescaled = torch.log_softmax(seen_logits + group_weight[:, groups], dim=1)
        return torch.full_like(logits, floor).index_copy(1, index, rescaled)

    def mahalanobis(self, features: Tensor, classes: list[int]) -> Tensor:
        """[B, C] Mahalanobis distance of each feature to each class's prompted statistics."""
        statistics = self.consolidation.prompted_statistics
        key = tuple(classes)
        if self._mahalanobis is None or self._mahalanobis[0] != key:
            if statistics.mode == "covariance":
                factors = torch.stack([statistics.scales[k] for k in classes]).double()
                identity = torch.eye(factors.shape[-1], dtype=factors.dtype).expand_as(factors)
                whiten = torch.linalg.solve_triangular(factors, identity, upper=False)
                centres = statistics.class_means(classes)[:, None]  # [C, 1, D]
            else:  # centroids: the nearest centroid, diagonal variances
                whiten = (
                    1.0
                    / (
                        torch.stack([statistics.scales[k] for k in classes]).double().pow(2)
                        + statistics.shrinkage
                    ).sqrt()
                )
                centres = torch.stack([statistics.centroids[k] for k in classes])  # [C, k, D]
            self._mahalanobis = (
                key,
                centres.to(self.device).float(),
                whiten.to(self.device).float(),
            )
        _, centres, whiten = self._mahalanobis
        offsets = features[:, None, None, :] - centres[None]  # [B, C, k, D]
        if statistics.mode == "covariance":
            whitened = torch.einsum("bckd,ced->bcke", offsets, whiten)
        else:
            whitened = offsets * whiten[None]
        return whitened.pow(2).sum(-1).sqrt().min(-1).values

    def end_task(self, task: int, classes: list[int]) -> None:
        super().end_task(task, classes)
        self._mahalanobis = None  # the new classes' statistics exist now

    # -- what the run records ---------------------------------------------------------------------
    def evaluation_summary(self) -> dict[str, Any]:
        summary = super().evaluation_summary()
        if self.taxonomy is not None:
            summary["taxonomy"] = {
                "source": self.taxonomy.source,
                "text": self.taxonomy.render(self.class_names),
                "tree": self.taxonomy.to_names(self.class_names),
            }
        if self.distances.classes:
            summary["class_distances"] = {
                "solver": self.distances.solver,
                "classes": self.distances.classes,
                "names": [self.class_names[k] for k in self.distances.classes],
                "matrix": [[round(float(v), 6) for v in row] for row in self.distances.matrix],
            }
        summary["ot_seconds"] = self.ot_seconds
        summary["ot_pairs"] = self.distances.pairs_computed
        return summary

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "distances": self.distances.state_dict(),
            "taxonomy": self.taxonomy.to_state() if self.taxonomy is not None else None,
            "ot_seconds": self.ot_seconds,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.distances.load_state_dict(state["distances"])
        self.ot_seconds = state["ot_seconds"]
        self._mahalanobis = None
        if state["taxonomy"] is not None:
            self.taxonomy = Taxonomy.from_state(state["taxonomy"])
            self.group_of = self.taxonomy.group_index(self.num_classes).to(self.device)
            self.gamma = self.class_weights().to(self.device)

"""Optimal-transport distances between classes, from samples of their feature distributions.

The hierarchical-OT method (arXiv 2410.04327) measures how alike two classes are by the
earth mover's distance between samples of their frozen-feature distributions: squared
Euclidean cost, uniform weights, exact network-simplex solution (POT's ``ot.emd2``), i.e.
the squared 2-Wasserstein distance of the two empirical measures. For many classes an
entropic (Sinkhorn) solution of all new pairs at once is the cheaper option.

:class:`ClassDistances` keeps the symmetric class-by-class matrix and grows it as classes
arrive: an update computes only the pairs that involve a new class (C_new x C_total, not
C_total^2), so a run pays for each pair once. It is checkpointed with the strategy.

The diagonal is 0 (a class is at distance 0 from itself) unless ``update`` gets a second,
independent sample set per class: then W_ii is the EMD between a class's two sample sets,
as the authors' code computes it (HierC ``update_WSM`` fills i == j too). That W_ii is
mostly the within-class spread, so Gamma_ii = exp(-W_ii / delta) < 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from clbench.errors import UsageError

# The network simplex stops at this many iterations, and a stopped solver returns a value
# that is not the EMD (we fail loudly then). POT's default cap (1e5) sufficed for 1200 x 1200
# Gaussian samples in 768-d in the fidelity audit; the larger cap is a margin, not a need.
EMD_MAX_ITERATIONS = 10_000_000


def squared_euclidean_costs(x: Tensor, partners: Tensor) -> Tensor:
    """Cost matrices ||x_i - y_j||^2 of one sample set [n, D] against P sets [P, m, D]."""
    x, partners = x.double(), partners.double()
    costs = (
        x.pow(2).sum(-1)[None, :, None]
        + partners.pow(2).sum(-1)[:, None, :]
        - 2.0 * torch.einsum("nd,pmd->pnm", x, partners)
    )
    return costs.clamp_min_(0.0)  # rounding can make identical points slightly negative


def exact_emd(costs: Tensor) -> Tensor:
    """EMD of uniform weights for each cost matrix in ``costs`` [P, n, m] (network simplex)."""
    import ot

    values = []
    for cost in costs.cpu().numpy():
        a = np.full(cost.shape[0], 1.0 / cost.shape[0])
        b = np.full(cost.shape[1], 1.0 / cost.shape[1])
        value, log = ot.emd2(a, b, cost, numItermax=EMD_MAX_ITERATIONS, log=True)
        if log.get("warning"):
            raise RuntimeError(f"exact OT did not converge: {log['warning']}")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


def sinkhorn_emd(costs: Tensor, regularisation: float, max_iterations: int = 1000) -> Tensor:
    """Transport cost <T, C> of the entropic plans of all matrices in ``costs`` at once.

    ``regularisation`` is relative to the mean cost, so one value suits any feature scale.
    Runs batched (log-domain Sinkhorn) on the tensors' device.
    """
    try:
        from ot.batch import solve_batch
    except ImportError as error:  # ot.batch arrived in POT 0.9.6
        raise UsageError(f"ot_solver=sinkhorn needs POT >= 0.9.6 (ot.batch): {error}") from None
    scale = costs.mean().clamp_min(torch.finfo(costs.dtype).tiny)
    result = solve_batch(
        costs / scale,
        reg=regularisation,
        method="log_sinkhorn",
        max_iter=max_iterations,
        grad="detach",
    )
    return (result.value_linear * scale).double().cpu()


class ClassDistances:
    """A symmetric matrix of OT distances between classes, computed incrementally.

    solver="emd": exact, one network-simplex problem per pair (CPU).
    solver="sinkhorn": entropic, all pairs of a new class in one batched solve (any device).
    """

    def __init__(
        self, solver: Literal["emd", "sinkhorn"] = "emd", *, sinkhorn_regularisation: float = 0.05
    ) -> None:
        if solver not in ("emd", "sinkhorn"):
            raise UsageError(f"unknown OT solver {solver!r}; valid choices: emd, sinkhorn")
        self.solver = solver
        self.sinkhorn_regularisation = sinkhorn_regularisation
        self.classes: list[int] = []
        self.matrix = torch.zeros(0, 0, dtype=torch.float64)
        self.pairs_computed = 0  # over the object's lifetime, for the run's record
        self.seconds = 0.0

    def update(
        self, samples: Mapping[int, Tensor], self_samples: Mapping[int, Tensor] | None = None
    ) -> int:
        """Add every class of ``samples`` not yet in the matrix; returns the pairs computed.

        ``samples`` maps class -> [n, D] samples, the same n for every class. It must hold
        the known classes too, as partners of the new ones; their own pairs are not
        recomputed, so the matrix never changes for classes already in it.
        ``self_samples`` (the new classes at least): a second sample set per class, drawn
        independently; W_ii = the EMD between the two (counted as pairs computed).
        """
        began = time.perf_counter()
        new = [c for c in sorted(samples) if c not in self.classes]
        if not new:
            return 0
        sizes = {tuple(s.shape) for s in samples.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2:
            raise ValueError(
                f"OT samples must be [n, D] with the same n for every class; got {sizes}"
            )
        missing = [c for c in self.classes if c not in samples]
        if missing:
            raise ValueError(f"samples of the known classes {missing} are needed as partners")
        classes = self.classes + new
        matrix = torch.zeros(len(classes), len(classes), dtype=torch.float64)
        old = len(self.classes)
        matrix[:old, :old] = self.matrix
        computed = 0
        if self_samples is not None:
            lacking = [c for c in new if c not in self_samples]
            if lacking:
                raise ValueError(f"second sample sets of the new classes {lacking} are needed")
            for offset, label in enumerate(new):
                costs = squared_euclidean_costs(
                    samples[label], self_samples[label][None].to(samples[label].device)
                )
                matrix[old + offset, old + offset] = self._solve(costs)[0]
            computed += len(new)
        for offset, label in enumerate(new):
            row = old + offset
            partners = classes[:row]  # every known class and the new ones before this one
            if not partners:
                continue
            stacked = torch.stack([samples[c] for c in partners])
            costs = squared_euclidean_costs(samples[label], stacked.to(samples[label].device))
            values = self._solve(costs)
            matrix[row, :row] = values
            matrix[:row, row] = values
            computed += len(partners)
        self.classes, self.matrix = classes, matrix
        self.pairs_computed += computed
        self.seconds += time.perf_counter() - began
        return computed

    def _solve(self, costs: Tensor) -> Tensor:
        if self.solver == "emd":
            return exact_emd(costs)
        return sinkhorn_emd(costs, self.sinkhorn_regularisation)

    def submatrix(self, classes: list[int]) -> Tensor:
        """Distances among ``classes`` (all must be known), in the given order."""
        index = [self._position(c) for c in classes]
        return self.matrix[index][:, index]

    def dense(self, num_classes: int, fill: float = math.inf) -> Tensor:
        """A [num_classes, num_classes] matrix indexed by class id; unknown pairs = ``fill``."""
        dense = torch.full((num_classes, num_classes), fill, dtype=torch.float64)
        if self.classes:
            index = torch.tensor(self.classes)
            dense[index[:, None], index[None, :]] = self.matrix
        return dense

    def _position(self, label: int) -> int:
        try:
            return self.classes.index(label)
        except ValueError:
            raise KeyError(f"no OT distances for class {label}; known: {self.classes}") from None

    def state_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "classes": list(self.classes),
            "matrix": self.matrix.clone(),
            "pairs_computed": self.pairs_computed,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = list(state["classes"])
        self.matrix = state["matrix"].clone().double()
        self.pairs_computed = state["pairs_computed"]
        self.seconds = state["seconds"]

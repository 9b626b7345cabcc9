"""Subspace bookkeeping for the LoRA-based continual learners (InfLoRA, NuSA-CL).

* :func:`energy_rank`: how many leading singular values hold a fraction of the energy;
* :class:`DualGPM`: InfLoRA's memory of the input space old tasks used, per layer, kept
  either as a basis of that space ("remove": project it away) or, once that basis would
  pass d / 2 columns, as a basis of its complement ("retain": project onto it). This is
  ``update_DualGPM`` of liangyanshuo/InfLoRA (methods/inflora.py), step for step.

Everything is computed in float64 and stored in float32 (the official code runs numpy's
SVD on float32 covariances); the state is a dict of plain tensors, so a checkpoint holds
it whatever the bases' sizes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

MemoryKind = Literal["remove", "retain"]


def energy_rank(singular_values: Tensor, fraction: float) -> int:
    """The number k of leading singular values whose squares stay *below* ``fraction``
    of the total (InfLoRA's ``np.sum(np.cumsum(ratio) < threshold)``)."""
    energy = singular_values.double() ** 2
    ratio = torch.cumsum(energy / energy.sum(), 0)
    return int((ratio < fraction).sum())


def principal_count(singular_values: Tensor, fraction: float) -> int:
    """The smallest k whose leading squared singular values reach ``fraction`` of the
    total (NuSA-CL's principal rank p: sum_{i<=k} s_i^2 / sum s^2 >= rho)."""
    energy = singular_values.double() ** 2
    ratio = torch.cumsum(energy / energy.sum(), 0)
    reached = torch.nonzero(ratio >= fraction - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


class DualGPM:
    """Per-layer memory of old tasks' input space (InfLoRA's DualGPM).

    ``project(layer, covariance)`` removes the remembered directions from a covariance
    [d, d] (InfLoRA designs the next task's input factor from what is left);
    ``update(covariances, threshold)`` adds a finished task's directions, keeping the
    energy fraction ``threshold`` (InfLoRA's epsilon_t).
    """

    def __init__(self) -> None:
        self.bases: dict[int, Tensor] = {}  # layer -> [d, k] orthonormal columns
        self.kinds: dict[int, MemoryKind] = {}

    def __contains__(self, layer: int) -> bool:
        return layer in self.bases

    def projection(self, layer: int) -> Tensor:
        """M M^T [d, d] of the layer's basis."""
        basis = self.bases[layer].double()
        return basis @ basis.T

    def remembered(self, layer: int) -> Tensor:
        """An orthonormal basis [d, k] of the old tasks' input space (the complement of
        a "retain" basis; for tests and diagnostics)."""
        basis = self.bases[layer].double()
        if self.kinds[layer] == "remove":
            return basis
        dim = basis.shape[0]
        u, _, _ = torch.linalg.svd(torch.eye(dim, dtype=basis.dtype) - basis @ basis.T)
        return u[:, : dim - basis.shape[1]]

    def project(self, layer: int, covariance: Tensor) -> Tensor:
        """The covariance without the old tasks' input space (unchanged for a layer with
        no memory yet): C - M M^T C ("remove") or M M^T C ("retain")."""
        covariance = covariance.double()
        if layer not in self.bases:
            return covariance
        projection = self.projection(layer)
        if self.kinds[layer] == "remove":
            return covariance - projection @ covariance
        return projection @ covariance

    def update(self, covariances: dict[int, Tensor], threshold: float) -> None:
        for layer, covariance in covariances.items():
            covariance = covariance.double()
            if layer not in self.bases:
                self._first(layer, covariance, threshold)
            elif self.kinds[layer] == "remove":
                self._grow(layer, covariance, threshold)
            else:
                self._shrink(layer, covariance, threshold)
            basis = self.bases[layer]
            # a remembered space wider than d / 2 is stored as its complement
            if self.kinds[layer] == "remove" and basis.shape[1] > basis.shape[0] / 2:
                u, _, _ = torch.linalg.svd(basis.double())
                self.bases[layer] = u[:, basis.shape[1] :].float()
                self.kinds[layer] = "retain"

    def _first(self, layer: int, covariance: Tensor, threshold: float) -> None:
        u, s, _ = torch.linalg.svd(covariance, full_matrices=False)
        rank = energy_rank(s, threshold)
        self.bases[layer] = u[:, : max(rank, 1)].float()
        self.kinds[layer] = "remove" if rank < covariance.shape[0] / 2 else "retain"

    def _grow(self, layer: int, covariance: Tensor, threshold: float) -> None:
        """Add the residual's leading directions until the captured energy reaches
        ``threshold`` (InfLoRA Eq. 8-9 on the "remove" side)."""
        total = (torch.linalg.svdvals(covariance) ** 2).sum()
        residual = covariance - self.projection(layer) @ covariance
        u, s, _ = torch.linalg.svd(residual, full_matrices=False)
        ratios = s**2 / total
        captured = float((total - (s**2).sum()) / total)
        added = 0
        for ratio in ratios.tolist():
            if captured >= threshold:
                break
            captured += ratio
            added += 1
        if added == 0:
            return
        grown = torch.cat([self.bases[layer].double(), u[:, :added]], dim=1)
        self.bases[layer] = grown[:, : grown.shape[0]].float()

    def _shrink(self, layer: int, covariance: Tensor, threshold: float) -> None:
        """Remove directions from the free space until its energy drops below
        1 - ``threshold`` (the "retain" side)."""
        total = (torch.linalg.svdvals(covariance) ** 2).sum()
        inside = self.projection(layer) @ covariance
        u, s, _ = torch.linalg.svd(inside, full_matrices=False)
        ratios = s**2 / total
        remaining = float((s**2).sum() / total)
        removed = 0
        for ratio in ratios.tolist():
            if remaining < 1 - threshold:
                break
            remaining -= ratio
            removed += 1
        if removed == 0:
            return
        basis = self.bases[layer].double()
        taken = u[:, :removed]
        rest = basis - taken @ (taken.T @ basis)
        left, _, _ = torch.linalg.svd(rest)
        self.bases[layer] = left[:, : basis.shape[1] - removed].float()

    def state_dict(self) -> dict[str, Any]:
        return {
            "bases": {layer: basis.clone() for layer, basis in self.bases.items()},
            "kinds": dict(self.kinds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases = {int(layer): basis.clone() for layer, basis in state["bases"].items()}
        self.kinds = {int(layer): kind for layer, kind in state["kinds"].items()}

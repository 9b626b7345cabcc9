"""KaSA: knowledge-aware singular-value adaptation (Wang et al., ICLR 2025).

Two parts (official ``juyongjiang/KaSA``; peft >= 0.21 ``KasaConfig``):

1. The base loses its r **smallest** singular components, W -> W - U_m S_m V_m^T (the
   "noisy or long-tail knowledge"). Both implementations edit the base weight; here the
   removal is a frozen offset term ``-(U_m S_m) V_m^T`` of rank r, so the shared encoder
   is untouched and the cost is one more rank-r term. Unlike PiSSA's offset this one is
   meant to change the function: KaSA starts from the truncated model.
2. The update is in SVD form, s * B diag(sigma) A, with a trained sigma in R^r (drawn
   N(0, 1) as in their fork) between LoRA's factors (A Kaiming, B zero), plus the
   regulariser beta * ||sigma||^2 + gamma * (||B^T B - I||_F + ||A A^T - I||_F) (paper
   Eq. 9-11; peft's defaults beta = 1e-4, gamma = 1e-3), returned by ``aux_loss``.

"Smallest r" counts among the min(d_out, d_in) singular values. peft keeps the first
d_in - r components, which for a wide matrix (d_in > d_out, e.g. the MLP's fc2) removes
nothing; here r components are removed from every matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clbench.adapters.lora import LoRA
from clbench.adapters.svd_init import singular_components


class KaSA(LoRA):
    """KaSA on one target projection; ``weight`` is its frozen weight [d_out, d_in]."""

    def __init__(
        self,
        weight: Tensor,
        rank: int,
        *,
        target: str,
        alpha: float | None = None,
        dropout: float = 0.0,
        beta: float = 1e-4,
        gamma: float = 1e-3,
    ) -> None:
        d_out, d_in = weight.shape
        super().__init__(d_in, d_out, rank, target=target, alpha=alpha, dropout=dropout)
        self.beta, self.gamma = beta, gamma
        self.singular = nn.Parameter(torch.randn(rank))
        u, s, vh = singular_components(weight, rank, smallest=True)
        self.set_offset(vh, -(u * s[None, :]), 1.0)

    def middle_matrix(self) -> Tensor:
        return torch.diag(self.singular)

    def aux_loss(self) -> Tensor:
        eye = torch.eye(self.rank, device=self.up.device)
        up_gram, down_gram = self.up.T @ self.up - eye, self.down @ self.down.T - eye
        orthogonality = torch.linalg.matrix_norm(up_gram) + torch.linalg.matrix_norm(down_gram)
        return self.beta * self.singular.square().sum() + self.gamma * orthogonality

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta:g}, gamma={self.gamma:g}"

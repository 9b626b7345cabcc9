"""PiSSA and MiLoRA: LoRA initialised from the frozen weight's singular components.

With W = U S V^T and s = alpha / r, both set A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s)
(so s B A = U_r S_r V_r^T), from the r **largest** singular triplets (PiSSA, Meng et al.,
NeurIPS 2024, as peft's ``init_lora_weights="pissa"``) or the r **smallest** ones
(MiLoRA, Wang et al., 2024, official ``svd_init.py`` with ``mode="min"``).

Both papers then replace W by W - s B A so the function is unchanged at initialisation.
Here the shared encoder's weight is never edited: the adapter carries the frozen offset
term -s B_0 A_0 instead, summed with the trained term before it reaches the output, so
at step 0 the two cancel exactly and the adapted forward is the frozen one, bit for bit.
What trains is the same: W + s (B A - B_0 A_0) is PiSSA's W_res + s B A.

PiSSA's fast initialisation (peft ``pissa_niter_k``) is ``niter=k``: ``torch.svd_lowrank``
with k subspace iterations instead of a full SVD. Dropout should stay 0 (PiSSA's advice):
with dropout the trained term no longer cancels its offset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clbench.adapters.base import scaling
from clbench.adapters.lora import LoRA


def singular_components(
    weight: Tensor, rank: int, *, smallest: bool, niter: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """U_r [d_out, r], S_r [r], V_r^T [r, d_in] of ``weight``'s r largest (or smallest)
    singular triplets, in fp32 (the SVD is not autocast)."""
    matrix = weight.detach().float()
    if not 0 < rank <= min(matrix.shape):
        raise ValueError(
            f"rank {rank} must lie in 1..{min(matrix.shape)} for {tuple(matrix.shape)}"
        )
    with torch.autocast(matrix.device.type, enabled=False):
        if niter is not None:
            if smallest:
                raise ValueError(
                    "svd_lowrank finds the largest components only (MiLoRA: niter=None)"
                )
            u, s, v = torch.svd_lowrank(matrix, q=rank, niter=niter)
            return u[:, :rank], s[:rank], v[:, :rank].T
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    chosen = slice(-rank, None) if smallest else slice(0, rank)
    return u[:, chosen], s[chosen], vh[chosen]


def svd_lora(
    weight: Tensor,
    rank: int,
    *,
    target: str,
    smallest: bool,
    alpha: float | None = None,
    niter: int | None = None,
    dropout: float = 0.0,
) -> LoRA:
    """A LoRA on ``weight`` [d_out, d_in] from its singular triplets, with the offset."""
    u, s, vh = singular_components(weight, rank, smallest=smallest, niter=niter)
    scale = scaling(alpha, rank)
    root = (s / scale).sqrt()
    down = root[:, None] * vh
    up = u * root[None, :]
    d_out, d_in = weight.shape
    adapter = LoRA(d_in, d_out, rank, target=target, alpha=alpha, dropout=dropout, down=down, up=up)
    # the trained factors start as (down, up): the same tensors, negated, cancel them
    adapter.set_offset(adapter.down, -adapter.up, adapter.scale)
    return adapter


def pissa(
    weight: Tensor,
    rank: int,
    *,
    target: str,
    alpha: float | None = None,
    niter: int | None = None,
    dropout: float = 0.0,
) -> LoRA:
    """PiSSA: LoRA over the r principal singular components of ``weight``."""
    return svd_lora(
        weight, rank, target=target, smallest=False, alpha=alpha, niter=niter, dropout=dropout
    )


def milora(
    weight: Tensor, rank: int, *, target: str, alpha: float | None = None, dropout: float = 0.0
) -> LoRA:
    """MiLoRA: LoRA over the r minor singular components of ``weight``."""
    return svd_lora(weight, rank, target=target, smallest=True, alpha=alpha, dropout=dropout)

"""LoRA (Hu et al., 2022): W x + s * B A x with A [r, d_in], B [d_out, r], s = alpha / r.

A is Kaiming-uniform (a = sqrt(5)) and B is zero, as in the paper and peft, so the
adapted projection starts as the frozen one, bit for bit. rsLoRA's s = alpha / sqrt(r) is
an option. Either factor can be given and frozen, which is what the LoRA-based continual
learners need: InfLoRA trains B over a designed, frozen A; NuSA trains only a middle
r x r matrix between frozen singular vectors (``middle``); SD-LoRA keeps earlier tasks'
factors as frozen directions with a learned magnitude (``magnitude``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clbench.adapters.base import LowRankAdapter, kaiming_down, scaling
from clbench.encoders.deltas import LowRankTerm


class LoRA(LowRankAdapter):
    """One LoRA on one target projection of one block.

    d_in / d_out: the projection's input / output width (``encoder.projection_weight``).
    rank (r), alpha: s = alpha / r (alpha None: alpha = r, s = 1); rslora: alpha / sqrt(r).
    dropout: LoRA dropout on the adapter's input, active while the adapter trains.
    down / up: initial A / B instead of Kaiming / zero; train_down / train_up: which of
        them the optimiser sees (frozen ones stay parameters with requires_grad off).
    middle: an optional r x r matrix M between the factors (update s * B M A), trained
        when ``train_middle``.
    magnitude: an optional learned scalar multiplying s (SD-LoRA's alpha_t), or None.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        *,
        target: str,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        down: Tensor | None = None,
        up: Tensor | None = None,
        train_down: bool = True,
        train_up: bool = True,
        middle: Tensor | None = None,
        train_middle: bool = True,
        magnitude: float | None = None,
    ) -> None:
        super().__init__((target,))
        self.target = target
        self.rank = rank
        self.scale = scaling(alpha, rank, rslora)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout}")
        self.dropout = dropout
        down = kaiming_down(rank, d_in) if down is None else down.detach().clone()
        up = torch.zeros(d_out, rank) if up is None else up.detach().clone()
        if down.shape != (rank, d_in) or up.shape != (d_out, rank):
            raise ValueError(
                f"LoRA factors must be A [{rank}, {d_in}] and B [{d_out}, {rank}], "
                f"got {tuple(down.shape)} and {tuple(up.shape)}"
            )
        self.down = nn.Parameter(down.float(), requires_grad=train_down)
        self.up = nn.Parameter(up.float(), requires_grad=train_up)
        self.middle: nn.Parameter | None = None
        if middle is not None:
            if middle.shape != (rank, rank):
                raise ValueError(f"the middle matrix must be [{rank}, {rank}]")
            self.middle = nn.Parameter(middle.detach().clone().float(), train_middle)
        self.magnitude: nn.Parameter | None = None
        if magnitude is not None:
            self.magnitude = nn.Parameter(torch.tensor(float(magnitude)))

    def middle_matrix(self) -> Tensor | None:
        return self.middle

    def term(self) -> LowRankTerm:
        """The trained term (without any frozen offset)."""
        scale: float | Tensor = self.scale
        if self.magnitude is not None:
            scale = self.magnitude * self.scale
        dropout = self.dropout if self.training else 0.0
        return LowRankTerm(self.down, self.up, scale, self.middle_matrix(), dropout=dropout)

    def terms(self) -> dict[str, list[LowRankTerm]]:
        offset = self.offset_term()
        return {self.target: [self.term()] if offset is None else [self.term(), offset]}

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.up]

    def extra_repr(self) -> str:
        return f"target={self.target}, rank={self.rank}, scale={self.scale:g}"

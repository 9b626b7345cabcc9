"""The adapter contract: a strategy-owned module that yields low-rank terms per target."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from clbench.encoders.deltas import LowRankTerm, check_target


class LowRankAdapter(nn.Module):
    """Base of every parameterisation (LoRA, PiSSA / MiLoRA, KaSA, RepLoRA, frozen).

    An adapter adapts one or more ``targets`` of ONE block and answers:

    * ``terms()``: target -> the :class:`~clbench.encoders.deltas.LowRankTerm` list to
      hand the encoder (its trained term, plus any frozen offset term);
    * ``delta_weight()``: target -> the dense update those terms amount to, [d_out, d_in]
      (for merging a finished task into :class:`~clbench.adapters.offsets.MergedOffsets`);
    * ``aux_loss()``: the parameterisation's own regulariser (KaSA), 0 by default;
    * ``up_parameters()``: the parameters on the output side ("B"), which LoRA+ trains
      at a higher learning rate;
    * ``freeze()``: the task is finished; nothing of it trains any more (RepLoRA also
      collapses its generators into the factors they produced).

    An adapter's state-dict layout never changes after construction (frozen or not), so
    a strategy that builds its adapters in ``setup`` resumes from any checkpoint.

    Adapters live in the strategy's model, never in the encoder: checkpoints, resume and
    ``requires_grad`` bookkeeping work as they do for prompts, and dropout follows the
    adapter's own train flag (the frozen encoder is always in eval mode).
    """

    targets: tuple[str, ...]

    def __init__(self, targets: tuple[str, ...]) -> None:
        super().__init__()
        for target in targets:
            check_target(target)
        if len(set(targets)) != len(targets):
            raise ValueError(f"an adapter's targets must differ, got {targets}")
        self.targets = tuple(targets)
        self.offset_scale = 0.0

    def terms(self) -> dict[str, list[LowRankTerm]]:
        raise NotImplementedError

    def delta_weight(self) -> dict[str, Tensor]:
        return {
            target: sum((term.weight() for term in terms[1:]), terms[0].weight())
            for target, terms in self.terms().items()
        }

    def aux_loss(self) -> Tensor:
        return torch.zeros((), device=_device_of(self))

    def up_parameters(self) -> list[nn.Parameter]:
        return []

    def freeze(self) -> LowRankAdapter:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self

    # -- a frozen offset term, for initialisations that must not change the function --
    def set_offset(self, down: Tensor, up: Tensor, scale: float) -> None:
        """A frozen term ``scale * up @ down`` added after the trained one (PiSSA /
        MiLoRA: minus the initial factors; KaSA: minus W's minor components)."""
        self.register_buffer("offset_down", down.detach().clone())
        self.register_buffer("offset_up", up.detach().clone())
        self.offset_scale = float(scale)

    def offset_term(self) -> LowRankTerm | None:
        down: Tensor | None = getattr(self, "offset_down", None)
        up: Tensor | None = getattr(self, "offset_up", None)
        if down is None or up is None:
            return None
        return LowRankTerm(down, up, self.offset_scale)


def scaling(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """LoRA's s = alpha / r (rsLoRA: alpha / sqrt(r)); alpha None means alpha = r."""
    if rank <= 0:
        raise ValueError(f"the rank must be positive, got {rank}")
    alpha = float(rank) if alpha is None else float(alpha)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def kaiming_down(rank: int, d_in: int) -> Tensor:
    """A [r, d_in] drawn as ``nn.Linear(d_in, r)`` draws its weight (Kaiming-uniform,
    a = sqrt(5)), LoRA's (and peft's) initialisation of A."""
    down = torch.empty(rank, d_in)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    return down


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")

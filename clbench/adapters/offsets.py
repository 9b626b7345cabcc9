"""Finished tasks' updates merged into a frozen, accumulated offset per projection.

Methods that merge (NuSA-CL merges each task; InfLoRA keeps every earlier branch on;
SD-LoRA evaluates the final model) would write ``W += dW`` into the model. The encoder
here is shared and frozen, so the sum lives in this module's buffers instead and reaches
the encoder as the dense term of ``Prompt.deltas``: the block computes with a copy
``W + dW_acc`` for the call, at the cost of one weight-sized addition per forward pass,
and however many tasks were merged the cost stays the same.

The buffers are fp32 [d_out, d_in] per (layer, target), created up front (zeros) so the
checkpoint layout never changes: ViT-B/16 with q, k, v, o on 12 blocks is 28M floats
(113 MB); a method whose merged rank stays well below d can keep the low-rank factors
instead (frozen adapters in a ``LayerAdapters``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from clbench.adapters.container import LayerAdapters
from clbench.encoders.base import PromptableEncoder
from clbench.encoders.deltas import LayerDelta, check_target


class MergedOffsets(nn.Module):
    """dW_acc per (layer, target) as buffers; ``absorb`` adds a finished task's update."""

    merge_count: Tensor

    def __init__(
        self, encoder: PromptableEncoder, layers: Sequence[int], targets: Sequence[str]
    ) -> None:
        super().__init__()
        self.entries: list[tuple[int, str]] = []
        for layer in layers:
            for target in targets:
                check_target(target)
                weight = encoder.projection_weight(layer, target)
                self.register_buffer(
                    _name(layer, target), torch.zeros(weight.shape, device=weight.device)
                )
                self.entries.append((layer, target))
        self.merged_tasks = 0  # host-side: an empty offset adds nothing to the forward pass
        self.register_buffer("merge_count", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(_read_merge_count)

    def offset(self, layer: int, target: str) -> Tensor:
        return getattr(self, _name(layer, target))

    @torch.no_grad()
    def absorb(self, adapters: LayerAdapters, weight: float = 1.0) -> None:
        """dW_acc += weight * (the adapters' current dense update), for every (layer,
        target) they adapt; all of them must have a buffer here. The adapters are not
        changed: freeze or reset them as the method says."""
        for (layer, target), delta in adapters.delta_weights().items():
            if (layer, target) not in self.entries:
                raise ValueError(f"no merged offset for layer {layer}, target {target!r}")
            self.offset(layer, target).add_(delta.float(), alpha=weight)
        self.merge_count.add_(1)
        self.merged_tasks += 1

    def deltas(self) -> dict[int, LayerDelta]:
        """layer -> LayerDelta with the dense offsets ({} before the first merge)."""
        if self.merged_tasks == 0:
            return {}
        deltas: dict[int, LayerDelta] = {}
        for layer, target in self.entries:
            deltas.setdefault(layer, LayerDelta()).dense[target] = self.offset(layer, target)
        return deltas


def _name(layer: int, target: str) -> str:
    return f"layer{layer}_{target}"


def _read_merge_count(module: MergedOffsets, incompatible_keys: object) -> None:
    module.merged_tasks = int(module.merge_count)

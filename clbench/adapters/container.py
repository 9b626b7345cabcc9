"""(layer, target) -> adapter, and what the encoder needs from a set of adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from clbench.adapters.base import LowRankAdapter
from clbench.encoders.attention import Prompt
from clbench.encoders.base import PromptableEncoder
from clbench.encoders.deltas import LayerDelta, LowRankTerm, check_target

# (the block's frozen weight [d_out, d_in], layer, target) -> the adapter for it
AdapterFactory = Callable[[Tensor, int, str], LowRankAdapter]


class LayerAdapters(nn.Module):
    """The adapters of one task (or of a method that has one set), by (layer, target).

    ``deltas()`` is the ``Prompt.deltas`` field; ``prompt()`` wraps it in a Prompt (merge
    it with prefixes through ``clbench.prompts.merge_prompts``). An adapter with several
    targets (RepLoRA) is stored once and answers for each of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.layer_of: dict[str, int] = {}

    @classmethod
    def build(
        cls,
        encoder: PromptableEncoder,
        layers: Sequence[int],
        targets: Sequence[str],
        factory: AdapterFactory,
    ) -> LayerAdapters:
        """One adapter per (layer, target): ``factory(weight, layer, target)``, with
        ``weight`` the encoder's frozen projection (its shape gives d_out, d_in; SVD
        initialisations read it, nothing writes it)."""
        container = cls()
        for layer in layers:
            if not 0 <= layer < encoder.num_layers:
                raise ValueError(f"layer {layer} outside 0..{encoder.num_layers - 1}")
            for target in targets:
                container.add(
                    layer, factory(encoder.projection_weight(layer, target), layer, target)
                )
        return container

    def add(self, layer: int, adapter: LowRankAdapter) -> None:
        for target in adapter.targets:
            check_target(target)
            if self.find(layer, target) is not None:
                raise ValueError(f"layer {layer} already has an adapter on {target!r}")
        key = f"layer{layer}_{'_'.join(adapter.targets)}"
        self.adapters[key] = adapter
        self.layer_of[key] = layer

    def find(self, layer: int, target: str) -> LowRankAdapter | None:
        for key_layer, adapter in self.items():
            if key_layer == layer and target in adapter.targets:
                return adapter
        return None

    def __getitem__(self, key: tuple[int, str]) -> LowRankAdapter:
        adapter = self.find(*key)
        if adapter is None:
            raise KeyError(f"no adapter on layer {key[0]}, target {key[1]!r}")
        return adapter

    def items(self) -> Iterator[tuple[int, LowRankAdapter]]:
        for key, adapter in self.adapters.items():
            yield self.layer_of[key], cast(LowRankAdapter, adapter)

    def deltas(self) -> dict[int, LayerDelta]:
        """layer -> LayerDelta of every adapter's terms."""
        terms: dict[int, dict[str, list[LowRankTerm]]] = {}
        for layer, adapter in self.items():
            layer_terms = terms.setdefault(layer, {})
            for target, target_terms in adapter.terms().items():
                layer_terms.setdefault(target, []).extend(target_terms)
        return {layer: LayerDelta(layer_terms) for layer, layer_terms in terms.items()}

    def prompt(self) -> Prompt:
        return Prompt(deltas=self.deltas())

    def aux_loss(self) -> Tensor:
        losses = [adapter.aux_loss() for _, adapter in self.items()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def delta_weights(self) -> dict[tuple[int, str], Tensor]:
        """(layer, target) -> the dense update [d_out, d_in] of the adapters' terms."""
        weights: dict[tuple[int, str], Tensor] = {}
        for layer, adapter in self.items():
            for target, weight in adapter.delta_weight().items():
                weights[layer, target] = weight
        return weights

    def freeze(self) -> LayerAdapters:
        """The task is finished: nothing here trains any more (see ``LowRankAdapter``)."""
        for _, adapter in self.items():
            adapter.freeze()
        return self


def stack_tasks(tasks: Sequence[LayerAdapters], index: Tensor) -> dict[int, LayerDelta]:
    """Per-sample deltas: sample b uses ``tasks[index[b]]`` (HiDe-LoRA's test-time
    routing by predicted task, HiDe-PET's batched gather + bmm).

    Every container must have the same layout (layers, targets, ranks, term counts);
    the i-th terms of a target are stacked over tasks into [T, r, d] factors with
    ``index``, so one batched product serves the whole batch. Gradients reach every
    task's factors (only the ones that require grad train).
    """
    if not tasks:
        raise ValueError("stack_tasks needs at least one task's adapters")
    per_task = [container.deltas() for container in tasks]
    stacked: dict[int, LayerDelta] = {}
    for layer, first in per_task[0].items():
        terms: dict[str, list[LowRankTerm]] = {}
        for target, first_terms in first.terms.items():
            columns = []
            for deltas in per_task:
                if layer not in deltas or len(deltas[layer].terms.get(target, ())) != len(
                    first_terms
                ):
                    raise ValueError(
                        f"the tasks' adapters differ on layer {layer}, target {target!r}"
                    )
                columns.append(deltas[layer].terms[target])
            terms[target] = [
                _stack([column[i] for column in columns], index) for i in range(len(first_terms))
            ]
        stacked[layer] = LayerDelta(terms)
    return stacked


def _stack(terms: list[LowRankTerm], index: Tensor) -> LowRankTerm:
    scales = [term.scale for term in terms]
    scale: float | Tensor
    if all(not isinstance(s, Tensor) for s in scales) and len(set(scales)) == 1:
        scale = scales[0]
    else:
        device = terms[0].down.device
        scale = torch.stack(
            [torch.as_tensor(s, dtype=torch.float32, device=device) for s in scales]
        )
    middles = [term.middle for term in terms if term.middle is not None]
    if middles and len(middles) != len(terms):
        raise ValueError("stack_tasks: some tasks' terms have a middle matrix, some not")
    middle = torch.stack(middles) if middles else None
    return LowRankTerm(
        down=torch.stack([term.down for term in terms]),
        up=torch.stack([term.up for term in terms]),
        scale=scale,
        middle=middle,
        index=index,
        dropout=max(term.dropout for term in terms),
    )

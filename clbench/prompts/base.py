"""The prompt-module contract: one call, one per-task lifecycle, one type for ``task``.

Every prompt module answers the same call (after CODA-Prompt's design)::

    selection = module(query, task=..., train=...)

with ``query`` the frozen encoder's un-prompted pooled feature [B, Dq]; it returns a
:class:`PromptSelection`: the :class:`~clbench.encoders.attention.Prompt` to run the
encoder with, the module's auxiliary loss, and which prompts were chosen. ``task`` is
always a :data:`TaskIndex`: an int (the task being learnt, or the last one learnt), a
tensor [B] of per-input tasks (inferred at test time), or None (the module decides, e.g.
every task learnt so far). A module that cannot use one of these says so with an error.

Every module also answers one per-task lifecycle, which a strategy calls from its own
``begin_task`` / ``end_task`` hooks:

* ``begin_task(task)``: before training on ``task``; by default only slot ``task`` of a
  module with per-task slots trains (old and future slots leave the optimizer);
* ``end_task(task)``: after training on ``task``; by default slot ``task`` is frozen.

A module shared by all tasks has no slots, so both are no-ops for it. Everything runs
batched on the module's device: no loop over samples, no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor, nn

from clbench.encoders.attention import PrefixGate, Prompt, merge_layer_fields
from clbench.errors import UsageError

# The one type of every prompt module's ``task`` argument (see the module docstring).
TaskIndex: TypeAlias = int | Tensor | None


@dataclass
class PromptSelection:
    prompt: Prompt
    aux_loss: Tensor
    selected: Tensor | None = None  # [B, k] indices of the chosen prompts, where relevant


class PromptModule(nn.Module):
    """Base of all prompt modules (see the module docstring for the contract).

    A module with one slot per task (a prompt, a pool, a set of components) reports
    ``num_slots`` and the parameters of each slot (``slot_parameters``); the default
    lifecycle then trains only the current task's slot and freezes it afterwards.
    """

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        raise NotImplementedError

    @property
    def num_slots(self) -> int:
        """Per-task slots (0: the module is shared by every task)."""
        return 0

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        """The parameters that belong to task slot ``slot``."""
        return []

    def begin_task(self, task: int) -> None:
        """Before training on ``task``: only slot ``task`` requires grad (and so only it
        reaches the optimizer; old slots stay exactly as trained, weight decay or not)."""
        for slot in range(self.num_slots):
            for parameter in self.slot_parameters(slot):
                parameter.requires_grad_(slot == task)

    def end_task(self, task: int) -> None:
        """After training on ``task``: slot ``task`` is final, so it is frozen."""
        if 0 <= task < self.num_slots:
            for parameter in self.slot_parameters(task):
                parameter.requires_grad_(False)


class InheritingSlots(PromptModule):
    """Per-task slots in HiDe-Prompt's lifecycle (its task prefixes, VAPT's adaptive
    prompts, HiDe-LoRA's adapters): slot t starts as a copy of slot t-1, and when task t
    ends, with prompt momentum m > 0, every parameter of slot t becomes
    (1 - m) itself + m mean over the slots < t (the authors' code), then is frozen.
    A subclass sets ``self.momentum`` and reports its slots as :class:`PromptModule` says.
    """

    momentum: float = 0.0

    def begin_task(self, task: int) -> None:
        if task > 0:
            with torch.no_grad():
                for new, old in zip(self.slot_parameters(task), self.slot_parameters(task - 1)):
                    new.copy_(old)
        super().begin_task(task)

    def end_task(self, task: int) -> None:
        if self.momentum > 0 and task > 0:
            with torch.no_grad():
                old_slots = [self.slot_parameters(slot) for slot in range(task)]
                for index, parameter in enumerate(self.slot_parameters(task)):
                    mean = torch.stack([slot[index] for slot in old_slots]).mean(0)
                    parameter.copy_((1 - self.momentum) * parameter + self.momentum * mean)
        super().end_task(task)


def single_task(task: TaskIndex, what: str) -> int | None:
    """``task`` as one task for the whole batch; a module that selects its prompts by key
    match (or uses every task learnt so far) cannot take per-input tasks."""
    if isinstance(task, Tensor):
        raise ValueError(f"{what} takes one task for the whole batch, not a tensor of tasks")
    return task


def merge_prompts(*prompts: Prompt) -> Prompt:
    """One :class:`Prompt` from several (e.g. DualPrompt's G- and E-prompts).

    Prefixes of the same layer are concatenated along Lp and prompt tokens along the
    sequence, broadcasting a batch dimension of 1; two gates on one layer are an error.
    """
    prefixes: dict[int, Tensor] = {}
    tokens: Tensor | None = None
    gates: dict[int, PrefixGate] = {}
    for prompt in prompts:
        for layer, prefix in prompt.prefixes.items():
            if layer in prefixes:
                prefix = _concat(prefixes[layer], prefix, 2)
            prefixes[layer] = prefix
        if prompt.tokens is not None:
            tokens = prompt.tokens if tokens is None else _concat(tokens, prompt.tokens, 1)
        for layer, gate in prompt.gates.items():
            if layer in gates:
                raise ValueError(f"two prompts gate layer {layer}")
            gates[layer] = gate
    # kv tokens, generators and deltas: concatenated / run both / summed
    return Prompt(prefixes=prefixes, tokens=tokens, gates=gates, **merge_layer_fields(*prompts))


def _concat(first: Tensor, second: Tensor, dim: int) -> Tensor:
    batch = max(first.shape[0], second.shape[0])
    first = first.expand(batch, *first.shape[1:])
    second = second.expand(batch, *second.shape[1:])
    return torch.cat([first, second], dim=dim)


def require_layers(layers: Sequence[int], num_layers: int, what: str) -> None:
    """The encoder skips prefixes of layers it lacks, silently: refuse such a setting."""
    if not layers or not all(0 <= layer < num_layers for layer in layers):
        raise UsageError(f"{what} {tuple(layers)} must lie in 0..{num_layers - 1} for this encoder")

"""Prefix prompts: DualPrompt's shared G-prompt and keyed E-prompts, HiDe-Prompt's (and
NoRGa's) task prefixes.

A prefix at a layer is Lp extra keys and Lp extra values that every token of the layer
attends to, one [B or 1, 2, Lp, D] tensor per layer (see
:class:`~clbench.encoders.attention.Prompt`). Prompts are initialised uniform(-1, 1), as
in the authors' code (inherited from L2P / DualPrompt). Every prefix owner takes a
:class:`~clbench.prompts.reparam.PrefixReparam`: with ``mlp`` / ``linear`` the prefix of
the task being learnt is generated (arXiv 2410.02200) and stored as a plain tensor when
the task ends (see :mod:`clbench.prompts.reparam`).

:func:`authors_batch_mix` reproduces how the PyTorch ports of DualPrompt (and HiDe-Prompt,
NoRGa after them) assemble per-sample prefixes: by a reshape that mixes the samples of a
batch (HiDe / NoRGa's ``prefix_layout=authors_batch_mix``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.attention import PrefixGate, Prompt, residual_gates
from clbench.prompts.base import (
    InheritingSlots,
    PromptModule,
    PromptSelection,
    TaskIndex,
    single_task,
)
from clbench.prompts.reparam import GeneratedSlot, PrefixReparam

# per_sample: every input's prefix is its own prompt's; authors_batch_mix: the ports' reshape
PrefixLayout = Literal["per_sample", "authors_batch_mix"]


def authors_batch_mix(prefix: Tensor, batch_size: int) -> Tensor:
    """One layer's prefixes [B or 1, 2, Lp, D] as the PyTorch ports assemble them.

    Their gather gives (layers, 2, B, Lp, ...) and is *reshaped* to (layers, B, 2, Lp, ...)
    where a permute was meant (JH-LEE-KR/dualprompt-pytorch prompt.py line 120, kept by
    HiDe-Prompt peft/prompt/hide_prompt.py lines 96-119 and NoRGa norga_prompt.py lines
    104-127). The layer axis leads, so per layer it is this reshape of (2, B) into (B, 2):
    half d of sample b's prefix is block j = 2b + d of the (2, B) layout, i.e. half
    j // B of the prompt of sample j % B. With one prompt for the batch (training), the
    first half of the batch gets the prompt's key half as keys and values, the second
    half its value half (an odd middle sample keeps key / value); with per-sample prompts
    (test), sample b takes keys from sample 2b's prompt and values from 2b + 1's (mod B).
    """
    per_sample = prefix.expand(batch_size, *prefix.shape[1:])
    return per_sample.transpose(0, 1).reshape(per_sample.shape)


def mix_prefixes_across_batch(prompt: Prompt, batch_size: int) -> Prompt:
    """``prompt`` with every layer's prefix assembled by :func:`authors_batch_mix` (gates,
    tokens, deltas unchanged)."""
    prefixes = {layer: authors_batch_mix(p, batch_size) for layer, p in prompt.prefixes.items()}
    return dataclasses.replace(prompt, prefixes=prefixes)


def batch_mix_sources(batch_size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Where :func:`authors_batch_mix` takes each prefix half from: ``sample`` and ``half``,
    both [B, 2] long; half d (0 keys, 1 values) of sample b's assembled prefix is half
    ``half[b, d]`` of the prefix of sample ``sample[b, d]``. Computed by the same reshape
    on tagged halves, so it cannot drift from the layout."""
    tags = torch.arange(2 * batch_size, device=device).view(batch_size, 2, 1, 1)
    mixed = authors_batch_mix(tags, batch_size)[..., 0, 0]
    return mixed // 2, mixed % 2


class SharedPrefix(PromptModule):
    """One prefix prompt for every input and every task (DualPrompt's G-prompt).

    Lp prefix keys and Lp prefix values at each of ``layers``, as one [1, 2, Lp, D] tensor
    per layer (broadcast over the batch); no key, no auxiliary loss, no per-task slot.
    With a generated ``reparam`` the prefix is generated while each task trains (one
    generator, drawn in the first task, trained on in every task) and stored at its end.
    """

    def __init__(
        self,
        prompt_length: int,
        embed_dim: int,
        *,
        layers: Sequence[int],
        reparam: PrefixReparam | None = None,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        shape = (len(self.layers), 2, prompt_length, embed_dim)
        self.prompts = nn.Parameter(torch.empty(shape).uniform_(-1, 1))
        reparam = reparam or PrefixReparam()
        self.generator = reparam.generator(len(self.layers), prompt_length, embed_dim)
        self.generated = GeneratedSlot(self.generator)

    def begin_task(self, task: int) -> None:
        self.generated.begin(0, self.prompts, fresh=task == 0)

    def end_task(self, task: int) -> None:
        self.generated.finish(0, self.prompts)

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        prompts = self.generated.prompt(0, self.prompts, train)
        prefixes = {layer: prompts[i].unsqueeze(0) for i, layer in enumerate(self.layers)}
        return PromptSelection(Prompt(prefixes=prefixes), query.new_zeros(()))


class TaskKeyedPrefixPool(PromptModule):
    """One prefix prompt and one learnable key per task (DualPrompt's E-prompts).

    Slot t belongs to task t; each prompt is [layers, 2, Lp, D] (prefix keys, values).
    ``task`` is the task being learnt (train) or the last one learnt (test):

    * train: the whole batch uses slot ``task`` (task identity is known while training);
      the auxiliary loss is DualPrompt's matching term mean_b (1 - cos(q_b, k_task));
    * test: each input uses the slot whose key is most cosine-similar to its query, among
      slots 0..``task`` (later slots are untrained random keys, never candidates); the
      auxiliary loss is the same term for the chosen keys.

    Every slot is its own parameter, so ``begin_task(task)`` takes the other slots out of
    the optimizer: old prompts and keys stay exactly as trained, weight decay or not.
    With a generated ``reparam`` the prompt of the task being learnt is generated (a new
    draw per task, or with ``inherit_generator`` the previous task's generator trained
    on) and stored at the end of the task.
    """

    def __init__(
        self,
        num_slots: int,
        prompt_length: int,
        embed_dim: int,
        key_dim: int,
        *,
        layers: Sequence[int],
        reparam: PrefixReparam | None = None,
        inherit_generator: bool = False,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        shape = (len(self.layers), 2, prompt_length, embed_dim)
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(shape).uniform_(-1, 1)) for _ in range(num_slots)]
        )
        self.keys = nn.ParameterList(
            [nn.Parameter(torch.empty(key_dim).uniform_(-1, 1)) for _ in range(num_slots)]
        )
        reparam = reparam or PrefixReparam()
        self.generator = reparam.generator(len(self.layers), prompt_length, embed_dim)
        self.generated = GeneratedSlot(self.generator)
        self.inherit_generator = inherit_generator

    @property
    def num_slots(self) -> int:
        return len(self.prompts)

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [self.prompts[slot], self.keys[slot]]

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        if 0 <= task < self.num_slots:
            fresh = task == 0 or not self.inherit_generator
            self.generated.begin(task, self.prompts[task], fresh=fresh)

    def end_task(self, task: int) -> None:
        self.store_generated(task)
        super().end_task(task)

    def store_generated(self, task: int) -> None:
        """A generated prompt of ``task`` becomes its plain tensor (no-op when free)."""
        if 0 <= task < self.num_slots:
            self.generated.finish(task, self.prompts[task])

    def slot_prompts(self, train: bool = False) -> list[Tensor]:
        """Every slot's prompt [layers, 2, Lp, D] (the generated one while its task trains)."""
        return self.generated.prompts(self.prompts, train)

    def similarity(self, query: Tensor, num_candidates: int) -> Tensor:
        """cos(q, k_t) for the first ``num_candidates`` slots: [B, num_candidates]."""
        keys = torch.stack(list(self.keys)[:num_candidates])
        return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        task = single_task(task, "an E-prompt pool (it matches keys)")
        last = self.num_slots - 1 if task is None else task
        if not 0 <= last < self.num_slots:
            raise ValueError(f"task {last} has no slot: the pool has {self.num_slots}")
        batch = query.shape[0]
        if train:
            if task is None:
                raise ValueError("training an E-prompt needs the task identity")
            similarity = F.cosine_similarity(query, self.keys[task].unsqueeze(0), dim=-1)
            chosen = torch.full((batch, 1), task, dtype=torch.long, device=query.device)
            prompt = self.generated.prompt(task, self.prompts[task], train)
            per_layer = prompt.unsqueeze(1)  # [layers, 1, 2, Lp, D]
        else:
            similarities = self.similarity(query, last + 1)
            chosen = similarities.argmax(dim=1, keepdim=True)  # top-1 key match
            similarity = similarities.gather(1, chosen).squeeze(1)
            candidates = torch.stack(self.slot_prompts()[: last + 1])
            per_layer = candidates[chosen[:, 0]].transpose(0, 1)  # [layers, B, 2, Lp, D]
        pull = (1.0 - similarity).mean()
        prefixes = {layer: per_layer[i] for i, layer in enumerate(self.layers)}
        return PromptSelection(Prompt(prefixes=prefixes), pull, chosen)


class TaskPrefixPrompts(InheritingSlots):
    """One prefix prompt per task at ``layers`` (HiDe-Prompt, NoRGa), no key.

    ``task`` is an int while training (the task is known) or a tensor [B] of inferred
    tasks at test time, gathered per sample in one indexing op; the query is not read
    (the task picks the prompt), so it may be None. With ``gate_activation`` each prompted
    layer gets NoRGa's residual gate on its prefix logits (the gates are shared by all
    tasks, not part of any slot).

    Lifecycle (HiDe's): ``begin_task(t)`` initialises P_t from P_{t-1} and trains only
    P_t; ``end_task(t)`` applies prompt momentum P_t <- (1 - m) P_t + m mean(P_<t), then
    freezes P_t. With a generated ``reparam``, P_t is g(P') while task t trains, the
    generator drawn in task 0 and trained on from task to task (so P_t starts as
    P_{t-1} before its momentum); ``end_task`` stores g(P') into P_t before the momentum.

    With ``momentum_while_training`` (the authors' code), task t > 0 also *trains* with
    the mix (1 - m) P_t + m mean(P_<t), the mean detached; the stored prompt is the same
    mix, so ``end_task`` stores what training used.
    """

    def __init__(
        self,
        num_tasks: int,
        layers: Sequence[int],
        length: int,
        embed_dim: int,
        momentum: float = 0.0,
        gate_activation: str | None = None,
        reparam: PrefixReparam | None = None,
        momentum_while_training: bool = False,
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.momentum = momentum
        self.momentum_while_training = momentum_while_training
        shape = (len(self.layers), 2, length, embed_dim)
        self.prompts = nn.ParameterList(
            nn.Parameter(torch.empty(shape).uniform_(-1, 1)) for _ in range(num_tasks)
        )
        reparam = reparam or PrefixReparam()
        self.generator = reparam.generator(len(self.layers), length, embed_dim)
        self.generated = GeneratedSlot(self.generator)
        self.gates = residual_gates(self.layers, gate_activation)

    @property
    def num_slots(self) -> int:
        return len(self.prompts)

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [self.prompts[slot]]

    def begin_task(self, task: int) -> None:
        """The new prompt starts as the previous one; only it trains."""
        super().begin_task(task)
        self.generated.begin(task, self.prompts[task], fresh=task == 0)

    def end_task(self, task: int) -> None:
        """P_t <- (1 - m) P_t + m mean(P_<t), then freeze P_t (HiDe's prompt momentum)."""
        self.generated.finish(task, self.prompts[task])  # a plain tensor from here
        super().end_task(task)

    def forward(
        self, query: Tensor | None = None, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        if task is None:
            raise ValueError("task prefixes are chosen by the task: pass task=")
        if isinstance(task, int):
            prompt = self.generated.prompt(task, self.prompts[task], train)
            if train and self.momentum_while_training and self.momentum > 0 and task > 0:
                previous = torch.stack(list(self.prompts[:task])).mean(0).detach()
                prompt = (1 - self.momentum) * prompt + self.momentum * previous
            per_sample = prompt.unsqueeze(0)  # [1, layers, 2, L, D]
        else:
            slots = self.generated.prompts(self.prompts, train)
            per_sample = torch.stack(slots)[task]  # [B, layers, 2, L, D]
        prefixes = {layer: per_sample[:, i] for i, layer in enumerate(self.layers)}
        gates: dict[int, PrefixGate] = {int(layer): gate for layer, gate in self.gates.items()}
        zero = per_sample.new_zeros(())
        return PromptSelection(Prompt(prefixes=prefixes, gates=gates), zero)

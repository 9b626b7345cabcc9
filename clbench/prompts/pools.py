"""Prompt pools with learnable keys: L2P's shared pool and WAVE-CRE's pools per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.attention import Prompt
from clbench.prompts.base import PromptModule, PromptSelection, TaskIndex

PromptVariant = Literal["prefix", "soft-tokens"]


class PromptPool(PromptModule):
    """A pool of M prompts with learnable keys, cosine top-N selection on the query (L2P).

    mode="tokens": each prompt is Lp tokens prepended at the input (prompt tuning, L2P);
    mode="prefix": each prompt is Lp prefix keys and values at each of ``layers``
    (prefix tuning, as WAVE-CRE uses its per-task pools). The auxiliary loss is L2P's
    surrogate pull term: sum over the N chosen keys of (1 - cos(q, k)), averaged over
    the batch (L2P's ``reduce_sim``; the strategy multiplies it by its lambda). The pool
    is shared by every task: it has no per-task slots, so it trains in every task.
    """

    def __init__(
        self,
        pool_size: int,
        prompt_length: int,
        top_k: int,
        embed_dim: int,
        key_dim: int,
        *,
        mode: Literal["tokens", "prefix"] = "tokens",
        layers: Sequence[int] = (),
        batchwise_selection: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be in 1..pool_size ({pool_size}), got {top_k}")
        if mode == "prefix" and not layers:
            raise ValueError("a prefix pool needs the layers it prompts")
        self.top_k = top_k
        self.mode = mode
        self.layers = tuple(layers)
        self.batchwise_selection = batchwise_selection
        if mode == "tokens":
            shape: tuple[int, ...] = (pool_size, prompt_length, embed_dim)
        else:
            shape = (pool_size, len(self.layers), 2, prompt_length, embed_dim)
        # uniform(-1, 1) initialisation of prompts and keys, as in L2P's code
        self.prompts = nn.Parameter(torch.empty(shape).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim).uniform_(-1, 1))

    def similarity(self, query: Tensor) -> Tensor:
        """cos(q, k_m) for every query and key: [B, M]."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def select(self, similarity: Tensor) -> Tensor:
        """Indices [B, N] of the chosen prompts."""
        chosen = similarity.topk(self.top_k, dim=1).indices
        if self.batchwise_selection:
            # L2P's option: every input of the batch uses the N prompts chosen most often
            # in the batch (ties broken by the lower index), a vectorised mode.
            counts = F.one_hot(chosen, similarity.shape[1]).sum(dim=(0, 1))
            majority = counts.topk(self.top_k).indices
            chosen = majority.unsqueeze(0).expand(similarity.shape[0], -1)
        return chosen

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        similarity = self.similarity(query)
        chosen = self.select(similarity)
        pull = (1.0 - similarity.gather(1, chosen)).sum(dim=1).mean()
        picked = self.prompts[chosen]  # [B, N, ...]
        batch = query.shape[0]
        if self.mode == "tokens":
            prompt = Prompt(tokens=picked.reshape(batch, -1, picked.shape[-1]))
        else:
            # [B, N, layers, 2, Lp, D] -> per layer [B, 2, N*Lp, D]
            per_layer = picked.permute(2, 0, 3, 1, 4, 5)
            per_layer = per_layer.reshape(len(self.layers), batch, 2, -1, picked.shape[-1])
            prompt = Prompt(prefixes={layer: per_layer[i] for i, layer in enumerate(self.layers)})
        return PromptSelection(prompt, pull, chosen)


class TaskPool(PromptPool):
    """One task's pool (WAVE-CRE): L2P's keys, cosine top-K and pull term
    (:class:`PromptPool`), with the K chosen prompts assembled by :meth:`assemble` so that
    a batch whose inputs use different pools (:class:`TaskPromptPools`) is assembled by
    the same code."""

    def __init__(
        self,
        variant: PromptVariant,
        pool_size: int,
        prompt_length: int,
        top_k: int,
        embed_dim: int,
        key_dim: int,
        layers: tuple[int, ...],
    ) -> None:
        mode: Literal["tokens", "prefix"] = "prefix" if variant == "prefix" else "tokens"
        super().__init__(
            pool_size,
            prompt_length,
            top_k,
            embed_dim,
            key_dim,
            mode=mode,
            layers=layers if mode == "prefix" else (),
        )

    def assemble(self, picked: Tensor, scores: Tensor) -> Prompt:
        """The prompt from the chosen prompts ``picked`` [B, K, ...] and their cosines [B, K]."""
        if self.mode == "prefix":
            # the paper: the K prompts' prefixes side by side, [B, K, layers, 2, L, D] ->
            # per layer [B, 2, K*L, D]
            batch, dim = picked.shape[0], picked.shape[-1]
            per_layer = picked.permute(2, 0, 3, 1, 4, 5).reshape(
                len(self.layers), batch, 2, -1, dim
            )
            return Prompt(prefixes={layer: per_layer[i] for i, layer in enumerate(self.layers)})
        # the authors' code: softmax over the K cosines, then the mean of the weighted
        # prompts (their 1/K scale included) -> one prompt of L tokens
        weights = scores.softmax(dim=1)
        return Prompt(tokens=(weights[:, :, None, None] * picked).mean(dim=1))

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        similarity = self.similarity(query)
        chosen = self.select(similarity)
        scores = similarity.gather(1, chosen)
        pull = (1.0 - scores).sum(dim=1).mean()
        return PromptSelection(self.assemble(self.prompts[chosen], scores), pull, chosen)


class TaskPromptPools(PromptModule):
    """One :class:`TaskPool` per task (WAVE-CRE); each pool is a per-task slot.

    ``task`` an int: that task's pool for the whole batch (training); a tensor [B]: each
    input queries its own (predicted) task's pool, gathered in one indexing op over the
    stacked pools (test time).
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        variant: PromptVariant,
        pool_size: int,
        prompt_length: int,
        top_k: int,
        embed_dim: int,
        key_dim: int,
        layers: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            TaskPool(variant, pool_size, prompt_length, top_k, embed_dim, key_dim, layers)
            for _ in range(num_tasks)
        )

    def task_pools(self) -> list[TaskPool]:
        return [cast(TaskPool, pool) for pool in self.pools]

    @property
    def num_slots(self) -> int:
        return len(self.pools)

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return list(self.pools[slot].parameters())

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        if task is None:
            raise ValueError("a task's pool is chosen by its task: pass task=")
        if isinstance(task, int):
            return self.pools[task](query, train=train)
        pools = self.task_pools()
        keys = torch.stack([pool.keys for pool in pools])[task]  # [B, M, Dq]
        similarity = torch.einsum(
            "bd,bmd->bm", F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
        )
        first = pools[0]
        chosen = first.select(similarity)
        scores = similarity.gather(1, chosen)
        prompts = torch.stack([pool.prompts for pool in pools])  # [T, M, ...]
        picked = prompts[task[:, None], chosen]  # [B, K, ...]
        pull = (1.0 - scores).sum(dim=1).mean()
        return PromptSelection(first.assemble(picked, scores), pull, chosen)

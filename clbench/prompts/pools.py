"""Prompt pools with learnable keys: L2P's shared pool, DualPrompt's E-prompt pool with the
authors' code's batch-wise vote, and WAVE-CRE's pools per task.

Also the two pieces of L2P / DualPrompt's official JAX code (google-research/l2p) that
their papers do not describe, shared by both strategies: the batch-wise majority vote
(:func:`batchwise_vote`) and flax's default initialiser (:func:`jax_uniform_`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.attention import Prompt
from clbench.errors import UsageError
from clbench.prompts.base import PromptModule, PromptSelection, TaskIndex
from clbench.prompts.prefixes import TaskKeyedPrefixPool
from clbench.prompts.reparam import GeneratedSlot, PrefixReparam

PromptVariant = Literal["prefix", "soft-tokens"]
# symmetric: U(-1, 1), the PyTorch ports' (and clbench's default); jax: flax's uniform()
PromptInit = Literal["symmetric", "jax"]


def batchwise_vote(chosen: Tensor, num_prompts: int, group_size: int = 0) -> Tensor:
    """L2P's batch-wise prompt selection: every input takes its group's majority prompts.

    ``chosen`` [B, N] are the prompts each input picked; the inputs form groups of
    ``group_size`` consecutive inputs (0: the whole batch is one group). Each group's N
    prompts are those picked most often in it, ordered by count and, between equal counts,
    lower index first, as the authors' JAX code orders them (``jnp.unique`` sorts the ids,
    ``jax.lax.top_k`` keeps the first of equals; models/prompt.py lines 211-216). The JAX
    code votes inside each device's share of the batch (``pmap``), hence the groups.
    Returns [B, N]: the majority of each input's group.
    """
    batch, top_k = chosen.shape
    size = batch if group_size <= 0 else group_size
    group = torch.arange(batch, device=chosen.device) // size
    counts = torch.zeros(
        (batch + size - 1) // size, num_prompts, dtype=torch.long, device=chosen.device
    )
    counts.index_add_(0, group, F.one_hot(chosen, num_prompts).sum(dim=1))
    # one integer per (count, index): a higher count first, then the lower index
    lower_first = torch.arange(num_prompts - 1, -1, -1, device=chosen.device)
    majority = (counts * num_prompts + lower_first).topk(top_k, dim=1).indices
    return majority[group]


def check_vote_group(batchwise: bool, group: int, batch_size: int, eval_batch_size: int) -> None:
    """A vote group must tile both batch sizes, so that the groups are the same whatever
    the batch size (as the authors' per-device batches are)."""
    if group < 0:
        raise UsageError(f"vote_group must be >= 0 (0: the whole batch), got {group}")
    if batchwise and group > 0 and (batch_size % group or eval_batch_size % group):
        raise UsageError(
            f"vote_group={group} must divide batch_size ({batch_size}) and eval_batch_size "
            f"({eval_batch_size}): set them to multiples of {group}, or vote_group=0"
        )


@torch.no_grad()
def jax_uniform_(module: nn.Module) -> None:
    """Every parameter of ``module`` drawn from U[0, 0.01): flax's ``nn.initializers.uniform()``,
    which the authors' JAX code uses for L2P's prompts and keys and DualPrompt's G- and
    E-prompts and keys (models/prompt.py lines 137 and 198, models/vit.py lines 329-341)."""
    for parameter in module.parameters():
        parameter.uniform_(0.0, 0.01)


class PromptPool(PromptModule):
    """A pool of M prompts with learnable keys, cosine top-N selection on the query (L2P).

    mode="tokens": each prompt is Lp tokens prepended at the input (prompt tuning, L2P);
    mode="prefix": each prompt is Lp prefix keys and values at each of ``layers``
    (prefix tuning, as WAVE-CRE uses its per-task pools). The auxiliary loss is L2P's
    surrogate pull term: sum over the N chosen keys of (1 - cos(q, k)), averaged over
    the batch (L2P's ``reduce_sim``; the strategy multiplies it by its lambda). The pool
    is shared by every task: it has no per-task slots, so it trains in every task.

    Options of the authors' JAX code (off by default):

    * ``batchwise_selection``: the inputs of each group of ``vote_group`` (0: the whole
      batch) use the group's majority prompts (:func:`batchwise_vote`), in training and
      at test time;
    * ``task_prompt_mask``: while training task t (``task=t``), every input uses prompts
      t*N .. (t+1)*N - 1 instead of its key match, where the pool has them (the JAX
      ``use_prompt_mask``, train_continual.py lines 237-245);
    * ``shared_prompt_pool``: ``begin_task(t)`` copies prompts (t-1)*N .. t*N - 1 onto
      t*N .. (t+1)*N - 1, where both fit; the keys are not copied (train_continual.py
      lines 551-571; the configs leave ``shared_prompt_key`` off).
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
        vote_group: int = 0,
        task_prompt_mask: bool = False,
        shared_prompt_pool: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be in 1..pool_size ({pool_size}), got {top_k}")
        if mode == "prefix" and not layers:
            raise ValueError("a prefix pool needs the layers it prompts")
        self.pool_size = pool_size
        self.top_k = top_k
        self.mode = mode
        self.layers = tuple(layers)
        self.batchwise_selection = batchwise_selection
        self.vote_group = vote_group
        self.task_prompt_mask = task_prompt_mask
        self.shared_prompt_pool = shared_prompt_pool
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
            chosen = batchwise_vote(chosen, similarity.shape[1], self.vote_group)
        return chosen

    def task_prompts(self, task: int) -> range | None:
        """The prompts of ``task`` under the JAX prompt mask (None: the pool is too small)."""
        end = (task + 1) * self.top_k
        return range(task * self.top_k, end) if end <= self.pool_size else None

    def begin_task(self, task: int) -> None:
        """With ``shared_prompt_pool``: task t's prompts start as task t-1's (JAX)."""
        current = self.task_prompts(task) if self.shared_prompt_pool and task > 0 else None
        if current is not None:
            with torch.no_grad():
                previous = slice(current.start - self.top_k, current.start)
                self.prompts[current.start : current.stop].copy_(self.prompts[previous])
        super().begin_task(task)

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        similarity = self.similarity(query)
        masked = (
            self.task_prompts(task)
            if train and self.task_prompt_mask and isinstance(task, int)
            else None
        )
        if masked is not None:
            row = torch.arange(masked.start, masked.stop, device=query.device)
            chosen = row.unsqueeze(0).expand(query.shape[0], -1)
        else:
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


class VotingKeyedPrefixPool(TaskKeyedPrefixPool):
    """DualPrompt's E-prompts (:class:`~clbench.prompts.prefixes.TaskKeyedPrefixPool`) with
    two options of the authors' JAX code, both off by default:

    * ``batchwise_selection``: at test time every input of a group of ``vote_group``
      consecutive inputs (0: the whole batch) uses the E-prompt that the group's key
      matches chose most often (:func:`batchwise_vote`; ``batchwise_prompt`` in the JAX
      CIFAR-100 config). Training is unchanged: the task's own E-prompt, which is what
      the JAX prompt mask gives;
    * ``shared_prompt_pool``: ``begin_task(t)`` initialises E_t from E_{t-1}; the key k_t
      keeps its own initialisation (train_continual.py lines 551-571; both DualPrompt
      configs leave ``shared_prompt_key`` off).
    """

    def __init__(
        self,
        num_slots: int,
        prompt_length: int,
        embed_dim: int,
        key_dim: int,
        *,
        layers: Sequence[int],
        batchwise_selection: bool = False,
        vote_group: int = 0,
        shared_prompt_pool: bool = False,
        reparam: PrefixReparam | None = None,
    ) -> None:
        super().__init__(
            num_slots,
            prompt_length,
            embed_dim,
            key_dim,
            layers=layers,
            reparam=reparam,
            inherit_generator=shared_prompt_pool,
        )
        self.batchwise_selection = batchwise_selection
        self.vote_group = vote_group
        self.shared_prompt_pool = shared_prompt_pool

    def begin_task(self, task: int) -> None:
        if self.shared_prompt_pool and 0 < task < self.num_slots:
            with torch.no_grad():
                self.prompts[task].copy_(self.prompts[task - 1])
        super().begin_task(task)

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        selection = super().forward(query, task=task, train=train)
        if train or not self.batchwise_selection:
            return selection
        assert selection.selected is not None  # the key match's choices, [B, 1]
        chosen = batchwise_vote(selection.selected, self.num_slots, self.vote_group)
        slot = chosen[:, 0]
        keys = torch.stack(list(self.keys))[slot]  # [B, Dq]
        pull = (1.0 - F.cosine_similarity(query, keys, dim=-1)).mean()
        per_layer = torch.stack(self.slot_prompts())[slot].transpose(0, 1)  # [layers, B, 2, Lp, D]
        prefixes = {layer: per_layer[i] for i, layer in enumerate(self.layers)}
        return PromptSelection(Prompt(prefixes=prefixes), pull, chosen)


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
        return self.choose(query, self.prompts)

    def choose(self, query: Tensor, prompts: Tensor) -> PromptSelection:
        """The pool's keys pick from ``prompts`` (its own, or generated ones in their place)."""
        similarity = self.similarity(query)
        chosen = self.select(similarity)
        scores = similarity.gather(1, chosen)
        pull = (1.0 - scores).sum(dim=1).mean()
        return PromptSelection(self.assemble(prompts[chosen], scores), pull, chosen)


class TaskPromptPools(PromptModule):
    """One :class:`TaskPool` per task (WAVE-CRE); each pool is a per-task slot.

    ``task`` an int: that task's pool for the whole batch (training); a tensor [B]: each
    input queries its own (predicted) task's pool, gathered in one indexing op over the
    stacked pools (test time). With a generated ``reparam`` (prefix pools only) the
    prompts of the pool being trained are generated, by a new draw of one generator per
    task, and stored in the pool at the end of its task.
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
        reparam: PrefixReparam | None = None,
    ) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            TaskPool(variant, pool_size, prompt_length, top_k, embed_dim, key_dim, layers)
            for _ in range(num_tasks)
        )
        reparam = reparam or PrefixReparam()
        if reparam.generated and variant != "prefix":
            raise UsageError(f"prefix_param={reparam.kind} needs prefix prompts, not {variant}")
        rows = pool_size * prompt_length
        self.generator = reparam.generator(len(layers), rows, embed_dim)

        def as_pool(prefix: Tensor) -> Tensor:  # [layers, 2, M*L, D] -> [M, layers, 2, L, D]
            per_prompt = prefix.reshape(len(layers), 2, pool_size, prompt_length, embed_dim)
            return per_prompt.permute(2, 0, 1, 3, 4)

        self.generated = GeneratedSlot(self.generator, as_pool)

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        if 0 <= task < self.num_slots:
            self.generated.begin(task, self.task_pools()[task].prompts, fresh=True)

    def end_task(self, task: int) -> None:
        if 0 <= task < self.num_slots:
            self.generated.finish(task, self.task_pools()[task].prompts)
        super().end_task(task)

    def generator_parameters(self) -> list[nn.Parameter]:
        """The generator's parameters (train with the current pool; none when free)."""
        return self.generated.parameters()

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
            pool = self.task_pools()[task]
            return pool.choose(query, self.generated.prompt(task, pool.prompts, train))
        pools = self.task_pools()
        keys = torch.stack([pool.keys for pool in pools])[task]  # [B, M, Dq]
        similarity = torch.einsum(
            "bd,bmd->bm", F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
        )
        first = pools[0]
        chosen = first.select(similarity)
        scores = similarity.gather(1, chosen)
        prompts = torch.stack(self.generated.prompts([pool.prompts for pool in pools], False))
        picked = prompts[task[:, None], chosen]  # [B, K, ...]
        pull = (1.0 - scores).sum(dim=1).mean()
        return PromptSelection(first.assemble(picked, scores), pull, chosen)

"""Prompt modules: one contract for every method's prompts.

Every prompt module answers the same call (after CODA-Prompt's design)::

    selection = module(query, task=..., train=...)

with ``query`` the frozen encoder's un-prompted pooled feature [B, Dq]; it returns a
:class:`PromptSelection`: the :class:`~clbench.encoders.attention.Prompt` to run the encoder
with, the module's auxiliary loss, and which prompts were chosen. A strategy is then a
handful of lines: query -> prompt module -> encoder(x, prompt) -> head.

Everything runs batched on the module's device: no loop over samples, no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.attention import Prompt


@dataclass
class PromptSelection:
    prompt: Prompt
    aux_loss: Tensor
    selected: Tensor | None = None  # [B, k] indices of the chosen prompts, where relevant


class PromptModule(nn.Module):
    """Base of all prompt modules (see the module docstring for the contract)."""

    def forward(self, query: Tensor, *, task: int | None = None, train: bool = False) -> PromptSelection:
        raise NotImplementedError


class PromptPool(PromptModule):
    """A pool of M prompts with learnable keys, cosine top-N selection on the query (L2P).

    mode="tokens": each prompt is Lp tokens prepended at the input (prompt tuning, L2P);
    mode="prefix": each prompt is Lp prefix keys and values at each of ``layers``
    (prefix tuning, as WAVE-CRE uses its per-task pools). The auxiliary loss is L2P's
    surrogate pull term: sum over the N chosen keys of (1 - cos(q, k)), averaged over
    the batch (L2P's ``reduce_sim``; the strategy multiplies it by its lambda).
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

    def forward(self, query: Tensor, *, task: int | None = None, train: bool = False) -> PromptSelection:
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


def merge_prompts(*prompts: Prompt) -> Prompt:
    """One :class:`Prompt` from several (e.g. DualPrompt's G- and E-prompts).

    Prefixes of the same layer are concatenated along Lp and prompt tokens along the
    sequence, broadcasting a batch dimension of 1; two gates on one layer are an error.
    """
    prefixes: dict[int, Tensor] = {}
    tokens: Tensor | None = None
    gates: dict = {}
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
    return Prompt(prefixes=prefixes, tokens=tokens, gates=gates)


def _concat(first: Tensor, second: Tensor, dim: int) -> Tensor:
    batch = max(first.shape[0], second.shape[0])
    first = first.expand(batch, *first.shape[1:])
    second = second.expand(batch, *second.shape[1:])
    return torch.cat([first, second], dim=dim)


class SharedPrefix(PromptModule):
    """One prefix prompt for every input and every task (DualPrompt's G-prompt).

    Lp prefix keys and Lp prefix values at each of ``layers``, as one [1, 2, Lp, D] tensor
    per layer (broadcast over the batch); no key, no auxiliary loss. Initialised
    uniform(-1, 1) as in the DualPrompt code.
    """

    def __init__(self, prompt_length: int, embed_dim: int, *, layers: Sequence[int]) -> None:
        super().__init__()
        self.layers = tuple(layers)
        shape = (len(self.layers), 2, prompt_length, embed_dim)
        self.prompts = nn.Parameter(torch.empty(shape).uniform_(-1, 1))

    def forward(
        self, query: Tensor, *, task: int | None = None, train: bool = False
    ) -> PromptSelection:
        prefixes = {layer: self.prompts[i].unsqueeze(0) for i, layer in enumerate(self.layers)}
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

    Every slot is its own parameter so ``train_only(task)`` takes the other slots out of
    the optimizer: old prompts and keys stay exactly as trained, weight decay or not.
    Prompts and keys are initialised uniform(-1, 1) as in the DualPrompt code.
    """

    def __init__(
        self,
        num_slots: int,
        prompt_length: int,
        embed_dim: int,
        key_dim: int,
        *,
        layers: Sequence[int],
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

    @property
    def num_slots(self) -> int:
        return len(self.prompts)

    def train_only(self, task: int) -> None:
        """Only slot ``task`` requires grad (and so only it reaches the optimizer)."""
        for slot, (prompt, key) in enumerate(zip(self.prompts, self.keys)):
            prompt.requires_grad_(slot == task)
            key.requires_grad_(slot == task)

    def similarity(self, query: Tensor, num_candidates: int) -> Tensor:
        """cos(q, k_t) for the first ``num_candidates`` slots: [B, num_candidates]."""
        keys = torch.stack(list(self.keys)[:num_candidates])
        return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T

    def forward(
        self, query: Tensor, *, task: int | None = None, train: bool = False
    ) -> PromptSelection:
        last = self.num_slots - 1 if task is None else task
        if not 0 <= last < self.num_slots:
            raise ValueError(f"task {last} has no slot: the pool has {self.num_slots}")
        batch = query.shape[0]
        if train:
            if task is None:
                raise ValueError("training an E-prompt needs the task identity")
            similarity = F.cosine_similarity(query, self.keys[task].unsqueeze(0), dim=-1)
            chosen = torch.full((batch, 1), task, dtype=torch.long, device=query.device)
            per_layer = self.prompts[task].unsqueeze(1)  # [layers, 1, 2, Lp, D]
        else:
            similarities = self.similarity(query, last + 1)
            chosen = similarities.argmax(dim=1, keepdim=True)  # top-1 key match
            similarity = similarities.gather(1, chosen).squeeze(1)
            candidates = torch.stack(list(self.prompts)[: last + 1])
            per_layer = candidates[chosen[:, 0]].transpose(0, 1)  # [layers, B, 2, Lp, D]
        pull = (1.0 - similarity).mean()
        prefixes = {layer: per_layer[i] for i, layer in enumerate(self.layers)}
        return PromptSelection(Prompt(prefixes=prefixes), pull, chosen)


class ComponentPrompt(PromptModule):
    """CODA-Prompt's decomposed attention-based prompt (Smith et al., CVPR 2023).

    At each of ``layers``: M components, M/T per task, each a key K_m and an attention
    vector A_m of the query's size and a prompt P_m of Lp x D. For a query q,

        alpha_m = cos(q * A_m, K_m),    prompt = sum_m alpha_m P_m,

    over the components of tasks 0..``task`` (those of later tasks are not in the sum);
    the first Lp/2 rows of the prompt are the prefix keys, the rest the prefix values
    (the authors' split). ``begin_task(t)`` initialises task t's K, A and P as random
    unit vectors orthogonal to every earlier component of the same layer (the paper's
    Gram-Schmidt) and makes them the only trainable ones; old components are also
    detached in the forward pass, so they never change after their task.
    Auxiliary loss: mu * sum over layers of mean((K K^T - I)^2) + the same for A and for
    P flattened (the paper's optional orthogonality regulariser; mu = 0 in the best
    config of the authors).
    """

    def __init__(
        self,
        pool_size: int,
        num_tasks: int,
        prompt_length: int,
        embed_dim: int,
        key_dim: int,
        *,
        layers: Sequence[int],
        ortho_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if num_tasks < 1 or pool_size % num_tasks:
            raise ValueError(
                f"pool_size ({pool_size}) must be a multiple of num_tasks ({num_tasks})"
            )
        if prompt_length % 2:
            raise ValueError(f"prompt_length must be even (keys | values), got {prompt_length}")
        if pool_size > min(key_dim, prompt_length * embed_dim):
            raise ValueError(
                f"{pool_size} components cannot be mutually orthogonal in dimension "
                f"{min(key_dim, prompt_length * embed_dim)}: use a smaller pool_size"
            )
        self.layers = tuple(layers)
        self.num_tasks = num_tasks
        self.per_task = pool_size // num_tasks
        self.ortho_weight = ortho_weight

        def per_task_chunks(*shape: int) -> nn.ParameterList:
            size = (len(self.layers), self.per_task, *shape)
            return nn.ParameterList([nn.Parameter(torch.zeros(size)) for _ in range(num_tasks)])

        self.keys = per_task_chunks(key_dim)
        self.attention = per_task_chunks(key_dim)
        self.prompts = per_task_chunks(prompt_length, embed_dim)
        # tasks whose components hold their orthogonal initialisation: a buffer so that it
        # is checkpointed, mirrored as an int so the forward pass never reads the device
        self.register_buffer("num_initialised", torch.zeros((), dtype=torch.long))
        self._initialised = 0
        self.begin_task(0)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: object, **kwargs: object
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialised = int(self.num_initialised)

    @torch.no_grad()
    def begin_task(self, task: int) -> None:
        """Initialise the components of tasks up to ``task`` (once) and train only ``task``'s."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} has no components: the pool is split over "
                             f"{self.num_tasks} tasks")
        for new in range(self._initialised, task + 1):
            for chunks in (self.keys, self.attention, self.prompts):
                for layer in range(len(self.layers)):
                    previous = [chunks[old][layer].flatten(1) for old in range(new)]
                    fresh = orthonormal_extension(previous, chunks[new][layer].flatten(1))
                    chunks[new][layer].copy_(fresh.view_as(chunks[new][layer]))
        self._initialised = max(self._initialised, task + 1)
        self.num_initialised.fill_(self._initialised)
        for chunks in (self.keys, self.attention, self.prompts):
            for owner, chunk in enumerate(chunks):
                chunk.requires_grad_(owner == task)

    def _active(self, chunks: nn.ParameterList, task: int) -> Tensor:
        """Components of tasks 0..task, [layers, m, ...]; the old ones detached."""
        parts = [chunk if owner == task else chunk.detach() for owner, chunk in enumerate(chunks)]
        return torch.cat(parts[: task + 1], dim=1)

    def _task(self, task: int | None) -> int:
        task = self._initialised - 1 if task is None else task
        if not 0 <= task < self._initialised:
            raise ValueError(f"task {task}: components exist for tasks 0..{self._initialised - 1}")
        return task

    def weights(self, query: Tensor, task: int | None = None) -> Tensor:
        """alpha = cos(q * A_m, K_m) for the components of tasks 0..task: [layers, B, m]."""
        task = self._task(task)
        keys = F.normalize(self._active(self.keys, task), dim=-1)
        attention = self._active(self.attention, task)
        # (q * A) . K^ / |q * A| without materialising the [layers, B, m, Dq] product
        numerator = torch.einsum("bd,lmd->lbm", query, attention * keys)
        squared_norm = torch.einsum("bd,lmd->lbm", query.square(), attention.square())
        return numerator / squared_norm.clamp_min(1e-24).sqrt()

    def forward(
        self, query: Tensor, *, task: int | None = None, train: bool = False
    ) -> PromptSelection:
        task = self._task(task)
        alpha = self.weights(query, task)
        prompts = self._active(self.prompts, task)
        combined = torch.einsum("lbm,lmpd->lbpd", alpha, prompts)  # [layers, B, Lp, D]
        layers, batch, length, dim = combined.shape
        # rows [0, Lp/2) are the prefix keys and [Lp/2, Lp) the values: a split along Lp
        prefixes = combined.reshape(layers, batch, 2, length // 2, dim)
        aux = query.new_zeros(())
        if train and self.ortho_weight > 0:
            for chunks in (self.keys, self.attention, self.prompts):
                components = self._active(chunks, task).flatten(2)  # [layers, m, d]
                gram = components @ components.transpose(1, 2)
                identity = torch.eye(gram.shape[-1], device=gram.device)
                aux = aux + ((gram - identity) ** 2).mean(dim=(1, 2)).sum()
            aux = self.ortho_weight * aux
        prompt = Prompt(prefixes={layer: prefixes[i] for i, layer in enumerate(self.layers)})
        return PromptSelection(prompt, aux)


def orthonormal_extension(previous: Sequence[Tensor], like: Tensor) -> Tensor:
    """Random unit rows shaped like ``like`` [n, d], orthogonal to every row of ``previous``
    and to each other: Gram-Schmidt of Gaussian vectors against all earlier components
    (CODA-Prompt), done as one QR of [previous; fresh]^T, whose columns are exactly the
    Gram-Schmidt sequence of those rows (exact even if the earlier rows are no longer
    orthogonal after training)."""
    fresh = torch.randn_like(like)
    if not previous:
        return torch.linalg.qr(fresh.T).Q.T
    stacked = torch.cat([*previous, fresh])
    if stacked.shape[0] > stacked.shape[1]:
        rows, dim = stacked.shape
        raise ValueError(f"{rows} orthogonal rows do not fit in dimension {dim}")
    basis = torch.linalg.qr(stacked.T).Q  # [d, s + n]
    return basis[:, -fresh.shape[0]:].T


def require_layers(layers: Sequence[int], num_layers: int, what: str) -> None:
    """The encoder skips prefixes of layers it lacks, silently: refuse such a setting."""
    from clbench.errors import UsageError

    if not layers or not all(0 <= layer < num_layers for layer in layers):
        raise UsageError(f"{what} {tuple(layers)} must lie in 0..{num_layers - 1} for this encoder")

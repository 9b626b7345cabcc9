"""CODA-Prompt's components: prompts assembled per input as attention-weighted sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.attention import Prompt
from clbench.prompts.base import PromptModule, PromptSelection, TaskIndex, single_task


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

    num_initialised: Tensor  # a buffer (see __init__)

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
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialised = int(self.num_initialised)

    @property
    def num_slots(self) -> int:
        return self.num_tasks

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [self.keys[slot], self.attention[slot], self.prompts[slot]]

    @torch.no_grad()
    def begin_task(self, task: int) -> None:
        """Initialise the components of tasks up to ``task`` (once) and train only ``task``'s."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task {task} has no components: the pool is split over {self.num_tasks} tasks"
            )
        for new in range(self._initialised, task + 1):
            for chunks in (self.keys, self.attention, self.prompts):
                for layer in range(len(self.layers)):
                    previous = [chunks[old][layer].flatten(1) for old in range(new)]
                    fresh = orthonormal_extension(previous, chunks[new][layer].flatten(1))
                    chunks[new][layer].copy_(fresh.view_as(chunks[new][layer]))
        self._initialised = max(self._initialised, task + 1)
        self.num_initialised.fill_(self._initialised)
        super().begin_task(task)

    def _active(self, chunks: nn.ParameterList, task: int) -> Tensor:
        """Components of tasks 0..task, [layers, m, ...]; the old ones detached."""
        parts = [chunk if owner == task else chunk.detach() for owner, chunk in enumerate(chunks)]
        return torch.cat(parts[: task + 1], dim=1)

    def _task(self, task: TaskIndex) -> int:
        task = single_task(task, "CODA-Prompt's components (they weight every learnt task)")
        task = self._initialised - 1 if task is None else task
        if not 0 <= task < self._initialised:
            raise ValueError(f"task {task}: components exist for tasks 0..{self._initialised - 1}")
        return task

    def weights(self, query: Tensor, task: TaskIndex = None) -> Tensor:
        """alpha = cos(q * A_m, K_m) for the components of tasks 0..task: [layers, B, m]."""
        task = self._task(task)
        keys = F.normalize(self._active(self.keys, task), dim=-1)
        attention = self._active(self.attention, task)
        # (q * A) . K^ / |q * A| without materialising the [layers, B, m, Dq] product
        numerator = torch.einsum("bd,lmd->lbm", query, attention * keys)
        squared_norm = torch.einsum("bd,lmd->lbm", query.square(), attention.square())
        return numerator / squared_norm.clamp_min(1e-24).sqrt()

    def forward(
        self, query: Tensor, *, task: TaskIndex = None, train: bool = False
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
    return basis[:, -fresh.shape[0] :].T

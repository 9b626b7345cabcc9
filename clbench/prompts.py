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

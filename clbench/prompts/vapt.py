"""VAPT adaptive prompts (Visual Adaptive Prompt Tuning, arXiv 2501.18936; official code
``Minhchuyentoancbn/VAPT`` ``src/models/vit_prompt/vit.py`` ``PromptedTransformerAdaptive``)
as a per-task prompt module: a clbench extension, VAPT has no continual-learning result.

VAPT is VPT-deep whose prompts after the first layer are a function of the previous
layer's output patch tokens. A VPT-deep prompt token is replaced at the next layer, so
its only effect on the real tokens is its key and value: the prompts are exactly
key/value-only tokens (``Prompt.kv_tokens``), and an adaptive one is a per-layer
generator (``Prompt.generators``) run on the block's input, which is the previous
block's output. For N_p prompts at prompted layers l_0 < l_1 < ...:

* layer l_0: N_p static tokens (VPT's Xavier-uniform initialisation);
* layer l_k, k >= 1: with X the patch tokens of the block's input (leading [CLS] /
  register tokens dropped), z = D_k(dropout2d(C_k(LN_k(X) as a D x h x w map))), where
  C_k is one k x k kernel shared by all D channels (no padding), D_k a linear map from
  the (h-k+1)(w-k+1) positions to N_p tokens, **zero-initialised** (every adaptive
  prompt starts at 0), and the prompts are F(z) = z + W2 dropout(ReLU(W1 z)), one F
  (no biases, hidden width r) shared by the layers of a task.

Per task (HiDe's slot lifecycle): every prompted input uses its task's parameters,
gathered per sample when the tasks of a batch differ, all batched. ``begin_task(t)``
initialises slot t from slot t-1 and trains only slot t; ``end_task(t)`` applies HiDe's
prompt momentum to every parameter of slot t (static tokens and generators alike), then
freezes it. Vision encoders only: the generator reads the patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.config import option
from clbench.encoders.attention import LayerPrompt, PrefixGate, Prompt, residual_gates
from clbench.encoders.base import PromptableEncoder
from clbench.errors import UsageError
from clbench.prompts.base import InheritingSlots, PromptSelection, TaskIndex

LAYER_NORM_EPS = 1e-6  # the ViT's LayerNorm eps in VAPT's code (the jeonsworld port)


@dataclass
class VAPTOptions:
    """The options of a strategy whose per-task prompts may be VAPT's (a config mixin)."""

    prompt: Literal["prefix", "vapt"] = option(
        "prefix",
        "prefix: a task prefix per prompted layer; vapt: VAPT's adaptive prompts, static "
        "tokens at the first prompted layer and tokens generated from each later prompted "
        "block's input patch tokens (arXiv 2501.18936; vision only; a clbench extension)",
    )
    vapt_tokens: int = option(10, "prompt=vapt: prompt tokens per layer (10 in VAPT)", symbol="N_p")
    vapt_kernel: int = option(2, "prompt=vapt: side of the channel-shared conv kernel", symbol="k")
    vapt_hidden: int = option(8, "prompt=vapt: hidden width of the shared MLP F", symbol="r")
    vapt_dropout: float = option(0.1, "prompt=vapt: Dropout2d after the conv and in F (VAPT)")


class VAPTSlot(nn.Module):
    """One task's VAPT parameters for ``num_layers`` prompted layers (the first static)."""

    def __init__(
        self,
        num_layers: int,
        tokens: int,
        embed_dim: int,
        grid: tuple[int, int],
        *,
        kernel: int = 2,
        hidden: int = 8,
        patch_area: int = 256,
    ) -> None:
        super().__init__()
        adaptive = num_layers - 1
        height, width = grid
        positions = (height - kernel + 1) * (width - kernel + 1)
        # VPT's initialisation of prompts: U(-v, v), v = sqrt(6 / (3 * patch area + D))
        bound = math.sqrt(6.0 / (3 * patch_area + embed_dim))
        self.static = nn.Parameter(torch.empty(tokens, embed_dim).uniform_(-bound, bound))
        self.norm_weight = nn.Parameter(torch.ones(adaptive, embed_dim))
        self.norm_bias = nn.Parameter(torch.zeros(adaptive, embed_dim))
        self.kernel = nn.Parameter(torch.randn(adaptive, kernel, kernel))
        self.down_weight = nn.Parameter(torch.zeros(adaptive, tokens, positions))
        self.down_bias = nn.Parameter(torch.zeros(adaptive, tokens))
        # F: Linear(D, r, bias=False) -> ReLU -> Linear(r, D, bias=False), torch's init
        self.up = nn.Parameter(
            torch.empty(hidden, embed_dim).uniform_(-1, 1) / math.sqrt(embed_dim)
        )
        self.out = nn.Parameter(torch.empty(embed_dim, hidden).uniform_(-1, 1) / math.sqrt(hidden))


class AdaptivePrompts(InheritingSlots):
    """VAPT's prompts, one :class:`VAPTSlot` per task (see the module docstring).

    ``task`` is an int (training: the task is known) or a tensor [B] of inferred tasks;
    the query is not read. With ``gate_activation`` each prompted layer gets NoRGa's
    residual gate, which acts on the prompts' key logits (shared by every task).
    """

    def __init__(
        self,
        num_tasks: int,
        layers: Sequence[int],
        embed_dim: int,
        grid: tuple[int, int],
        *,
        tokens: int = 10,
        kernel: int = 2,
        hidden: int = 8,
        dropout: float = 0.1,
        patch_area: int = 256,
        num_leading_tokens: int = 1,
        momentum: float = 0.0,
        gate_activation: str | None = None,
    ) -> None:
        super().__init__()
        self.layers = sorted(layers)
        if len(set(self.layers)) != len(self.layers) or not self.layers:
            raise UsageError(f"VAPT needs distinct prompted layers, got {list(layers)}")
        if not 1 <= kernel <= min(grid):
            raise UsageError(
                f"vapt_kernel must be in 1..{min(grid)} (the patch grid), got {kernel}"
            )
        if tokens < 1 or hidden < 1:
            raise UsageError(f"vapt_tokens and vapt_hidden must be >= 1, got {tokens}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"vapt_dropout must be in [0, 1), got {dropout}")
        self.grid = grid
        self.dropout = dropout
        self.momentum = momentum
        self.num_leading_tokens = num_leading_tokens
        self.slots = nn.ModuleList(
            VAPTSlot(
                len(self.layers),
                tokens,
                embed_dim,
                grid,
                kernel=kernel,
                hidden=hidden,
                patch_area=patch_area,
            )
            for _ in range(num_tasks)
        )
        self.gates = residual_gates(self.layers, gate_activation)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return list(self.slots[slot].parameters())

    @property
    def prompts(self) -> list[Tensor]:
        """Every slot's parameters as one flat vector (what a prompted-feature cache
        versions a slot by)."""
        return [torch.cat([p.detach().flatten() for p in slot.parameters()]) for slot in self.slots]

    def _gathered(self, task: int | Tensor) -> dict[str, Tensor]:
        """Each parameter of the input's slot, with a leading batch dim (1 for an int)."""
        names = [name for name, _ in self.slots[0].named_parameters()]
        if isinstance(task, int):
            slot = self.slots[task]
            return {name: getattr(slot, name).unsqueeze(0) for name in names}
        return {
            name: torch.stack([getattr(slot, name) for slot in self.slots])[task] for name in names
        }

    def forward(
        self, query: Tensor | None = None, *, task: TaskIndex = None, train: bool = False
    ) -> PromptSelection:
        if task is None:
            raise ValueError("VAPT prompts are chosen by the task: pass task=")
        params = self._gathered(task)
        first, *adaptive = self.layers
        generators = {
            layer: self._generator(params, index, train) for index, layer in enumerate(adaptive)
        }
        gates: dict[int, PrefixGate] = {int(layer): gate for layer, gate in self.gates.items()}
        prompt = Prompt(kv_tokens={first: params["static"]}, generators=generators, gates=gates)
        return PromptSelection(prompt, params["static"].new_zeros(()))

    def _generator(self, params: dict[str, Tensor], index: int, train: bool) -> Any:
        def generate(hidden: Tensor, context: Any) -> LayerPrompt:
            return LayerPrompt(kv_tokens=self.adaptive_tokens(hidden, params, index, train))

        return generate

    def adaptive_tokens(
        self, hidden: Tensor, params: dict[str, Tensor], index: int, train: bool = False
    ) -> Tensor:
        """The prompts [B, N_p, D] of adaptive layer ``index`` from a block input [B, N, D]."""
        batch, _, dim = hidden.shape
        height, width = self.grid
        patches = hidden[:, self.num_leading_tokens :]
        if patches.shape[1] != height * width:
            raise ValueError(
                f"VAPT expects {height}x{width} patch tokens after {self.num_leading_tokens} "
                f"leading ones, got {patches.shape[1]} (input tokens are not supported)"
            )

        def per_sample(name: str) -> Tensor:  # [B or 1, ...] of this layer -> [B, ...]
            value = params[name][:, index] if name not in ("up", "out") else params[name]
            return value.expand(batch, *value.shape[1:])

        normed = F.layer_norm(patches, (dim,), eps=LAYER_NORM_EPS)
        normed = normed * per_sample("norm_weight")[:, None] + per_sample("norm_bias")[:, None]
        feature_map = normed.transpose(1, 2).reshape(1, batch * dim, height, width)
        kernel = per_sample("kernel").repeat_interleave(dim, dim=0)[:, None]  # [B*D, 1, k, k]
        conv = F.conv2d(feature_map, kernel.to(feature_map.dtype), groups=batch * dim)
        conv = conv.reshape(batch, dim, *conv.shape[-2:])
        if train and self.dropout > 0:
            conv = F.dropout2d(conv, self.dropout, training=True)
        down = torch.einsum("bds,bns->bnd", conv.flatten(2), per_sample("down_weight"))
        z = down + per_sample("down_bias")[:, :, None]
        hidden_units = F.relu(torch.einsum("bnd,brd->bnr", z, per_sample("up")))
        if train and self.dropout > 0:
            hidden_units = F.dropout(hidden_units, self.dropout, training=True)
        return z + torch.einsum("bnr,bdr->bnd", hidden_units, per_sample("out"))


def patch_grid(
    encoder: PromptableEncoder, what: str = "prompt=vapt"
) -> tuple[tuple[int, int], int]:
    """The encoder's patch grid (h, w) and patch area; a clear error on a text encoder."""
    patch_embed = getattr(getattr(encoder, "model", None), "patch_embed", None)
    if encoder.modality != "vision" or patch_embed is None:
        raise UsageError(
            f"{what} needs a vision encoder (it reads the patch grid); this backbone is "
            f"{encoder.modality or type(encoder).__name__}: use prompt=prefix"
        )
    grid = tuple(int(side) for side in patch_embed.grid_size)
    patch = tuple(int(side) for side in patch_embed.patch_size)
    return (grid[0], grid[1]), patch[0] * patch[1]


def vapt_prompts(
    encoder: PromptableEncoder,
    options: VAPTOptions,
    num_tasks: int,
    layers: Sequence[int],
    *,
    momentum: float = 0.0,
    gate_activation: str | None = None,
    prefix_param: str = "free",
) -> AdaptivePrompts:
    """A strategy's per-task VAPT prompts on ``encoder`` from its ``options``."""
    if prefix_param != "free":
        raise UsageError(
            f"prefix_param={prefix_param} reparameterises prefixes; prompt=vapt has none: "
            "use prefix_param=free with it"
        )
    grid, patch_area = patch_grid(encoder)
    return AdaptivePrompts(
        num_tasks,
        layers,
        encoder.embed_dim,
        grid,
        tokens=options.vapt_tokens,
        kernel=options.vapt_kernel,
        hidden=options.vapt_hidden,
        dropout=options.vapt_dropout,
        patch_area=patch_area,
        num_leading_tokens=encoder.num_leading_tokens,
        momentum=momentum,
        gate_activation=gate_activation,
    )

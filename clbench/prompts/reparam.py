"""Reparameterised prefixes (Le et al., "Revisiting Prefix-tuning: statistical benefits of
reparameterisation among prompts", arXiv 2410.02200, ICLR 2025).

A prefix owner (DualPrompt's G- and E-prompts, HiDe-Prompt's / NoRGa's task prefixes,
WAVE-CRE's pools) stores every prefix as a plain tensor. With ``prefix_param=mlp`` or
``linear`` the prefix of the task being learnt is instead *generated*: one seed row P'
per prefix position and layer, mapped by a small per-layer network g_l to a key and its
value,

    mlp:    g_l(P') = W2 tanh(W1 P' + b1) + b2       (D -> h -> 2D; h = 48 in the
                                                      official CV code, 512 in NLP)
    linear: g_l(P') = tanh(W P' + b)                 (D -> 2D; SHARE_TYPE="linear")

so every key and its value come from the same seed row through shared weights (the
paper's "deep-share"). The 2D outputs are split by *interleaving*, as in the official
code (``CV/src/models/vit_prompt/vit.py``: a reshape to (Lp, D, 2)): even coordinates
are the key, odd ones the value.

Continual-learning semantics (a clbench extension: the paper has no CL experiment):

* the generator is a training-time device. While task t trains, slot t's prefix is
  g(P'); ``end_task`` stores g(P') (no dropout) into the slot's plain tensor and the
  generator stops being used, so inference, later tasks and checkpoints see plain
  tensors only and cost what ``free`` costs;
* one generator per prefix owner: a module whose new slot starts from the previous one
  (HiDe's initialisation, DualPrompt's ``shared_prompt_pool``) keeps training the same
  generator, whose output is the previous slot's prefix before any momentum; otherwise
  it is drawn afresh at each ``begin_task``;
* at initialisation the generated prefix has the free prefix's scale (std of U(-1, 1),
  1/sqrt(3)): the last layer is rescaled once (a clbench choice; the official code uses
  the default Linear initialisation, whose outputs are ~3x smaller);
* ``reparam_dropout`` is the paper's prefix dropout (0.1 there, on every arm, free
  prefixes included); 0 here by default, so ``mlp`` differs from ``free`` only by the
  parameterisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.config import option
from clbench.errors import UsageError

PrefixParam = Literal["free", "mlp", "linear"]
PREFIX_PARAMS: tuple[str, ...] = ("free", "mlp", "linear")
# the std of U(-1, 1), the free prefixes' initialisation
FREE_PREFIX_STD = 1.0 / math.sqrt(3.0)


@dataclass(frozen=True)
class PrefixReparam:
    """How a prefix owner parameterises the prefix of the task being learnt."""

    kind: PrefixParam = "free"
    hidden: int = 48
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PREFIX_PARAMS:
            raise UsageError(
                f"prefix_param={self.kind!r} is not one of: {', '.join(PREFIX_PARAMS)}"
            )
        if self.hidden < 1:
            raise UsageError(f"reparam_hidden must be at least 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"reparam_dropout must be in [0, 1), got {self.dropout}")

    @property
    def generated(self) -> bool:
        return self.kind != "free"

    def generator(self, num_layers: int, rows: int, embed_dim: int) -> PrefixGenerator | None:
        """The generator of a [num_layers, 2, rows, embed_dim] prefix (None: free)."""
        if not self.generated:
            return None
        return PrefixGenerator(
            num_layers, rows, embed_dim, kind=self.kind, hidden=self.hidden, dropout=self.dropout
        )


@dataclass
class PrefixParamOptions:
    """The options of every prefix strategy's config (a mixin of its config dataclass)."""

    prefix_param: PrefixParam = option(
        "free",
        "free: prefixes are trained tensors; mlp / linear: the prefix of the task being "
        "learnt is generated from a seed by a per-layer MLP D->h->2D (tanh) or a Linear "
        "D->2D + tanh, keys and values interleaved (arXiv 2410.02200 deep-share), then "
        "stored as a plain tensor at the end of the task (a clbench extension: no "
        "published CL number)",
    )
    reparam_hidden: int = option(
        48, "prefix_param=mlp: hidden width h (48 in the official CV code, 512 in NLP)", symbol="h"
    )
    reparam_dropout: float = option(
        0.0, "dropout on the generated prefix while training (0.1 in the paper)"
    )

    @property
    def prefix_reparam(self) -> PrefixReparam:
        return PrefixReparam(self.prefix_param, self.reparam_hidden, self.reparam_dropout)


class PrefixGenerator(nn.Module):
    """g_l(P'_l) for every layer l at once: seeds [layers, rows, D] -> prefixes
    [layers, 2, rows, D] (keys = even output coordinates, values = odd ones).

    The per-layer networks are batched weights ([layers, ...]), one ``baddbmm`` each.
    """

    def __init__(
        self,
        num_layers: int,
        rows: int,
        embed_dim: int,
        *,
        kind: PrefixParam = "mlp",
        hidden: int = 48,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"a prefix generator is mlp or linear, not {kind!r}")
        self.kind = kind
        self.shape = (num_layers, rows, embed_dim)
        self.hidden = hidden
        self.dropout = dropout
        out = 2 * embed_dim
        self.seeds = nn.Parameter(torch.empty(self.shape))
        if kind == "mlp":
            self.w1 = nn.Parameter(torch.empty(num_layers, embed_dim, hidden))
            self.b1 = nn.Parameter(torch.empty(num_layers, 1, hidden))
            self.w2 = nn.Parameter(torch.empty(num_layers, hidden, out))
            self.b2 = nn.Parameter(torch.empty(num_layers, 1, out))
        else:
            self.w1 = nn.Parameter(torch.empty(num_layers, embed_dim, out))
            self.b1 = nn.Parameter(torch.empty(num_layers, 1, out))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """A fresh draw: seeds U(-1, 1), torch's Linear initialisation, then the last
        layer rescaled so that the generated prefix has the free prefix's std."""
        layers, _, dim = self.shape
        self.seeds.uniform_(-1.0, 1.0)
        fan_in = dim
        for name in ("w1", "b1", "w2", "b2"):
            parameter = getattr(self, name, None)
            if parameter is None:
                continue
            bound = 1.0 / math.sqrt(fan_in)
            parameter.uniform_(-bound, bound)
            if name == "b1":
                fan_in = self.hidden
        self._calibrate()

    @torch.no_grad()
    def _calibrate(self) -> None:
        if self.kind == "mlp":  # the output is linear in (w2, b2): one exact rescale
            scale = FREE_PREFIX_STD / self._raw().std().clamp_min(1e-12)
            self.w2.mul_(scale)
            self.b2.mul_(scale)
            return
        # tanh(c (W P + b)): its std grows monotonically with c; bisect log c
        weight, bias = self.w1.clone(), self.b1.clone()
        low, high = math.log(1e-3), math.log(1e3)
        for _ in range(40):
            middle = 0.5 * (low + high)
            self.w1.copy_(weight * math.exp(middle))
            self.b1.copy_(bias * math.exp(middle))
            if self._raw().std() < FREE_PREFIX_STD:
                low = middle
            else:
                high = middle

    def _raw(self) -> Tensor:
        """[layers, rows, 2D] before the key / value split and dropout."""
        hidden = torch.baddbmm(self.b1, self.seeds, self.w1)
        if self.kind == "linear":
            return torch.tanh(hidden)
        return torch.baddbmm(self.b2, torch.tanh(hidden), self.w2)

    def forward(self, train: bool = False) -> Tensor:
        """The generated prefixes [layers, 2, rows, D] (prefix dropout while training)."""
        layers, rows, dim = self.shape
        raw = self._raw().view(layers, rows, dim, 2)  # coordinate 2i -> key i, 2i+1 -> value i
        prefix = raw.permute(0, 3, 1, 2)
        if train and self.dropout > 0:
            prefix = F.dropout(prefix, self.dropout, training=True)
        return prefix

    def extra_repr(self) -> str:
        layers, rows, dim = self.shape
        return f"kind={self.kind}, layers={layers}, rows={rows}, dim={dim}, hidden={self.hidden}"


class GeneratedSlot:
    """The bookkeeping every prefix owner shares: which of its slots (if any) the
    generator stands for right now. Not checkpointed: runs are checkpointed between
    tasks, when no slot is generated, and ``begin_task`` sets it again on resume.

    ``transform`` maps the generator's [layers, 2, rows, D] to the stored slot's shape.
    """

    def __init__(
        self,
        generator: PrefixGenerator | None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.generator = generator
        self.transform = transform
        self.slot: int | None = None

    def begin(self, slot: int, stored: nn.Parameter, *, fresh: bool) -> None:
        """Slot ``slot`` is generated from now on (by a new draw of the generator when
        ``fresh``, else by the generator as the previous slot left it); its stored
        tensor does not train."""
        if self.generator is None:
            return
        if fresh:
            self.generator.reset()
        stored.requires_grad_(False)
        self.generator.requires_grad_(True)
        self.slot = slot

    def finish(self, slot: int, stored: nn.Parameter) -> None:
        """Store g(P') (no dropout) into slot ``slot``'s plain tensor; from now on the
        slot is that tensor."""
        if self.generator is None or self.slot != slot:
            return
        with torch.no_grad():
            stored.copy_(self.generate(train=False))
        self.generator.requires_grad_(False)
        self.slot = None

    def generate(self, train: bool) -> Tensor:
        assert self.generator is not None
        prefix = self.generator(train)
        return prefix if self.transform is None else self.transform(prefix)

    def active(self, slot: int) -> bool:
        return self.generator is not None and self.slot == slot

    def prompt(self, slot: int, stored: Tensor, train: bool) -> Tensor:
        """Slot ``slot``'s prefix: generated while its task trains, else ``stored``."""
        return self.generate(train) if self.active(slot) else stored

    def prompts(self, stored: Iterable[Tensor], train: bool) -> list[Tensor]:
        """Every slot's prefix (``stored``, with the generated slot in its place)."""
        slots = list(stored)
        if self.slot is not None and self.generator is not None and self.slot < len(slots):
            slots[self.slot] = self.generate(train)
        return slots

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.generator is None else list(self.generator.parameters())

"""Low-rank (and dense) weight deltas on a frozen block's linear projections.

A :class:`LayerDelta` is what a LoRA-family method hands one block: for each *target*
projection, a list of low-rank terms ``scale * B @ M @ A`` and an optional dense term
``dW``, so that the block computes ``W x + b + dW x + sum(scale * B M A x)`` instead of
``W x + b``. The frozen ``W`` is never written: a dense term is added to a *copy* of the
weight for this one call (``F.linear(x, W + dW, b)``), and low-rank terms run as two thin
matrix products on the side. With no delta an encoder calls its frozen modules exactly as
before, so un-adapted runs are bit-identical and keep their speed.

Targets are backbone-neutral names (:data:`TARGETS`); each encoder maps them onto its own
modules (ViT: the q / k / v thirds of timm's fused ``qkv``, ``proj``, ``mlp.fc1`` /
``mlp.fc2``; BERT: ``query`` / ``key`` / ``value``, the attention output's ``dense``,
``intermediate.dense``, ``output.dense``).

Per-sample deltas (tasks that differ within a batch, e.g. HiDe-LoRA routing each test
input to the adapter of its predicted task) take one of two forms, both batched:

* factors with a batch dimension: ``down`` [B, r, d_in], ``up`` [B, d_out, r];
* *stacked* factors of T tasks with a per-sample ``index`` [B] into them: ``down``
  [T, r, d_in], ``up`` [T, d_out, r]; the term gathers row ``index[b]`` for sample b.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The projections a delta may adapt: attention query / key / value, the attention output
# projection, and the two linears of the MLP.
TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
QKV = ("q", "k", "v")
MLP_TARGETS = ("fc1", "fc2")

# Called with a projection's input [B, N, d_in]: how a method observes what a frozen
# projection sees (InfLoRA's input covariance) whether or not a dense term bypasses the
# module itself (a forward hook on the module does not fire then).
InputTap = Callable[[Tensor], None]


@dataclass
class LowRankTerm:
    """``scale * up @ middle @ down`` applied to the input of one projection.

    down: A, [r, d_in]; or [B, r, d_in] per sample; or [T, r, d_in] stacked with ``index``.
    up: B, [d_out, r]; batched like ``down``.
    scale: a float, a 0-d tensor (a learned magnitude: SD-LoRA), or one value per sample
        ([B]) or per stacked task ([T] with ``index``).
    middle: an optional r x r matrix between the factors (NuSA's trained M, KaSA's
        diag(sigma)), batched like ``down``.
    index: [B] long, which stacked row each sample uses (None: no stacking).
    dropout: LoRA dropout on this term's input (the adapter sets it to 0 in eval mode).
    """

    down: Tensor
    up: Tensor
    scale: float | Tensor = 1.0
    middle: Tensor | None = None
    index: Tensor | None = None
    dropout: float = 0.0

    @property
    def per_sample(self) -> bool:
        return self.index is not None or self.down.ndim == 3

    def __call__(self, x: Tensor) -> Tensor:
        """x [B, N, d_in] -> [B, N, d_out]."""
        down, up, middle, scale = self.down, self.up, self.middle, self.scale
        if self.index is not None:  # gather each sample's task (HiDe-PET's batched routing)
            down, up = down[self.index], up[self.index]
            middle = None if middle is None else middle[self.index]
            if isinstance(scale, Tensor) and scale.ndim == 1:
                scale = scale[self.index]
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, training=True)
        if down.ndim == 2:
            hidden = F.linear(x, down)
            if middle is not None:
                hidden = F.linear(hidden, middle)
            out = F.linear(hidden, up)
        else:
            if x.shape[0] != down.shape[0]:  # a shared input (batch 1), per-sample factors
                x = x.expand(down.shape[0], *x.shape[1:])
            hidden = torch.bmm(x, down.transpose(1, 2).to(x.dtype))
            if middle is not None:
                hidden = torch.bmm(hidden, middle.transpose(1, 2).to(hidden.dtype))
            out = torch.bmm(hidden, up.transpose(1, 2).to(hidden.dtype))
        if isinstance(scale, Tensor) and scale.ndim == 1:
            return out * scale.to(out.dtype)[:, None, None]
        return out * scale

    def weight(self) -> Tensor:
        """The dense update ``scale * up @ middle @ down`` ([d_out, d_in]; shared terms)."""
        if self.per_sample:
            raise ValueError("a per-sample low-rank term has no single dense weight")
        inner = self.down if self.middle is None else self.middle @ self.down
        return self.scale * (self.up @ inner)


@dataclass
class LayerDelta:
    """The weight deltas of one block: target -> low-rank terms, target -> dense term.

    terms: target -> [LowRankTerm, ...], summed (a sum of updates: several tasks' LoRAs,
        a PiSSA adapter and its frozen offset, ...).
    dense: target -> dW [d_out, d_in], e.g. the frozen sum of finished tasks' merged
        updates; added to a copy of the frozen weight for the call.
    taps: target -> callable receiving the projection's input (see :data:`InputTap`).
    """

    terms: dict[str, list[LowRankTerm]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    taps: dict[str, InputTap] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for target in (*self.terms, *self.dense, *self.taps):
            check_target(target)

    @property
    def targets(self) -> set[str]:
        return {*self.terms, *self.dense}

    def touches(self, targets: Iterable[str]) -> bool:
        return any(t in self.terms or t in self.dense or t in self.taps for t in targets)

    def merged(self, other: LayerDelta) -> LayerDelta:
        """Both deltas at once: terms concatenated, dense terms added, taps kept (two taps
        on one target are an error)."""
        terms = {t: list(ts) for t, ts in self.terms.items()}
        for target, more in other.terms.items():
            terms[target] = terms.get(target, []) + list(more)
        dense = dict(self.dense)
        for target, weight in other.dense.items():
            dense[target] = dense[target] + weight if target in dense else weight
        taps = dict(self.taps)
        for target, tap in other.taps.items():
            if target in taps:
                raise ValueError(f"two input taps on target {target!r}")
            taps[target] = tap
        return LayerDelta(terms, dense, taps)

    def low_rank(self, target: str, x: Tensor) -> Tensor | None:
        """The summed low-rank terms of ``target`` on x (None: none)."""
        total: Tensor | None = None
        for term in self.terms.get(target, ()):
            out = term(x)
            total = out if total is None else total + out
        return total

    def project(self, linear: nn.Linear, x: Tensor, target: str) -> Tensor:
        """``linear`` (frozen nn.Linear) on x with this delta's ``target`` terms."""
        if target in self.taps:
            self.taps[target](x)
        dense = self.dense.get(target)
        if dense is None:
            base = linear(x)
        else:
            base = F.linear(x, linear.weight + dense.to(linear.weight.dtype), linear.bias)
        low = self.low_rank(target, x)
        # the terms are summed first and then added once: a term and its exact negation
        # (PiSSA's trained factors and their frozen offset at step 0) cancel to 0 exactly
        return base if low is None else base + low.to(base.dtype)

    def project_fused(self, linear: nn.Linear, x: Tensor, targets: Sequence[str]) -> Tensor:
        """A fused projection (timm's ``qkv``) whose output is the concatenation of
        ``targets``' equal-width slices; each slice gets its own target's terms."""
        for target in targets:
            if target in self.taps:
                self.taps[target](x)
                break  # one input for all slices
        width = linear.out_features // len(targets)
        if any(t in self.dense for t in targets):
            zeros = linear.weight.new_zeros(width, linear.in_features)
            offset = torch.cat([self.dense.get(t, zeros).to(zeros.dtype) for t in targets])
            base = F.linear(x, linear.weight + offset, linear.bias)
        else:
            base = linear(x)
        slices = [self.low_rank(t, x) for t in targets]
        present = [s for s in slices if s is not None]
        if not present:
            return base
        batch = max(s.shape[0] for s in present)
        like = present[0]
        filled = [
            s.expand(batch, *s.shape[1:])
            if s is not None
            else like.new_zeros(batch, *like.shape[1:-1], width)
            for s in slices
        ]
        return base + torch.cat(filled, dim=-1).to(base.dtype)


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown delta target {target!r}; valid: {', '.join(TARGETS)}")


def merge_deltas(*groups: dict[int, LayerDelta]) -> dict[int, LayerDelta]:
    """Layer -> delta maps combined (per layer: :meth:`LayerDelta.merged`)."""
    merged: dict[int, LayerDelta] = {}
    for group in groups:
        for layer, delta in group.items():
            merged[layer] = merged[layer].merged(delta) if layer in merged else delta
    return merged


def project(linear: nn.Linear, x: Tensor, delta: LayerDelta | None, target: str) -> Tensor:
    """``linear(x)``, adapted by ``delta`` when it has ``target`` (else the module itself)."""
    if delta is None:
        return linear(x)
    return delta.project(linear, x, target)

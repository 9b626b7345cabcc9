"""The one attention code path that every prompt method changes.

Prompt methods in scope alter a frozen transformer's self-attention in three ways:

* **prefixes** (prefix tuning: DualPrompt, CODA-Prompt, HiDe-Prompt, NoRGa, WAVE-CRE):
  extra keys and values that every query token attends to;
* **prompt tokens** at the input (prompt tuning: L2P) - handled by the encoders, since
  they are ordinary tokens once inserted;
* a **gate on the prefix logits** (NoRGa): s -> s + alpha * act(tau * s) for the logits
  between query tokens and prefix keys only; token-to-token logits and prefix values
  are unchanged and one softmax runs over [prefix ; tokens].

Without a gate the maths is plain attention over concatenated keys/values, so it runs
through ``scaled_dot_product_attention`` (fused kernels on GPU); the gate needs the
logits, so that path is explicit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Maps prefix logits [B, H, N, Lp] to gated logits of the same shape.
PrefixGate = Callable[[Tensor], Tensor]


@dataclass
class Prompt:
    """What a prompt module hands the encoder for one batch.

    prefixes: layer index -> tensor [B or 1, 2, Lp, D]; index 0 of dim 1 holds the keys,
        index 1 the values, each split into heads as [.., Lp, H, dh] (the head split is
        a reshape of D followed by a *permute*, never a reshape across Lp - the bug
        that several public DualPrompt codebases share).
    tokens: [B or 1, Lt, D] prompt tokens inserted right after the encoder's leading
        special tokens ([CLS], register tokens) at the input.
    gates: layer index -> gate applied to that layer's prefix logits.

    Where the next kinds of prompt go (not implemented yet), so that every one of them
    still ends in the single :func:`prompted_attention` call of each block:

    * key/value-only prompt tokens (attended to, never attending): a field of
      [B or 1, Lk, D] token states that ``run_block`` projects with the block's own frozen
      key / value weights into a [B, 2, Lk, D] prefix, concatenated with ``prefixes[i]``
      along Lp before the attention call;
    * per-layer generators (prompts computed from each layer's input): a field of layer
      index -> callable(hidden [B, N, D]) -> [B, 2, Lp, D], evaluated by
      ``PromptableEncoder.forward`` before ``run_block`` and merged into that layer's
      prefix the same way;
    * low-rank weight deltas (LoRA-style updates of the frozen projections): a field of
      layer index -> (A [D, r], B [r, D]) per projection, added as ``x @ A @ B`` to the
      frozen q / k / v / output projections inside ``run_block``; the attention maths
      does not change, so they also run through :func:`prompted_attention`.
    """

    prefixes: dict[int, Tensor] = field(default_factory=dict)
    tokens: Tensor | None = None
    gates: dict[int, PrefixGate] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]


def split_prefix(prefix: Tensor, num_heads: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """[B|1, 2, Lp, D] -> keys, values as [B, H, Lp, dh]."""
    b, two, length, dim = prefix.shape
    if two != 2:
        raise ValueError(f"a prefix must have shape [B, 2, Lp, D], got {tuple(prefix.shape)}")
    heads = prefix.reshape(b, 2, length, num_heads, dim // num_heads).permute(1, 0, 3, 2, 4)
    keys, values = heads[0], heads[1]
    if b != batch_size:
        keys = keys.expand(batch_size, -1, -1, -1)
        values = values.expand(batch_size, -1, -1, -1)
    return keys, values


def prompted_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix: Tensor | None = None,
    gate: PrefixGate | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Multi-head attention with optional prefix keys/values and a prefix-logit gate.

    q, k, v: [B, H, N, dh] projected by the frozen layer.
    prefix: [B|1, 2, Lp, D] or None.
    key_padding_mask: [B, N] bool, True where a token may be attended (text padding).
    Returns [B, H, N, dh].
    """
    batch, heads, _, head_dim = q.shape
    prefix_length = 0
    if prefix is not None:
        prefix_keys, prefix_values = split_prefix(prefix.to(q.dtype), heads, batch)
        prefix_length = prefix_keys.shape[2]
        k = torch.cat([prefix_keys, k], dim=2)
        v = torch.cat([prefix_values, v], dim=2)

    additive_mask = None
    if key_padding_mask is not None:
        if prefix_length:
            always = key_padding_mask.new_ones(batch, prefix_length)
            key_padding_mask = torch.cat([always, key_padding_mask], dim=1)
        additive_mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        additive_mask = additive_mask.masked_fill(~key_padding_mask, float("-inf"))
        additive_mask = additive_mask[:, None, None, :]

    if gate is None or prefix_length == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)

    logits = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    gated_prefix = gate(logits[..., :prefix_length])
    logits = torch.cat([gated_prefix, logits[..., prefix_length:]], dim=-1)
    if additive_mask is not None:
        logits = logits + additive_mask
    return logits.softmax(dim=-1) @ v


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "relu": F.relu,
    "identity": lambda s: s,
}


class ResidualGate(nn.Module):
    """NoRGa's non-linear residual gate on prefix logits: s + alpha * act(tau * s).

    One learnable (tau, alpha) pair, initialised to 1 (Le et al., NeurIPS 2024); shared by
    all heads. ``alpha = 0`` makes it the identity, i.e. plain prefix tuning.
    """

    def __init__(self, activation: str = "sigmoid", tau: float = 1.0, alpha: float = 1.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown gate activation {activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        self.activation = activation
        self.tau = nn.Parameter(torch.tensor(float(tau)))
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, logits: Tensor) -> Tensor:
        return logits + self.alpha * ACTIVATIONS[self.activation](self.tau * logits)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

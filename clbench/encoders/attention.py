"""The one attention code path that every prompt method changes.

Prompt methods in scope alter a frozen transformer's self-attention in these ways, all
ending in the single :func:`prompted_attention` call of each block:

* **prefixes** (prefix tuning: DualPrompt, CODA-Prompt, HiDe-Prompt, NoRGa, WAVE-CRE):
  extra keys and values that every query token attends to;
* **prompt tokens** at the input (prompt tuning: L2P) - handled by the encoders, since
  they are ordinary tokens once inserted;
* a **gate on the prefix logits** (NoRGa): s -> s + alpha * act(tau * s) for the logits
  between query tokens and prefix keys only; token-to-token logits and prefix values
  are unchanged and one softmax runs over [prefix ; tokens];
* **key/value-only prompt tokens** (exact VPT-deep; 2410.02200's simple-share): tokens
  passed through the block's own frozen norm and key / value projections and attended
  to, never attending. A VPT-deep prompt token is replaced at the next layer, so its only
  effect on the real tokens is through its key and value: these tokens are exactly
  VPT-deep without lengthening the sequence. The block turns them into a prefix;
* **per-layer generators** (VAPT): callables run on a block's input that return that
  block's prefix / key-value tokens / delta (input-adaptive prompts);
* **low-rank weight deltas** (LoRA family, :mod:`clbench.encoders.deltas`) on the q / k /
  v projections, the attention output projection and the MLP linears, per sample where
  tasks differ within a batch; the attention maths itself does not change.

Without a gate the maths is plain attention over concatenated keys/values, so it runs
through ``scaled_dot_product_attention`` (fused kernels on GPU); the gate needs the
logits, so that path is explicit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.deltas import LayerDelta, merge_deltas

# Maps prefix logits [B, H, N, Lp] to gated logits of the same shape.
PrefixGate = Callable[[Tensor], Tensor]


@dataclass
class LayerPrompt:
    """What one block receives: the layer's share of a :class:`Prompt`.

    prefix: [B or 1, 2, Lp, D] keys (index 0) and values (index 1) in model space.
    gate: applied to the logits of every prefix key (kv-token keys included).
    kv_tokens: [B or 1, Lk, D] key/value-only tokens (see the module docstring).
    delta: the block's low-rank / dense weight deltas.
    """

    prefix: Tensor | None = None
    gate: PrefixGate | None = None
    kv_tokens: Tensor | None = None
    delta: LayerDelta | None = None

    def merged(self, other: LayerPrompt) -> LayerPrompt:
        """Both at once: prefixes and kv tokens concatenated, deltas summed; two gates on
        one layer are an error."""
        if self.gate is not None and other.gate is not None:
            raise ValueError("two gates on one layer")
        delta = self.delta
        if other.delta is not None:
            delta = other.delta if delta is None else delta.merged(other.delta)
        return LayerPrompt(
            prefix=join(self.prefix, other.prefix, dim=2),
            gate=self.gate if self.gate is not None else other.gate,
            kv_tokens=join(self.kv_tokens, other.kv_tokens, dim=1),
            delta=delta,
        )


NO_LAYER_PROMPT = LayerPrompt()

# A per-layer generator: (block input hidden [B, N, D], the encoder's per-batch context)
# -> that block's LayerPrompt. ``hidden`` is the sequence as the block sees it: the
# encoder's leading tokens ([CLS], registers: ``encoder.num_leading_tokens``), then the
# prompt's input tokens (``Prompt.num_tokens``), then the input's own tokens.
LayerGenerator = Callable[[Tensor, Any], LayerPrompt]


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
    kv_tokens: layer index -> [B or 1, Lk, D] key/value-only tokens: the block projects
        them with its own frozen norm and key / value weights (and the layer's k / v
        deltas) into Lk more prefix positions. VPT-deep is ``kv_tokens`` on every layer.
    generators: layer index -> :data:`LayerGenerator`, called by
        ``PromptableEncoder.forward`` on the block's input right before the block; what
        it returns joins the layer's static fields.
    deltas: layer index -> :class:`~clbench.encoders.deltas.LayerDelta`, the weight
        deltas of that block's projections.

    Prefixes of a layer beyond the encoder's depth are skipped (prompt modules check
    their layers); kv tokens, generators and deltas of such a layer are an error.
    """

    prefixes: dict[int, Tensor] = field(default_factory=dict)
    tokens: Tensor | None = None
    gates: dict[int, PrefixGate] = field(default_factory=dict)
    kv_tokens: dict[int, Tensor] = field(default_factory=dict)
    generators: dict[int, LayerGenerator] = field(default_factory=dict)
    deltas: dict[int, LayerDelta] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def layer(self, index: int) -> LayerPrompt:
        """The static fields of layer ``index`` (generators run in the encoder)."""
        return LayerPrompt(
            prefix=self.prefixes.get(index),
            gate=self.gates.get(index),
            kv_tokens=self.kv_tokens.get(index),
            delta=self.deltas.get(index),
        )

    def check_layers(self, num_layers: int) -> None:
        for name in ("kv_tokens", "generators", "deltas"):
            beyond = [layer for layer in getattr(self, name) if not 0 <= layer < num_layers]
            if beyond:
                raise ValueError(
                    f"Prompt.{name} has layers {sorted(beyond)}; this encoder has layers "
                    f"0..{num_layers - 1}"
                )


def join(first: Tensor | None, second: Tensor | None, dim: int) -> Tensor | None:
    """Concatenate along ``dim``, broadcasting a batch dimension of 1; None is empty."""
    if first is None:
        return second
    if second is None:
        return first
    return concat(first, second, dim)


def concat(first: Tensor, second: Tensor, dim: int) -> Tensor:
    """``torch.cat`` along ``dim``, broadcasting a batch dimension of 1."""
    batch = max(first.shape[0], second.shape[0])
    first = first.expand(batch, *first.shape[1:])
    second = second.expand(batch, *second.shape[1:])
    return torch.cat([first, second.to(first.dtype)], dim=dim)


def merge_layer_fields(*prompts: Prompt) -> dict[str, Any]:
    """The kv tokens, generators and deltas of several prompts as one prompt's fields
    (for ``clbench.prompts.merge_prompts``): kv tokens concatenated, deltas summed, two
    generators of one layer run both and their outputs merged."""
    kv_tokens: dict[int, Tensor] = {}
    generators: dict[int, LayerGenerator] = {}
    for prompt in prompts:
        for layer, tokens in prompt.kv_tokens.items():
            if layer in kv_tokens:
                tokens = concat(kv_tokens[layer], tokens, dim=1)
            kv_tokens[layer] = tokens
        for layer, generator in prompt.generators.items():
            generators[layer] = (
                _both(generators[layer], generator) if layer in generators else generator
            )
    deltas = merge_deltas(*(prompt.deltas for prompt in prompts))
    return {"kv_tokens": kv_tokens, "generators": generators, "deltas": deltas}


def _both(first: LayerGenerator, second: LayerGenerator) -> LayerGenerator:
    def generate(hidden: Tensor, context: Any) -> LayerPrompt:
        return first(hidden, context).merged(second(hidden, context))

    return generate


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


def _slow_fused_kernel(q: Tensor) -> bool:
    """Whether the written-out attention beats ``scaled_dot_product_attention`` here: on a
    CPU in bf16 / fp16 the fused kernel is ~2.5x slower forward + backward (torch 2.14,
    B 16, H 3, N 222, dh 64: 24.6 vs 10.9 ms; forward 7.1 vs 3.7 ms), so bf16 runs there
    would lose most of what bf16 gains. fp32 on a CPU and every GPU keep the fused one."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


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

    if (gate is None or prefix_length == 0) and not _slow_fused_kernel(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)

    logits = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    if gate is not None and prefix_length:
        gated_prefix = gate(logits[..., :prefix_length])
        logits = torch.cat([gated_prefix, logits[..., prefix_length:]], dim=-1)
    if additive_mask is not None:
        logits = logits + additive_mask
    return logits.softmax(dim=-1) @ v


# NoRGa's gate activations (MoE_PromptCL vits/norga_prompt_vision_transformer.py: None,
# sigmoid, relu, tanh, gelu, softplus, elu; torch's defaults, beta 1 / alpha 1). "identity"
# is their None: s + alpha * tau * s, a learnable logit scale, not plain prefix tuning.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "relu": F.relu,
    "softplus": F.softplus,
    "elu": F.elu,
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


def residual_gates(layers: Iterable[int], activation: str | None) -> nn.ModuleDict:
    """One :class:`ResidualGate` per prompted layer (keyed by the layer's number as a
    string, shared by heads and tasks), or none when ``activation`` is None."""
    if activation is None:
        return nn.ModuleDict()
    return nn.ModuleDict({str(layer): ResidualGate(activation) for layer in layers})

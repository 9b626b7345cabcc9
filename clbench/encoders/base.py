"""The promptable-encoder interface shared by every backbone adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from clbench.encoders.attention import NO_LAYER_PROMPT, LayerPrompt, Prompt
from clbench.errors import UsageError

# What a forward pass must deliver: "tokens" every final token state; "pooled" only the
# pooled feature; "prompt" the pooled feature and the prompt tokens' final states. The
# last block's queries, attention output and MLP are computed only for the rows the
# readout needs (its keys and values still see every token), so "pooled" saves ~5/6 of
# the last block (scripts/bench_readout.py, 2 CPU threads, batch 16, 25 prompt tokens:
# ViT-Ti/16 2.6% of a forward, 6.5% of forward + backward; MiniLM-L6 14% / 15%).
Readout = Literal["tokens", "pooled", "prompt"]
READOUTS: tuple[str, ...] = get_args(Readout)


@dataclass
class EncoderOutput:
    """pooled: [B, feature_dim] (ViT [CLS]; text: entity-marker states concatenated).
    tokens: [B, N, D] final hidden states, prompt tokens included (readout "tokens";
    under "pooled" / "prompt" only the rows that readout kept, see ``readout``).
    num_prompt_tokens / prompt_offset: where the prompt tokens sit in ``tokens``.
    """

    pooled: Tensor
    tokens: Tensor
    num_prompt_tokens: int = 0
    prompt_offset: int = 0
    readout: Readout = "tokens"

    def prompt_token_states(self) -> Tensor:
        """The final states of the prompt tokens, [B, Lt, D]."""
        if self.readout == "pooled":
            raise UsageError(
                "this encoder output was computed with readout='pooled', which keeps no "
                "prompt token states; pass readout='prompt' (or 'tokens')"
            )
        start = self.prompt_offset
        return self.tokens[:, start : start + self.num_prompt_tokens]


@dataclass(frozen=True)
class OutputRows:
    """The rows of the last block a readout needs: the first ``leading`` rows (a view,
    nothing copied) or, per sample, the rows ``index`` [B, r]. ``context`` is the batch
    context re-indexed to the kept rows (what ``pool`` reads afterwards) and
    ``num_prompt_tokens`` how many prompt tokens the kept rows hold (after the leading
    tokens, in order)."""

    leading: int | None = None
    index: Tensor | None = None
    context: Any = None
    num_prompt_tokens: int = 0

    def take(self, states: Tensor, dim: int) -> Tensor:
        """The kept rows of ``states`` [B, ..., N (at ``dim``), ...]."""
        if self.leading is not None:
            return states.narrow(dim, 0, self.leading)
        assert self.index is not None
        batch, kept = self.index.shape
        view = [batch] + [1] * (dim - 1) + [kept] + [1] * (states.dim() - dim - 1)
        size = [*states.shape[:dim], kept, *states.shape[dim + 1 :]]
        return states.gather(dim, self.index.view(view).expand(size))


class PromptableEncoder(nn.Module):
    """A frozen pretrained transformer whose attention a prompt can change.

    Subclasses implement ``embed`` (raw input -> token states + per-batch context),
    ``run_block`` (one frozen block with the layer's :class:`LayerPrompt`: prefix, gate,
    key/value tokens, weight deltas), ``finish`` (final norm), ``pool`` and
    ``projection_weight``. The frozen weights exist once; strategies share this module,
    and a prompt pool's query is this same module run without a prompt.

    Low-rank updates (LoRA family) reach the projections as ``Prompt.deltas``, applied
    in ``run_block`` next to the frozen modules: nothing wraps, copies or writes a layer,
    so the un-prompted query (``query``) is always the frozen model's.
    """

    modality: str = ""
    embed_dim: int
    num_layers: int
    num_heads: int
    feature_dim: int
    # leading special tokens ([CLS], register tokens) before which nothing is inserted
    num_leading_tokens: int = 1

    def freeze(self) -> PromptableEncoder:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> PromptableEncoder:
        # Frozen and deterministic: dropout stays off even while a strategy trains, so
        # the un-prompted query of an item is a fixed function of the item.
        return super().train(False)

    # -- to implement ---------------------------------------------------------------
    def embed(self, x: Tensor) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def run_block(
        self,
        index: int,
        hidden: Tensor,
        context: Any,
        layer: LayerPrompt,
        rows: OutputRows | None = None,
    ) -> Tensor:
        """Block ``index`` on ``hidden`` [B, N, D] with the layer's prompt, through
        :func:`~clbench.encoders.attention.prompted_attention`: the prefix joined by the
        key/value tokens projected with the block's own frozen norm and k / v weights
        (deltas included), the gate, and the deltas on every targeted projection. With
        an empty ``layer`` it must be the frozen block itself, bit for bit. With ``rows``
        (only where ``output_rows`` gives them) it returns [B, r, D], the kept rows."""
        raise NotImplementedError

    def projection_weight(self, index: int, target: str) -> Tensor:
        """The frozen weight [d_out, d_in] that delta ``target`` (q, k, v, o, fc1, fc2)
        of block ``index`` adapts (a read-only view: e.g. for SVD initialisations)."""
        raise NotImplementedError

    def finish(self, hidden: Tensor) -> Tensor:
        return hidden

    def pool(self, hidden: Tensor, context: Any, num_prompt_tokens: int) -> Tensor:
        raise NotImplementedError

    def extend_context(self, context: Any, num_prompt_tokens: int) -> Any:
        """Adapt the per-batch context after ``num_prompt_tokens`` tokens were inserted."""
        return context

    def output_rows(
        self, context: Any, num_prompt_tokens: int, readout: Readout
    ) -> OutputRows | None:
        """The rows of the last block that ``pool`` (and, for "prompt", the prompt token
        states) read, or None to compute every row (the default: an encoder that returns
        rows must accept ``rows=`` in ``run_block``, computing the block's queries,
        attention output and MLP for those rows only, with keys and values from all)."""
        return None

    # -- shared ---------------------------------------------------------------------
    def forward(
        self, x: Tensor, prompt: Prompt | None = None, *, readout: Readout = "tokens"
    ) -> EncoderOutput:
        if readout not in READOUTS:
            raise UsageError(f"unknown readout {readout!r}; valid: {', '.join(READOUTS)}")
        hidden, context = self.embed(x)
        num_prompt_tokens = 0
        if prompt is not None and prompt.tokens is not None:
            tokens = prompt.tokens.to(hidden.dtype)
            if tokens.shape[0] != hidden.shape[0]:
                tokens = tokens.expand(hidden.shape[0], -1, -1)
            lead = self.num_leading_tokens
            hidden = torch.cat([hidden[:, :lead], tokens, hidden[:, lead:]], dim=1)
            num_prompt_tokens = tokens.shape[1]
            context = self.extend_context(context, num_prompt_tokens)
        if prompt is not None:
            prompt.check_layers(self.num_layers)
        rows = None
        for index in range(self.num_layers):
            layer = NO_LAYER_PROMPT
            if prompt is not None:
                layer = prompt.layer(index)
                generator = prompt.generators.get(index)
                if generator is not None:  # VAPT: computed from this block's own input
                    layer = layer.merged(generator(hidden, context))
            # the last block, for the rows the readout reads (a tap sees every row)
            tapped = layer.delta is not None and bool(layer.delta.taps)
            if index == self.num_layers - 1 and readout != "tokens" and not tapped:
                rows = self.output_rows(context, num_prompt_tokens, readout)
            if rows is not None:
                hidden = self.run_block(index, hidden, context, layer, rows=rows)
                context, num_prompt_tokens = rows.context, rows.num_prompt_tokens
            else:
                hidden = self.run_block(index, hidden, context, layer)
        hidden = self.finish(hidden)
        pooled = self.pool(hidden, context, num_prompt_tokens)
        kept: Readout = "tokens" if rows is None else readout
        return EncoderOutput(pooled, hidden, num_prompt_tokens, self.num_leading_tokens, kept)

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """The un-prompted pooled feature: the query of prompt pools and task predictors."""
        return self.forward(x, readout="pooled").pooled

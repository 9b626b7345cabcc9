"""Promptable adapter for Hugging Face BERT-family encoders (BERT, MiniLM, RoBERTa).

Input is one LongTensor [B, L] of token ids (padding = the tokenizer's pad id), so text
batches collate like images. For relation extraction the entity markers
[E11] head [E12] ... [E21] tail [E22] are written with BERT's reserved ``[unused0..3]``
vocabulary entries, so no embedding matrix is resized (RP-CRE, CRL and the WAVE-CRE code
add four new tokens instead and resize it); the pooled feature is the concatenation of
the final states at [E11] and [E21] (2 x hidden size).

Two behaviours of the WAVE-CRE authors' code, both off by default (the strategy that
reproduces them switches them on for its run's encoder):

* ``attend_padding``: no attention mask, so every position of the fixed padded length,
  [PAD] included, is attended (their ``methods/backbone.py`` calls ``BertEncoder`` on the
  embeddings without a mask, lines 131-149);
* ``use_embeddings(MarkerEmbeddings)``: the embedding layer with trainable marker rows,
  position and token-type embeddings and LayerNorm, which they train in task 1
  (``methods/manager.py`` lines 86-142); the frozen word matrix is shared, not copied.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.encoders.attention import LayerPrompt, join, prompted_attention
from clbench.encoders.base import OutputRows, PromptableEncoder, Readout
from clbench.encoders.deltas import MLP_TARGETS, LayerDelta, check_target, project
from clbench.errors import UsageError

ENTITY_MARKERS = ("[E11]", "[E12]", "[E21]", "[E22]")
MARKER_VOCAB_ENTRIES = ("[unused0]", "[unused1]", "[unused2]", "[unused3]")


@dataclass
class TextContext:
    key_padding_mask: Tensor  # [B, N] True where a token may be attended
    head_positions: Tensor  # [B] position of [E11]
    tail_positions: Tensor  # [B] position of [E21]


class MarkerEmbeddings(nn.Module):
    """A BERT embedding layer whose small parts are a trainable copy: the rows of the four
    entity markers, the position and token-type embeddings and the LayerNorm. Every other
    word row is read from the frozen word matrix passed to :meth:`forward`, so the copy
    holds ~0.5M values for BERT-base, not the 23M of the vocabulary.

    The WAVE-CRE authors train the whole ``encoder.embeddings`` module in task 1 with a
    gradient hook that zeroes every word row but the four new markers
    (``methods/backbone.py`` lines 103-114): what moves is exactly these parts. Untrained,
    :meth:`forward` equals ``BertEmbeddings`` (absolute positions, token type 0).
    """

    marker_ids: Tensor
    position_embeddings: nn.Embedding
    token_type_embeddings: nn.Embedding
    LayerNorm: nn.LayerNorm

    def __init__(self, embeddings: Any, marker_ids: Sequence[int]) -> None:
        """``embeddings``: a Hugging Face ``BertEmbeddings`` (the frozen layer to copy)."""
        super().__init__()
        if getattr(embeddings, "position_embeddings", None) is None:
            raise UsageError("marker embeddings need BERT-style absolute position embeddings")
        words = embeddings.word_embeddings.weight
        ids = torch.tensor(list(marker_ids), dtype=torch.long, device=words.device)
        self.register_buffer("marker_ids", ids)
        self.marker_rows = nn.Parameter(words.detach()[ids].clone())
        self.position_embeddings = copy.deepcopy(embeddings.position_embeddings)
        self.token_type_embeddings = copy.deepcopy(embeddings.token_type_embeddings)
        self.LayerNorm = copy.deepcopy(embeddings.LayerNorm)
        self.dropout_rate = float(embeddings.dropout.p)
        # dropout only while they train (BERT's, as the authors' encoder.train() has it);
        # otherwise the layer is as deterministic as the frozen encoder it feeds
        self.tuning = False
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> MarkerEmbeddings:
        return super().train(False)  # see ``tuning``: a strategy's model.train() is no switch

    def forward(self, input_ids: Tensor, word_embeddings: nn.Embedding) -> Tensor:
        hidden = word_embeddings(input_ids)
        for slot in range(len(self.marker_ids)):
            is_marker = (input_ids == self.marker_ids[slot]).unsqueeze(-1)
            hidden = torch.where(is_marker, self.marker_rows[slot].to(hidden.dtype), hidden)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        token_types = torch.zeros_like(input_ids)
        hidden = hidden + self.token_type_embeddings(token_types)
        hidden = hidden + self.position_embeddings(positions).unsqueeze(0)
        hidden = self.LayerNorm(hidden)
        return F.dropout(hidden, self.dropout_rate, training=self.tuning)


class BertEncoder(PromptableEncoder):
    modality = "text"

    def __init__(self, model: Any, tokenizer: Any, pooling: Literal["entity", "cls"] = "entity"):
        super().__init__()
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if layers is None or not hasattr(layers[0].attention, "self"):
            raise UsageError(f"{type(model).__name__} is not a BERT-family encoder")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        config = model.config
        self.embed_dim = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.feature_dim = 2 * self.embed_dim if pooling == "entity" else self.embed_dim
        self.pad_token_id = tokenizer.pad_token_id
        self.marker_ids = dict(
            zip(ENTITY_MARKERS, tokenizer.convert_tokens_to_ids(list(MARKER_VOCAB_ENTRIES)))
        )
        if tokenizer.unk_token_id in self.marker_ids.values():
            raise UsageError("the tokenizer has no [unused0..3] entries for the entity markers")
        # the WAVE-CRE code's behaviours (module docstring); off: the corrected encoder
        self.attend_padding = False
        self._marker_embeddings: MarkerEmbeddings | None = None
        self.freeze()

    def reset_run_state(self) -> None:
        """Back to the corrected encoder: a strategy set up on this (shared) encoder must
        not inherit the authors'-code behaviours an earlier run in the process turned on."""
        self.attend_padding = False
        self.use_embeddings(None)

    def marker_embeddings(self) -> MarkerEmbeddings:
        """A fresh :class:`MarkerEmbeddings` copied from this encoder's embedding layer."""
        return MarkerEmbeddings(self.model.embeddings, list(self.marker_ids.values()))

    def use_embeddings(self, embeddings: MarkerEmbeddings | None) -> None:
        """Embed every later input with ``embeddings`` (None: the frozen layer again).

        The module stays its owner's (a strategy's model: it is checkpointed and moved to
        the device there); the encoder only holds a reference, kept out of its own
        modules so that the encoder's parameters remain the frozen backbone's."""
        object.__setattr__(self, "_marker_embeddings", embeddings)

    @property
    def blocks(self) -> Any:
        return self.model.encoder.layer

    def embed(self, x: Tensor) -> tuple[Tensor, TextContext]:
        if self.attend_padding:
            # the authors' code: every position of the scenario's padded length is attended
            mask = torch.ones_like(x, dtype=torch.bool)
        else:
            # Scenarios pad every sentence to one fixed length so batches collate; cutting
            # the batch to its longest sentence (padding is at the end) removes attention
            # over padding that would be masked anyway: ~3x faster on FewRel, same outputs.
            longest = int((x != self.pad_token_id).sum(dim=1).max())
            x = x[:, :longest]
            mask = x != self.pad_token_id
        if self._marker_embeddings is not None:
            hidden = self._marker_embeddings(x, self.model.embeddings.word_embeddings)
        else:
            hidden = self.model.embeddings(input_ids=x, token_type_ids=torch.zeros_like(x))
        head = (x == self.marker_ids["[E11]"]).int().argmax(dim=1)
        tail = (x == self.marker_ids["[E21]"]).int().argmax(dim=1)
        if self.pooling == "entity":
            # argmax of an all-zero row is 0, i.e. [CLS]: refuse that instead of pooling it
            found = (head > 0).all() & (tail > 0).all()
            if x.device.type == "cpu":
                if not found:
                    raise ValueError("entity pooling needs [E11] and [E21] markers in every input")
            else:  # no host round trip on an accelerator
                torch._assert_async(found)
        return hidden, TextContext(mask, head, tail)

    def extend_context(self, context: TextContext, num_prompt_tokens: int) -> TextContext:
        mask = context.key_padding_mask
        ones = mask.new_ones(mask.shape[0], num_prompt_tokens)
        lead = self.num_leading_tokens
        mask = torch.cat([mask[:, :lead], ones, mask[:, lead:]], dim=1)
        return TextContext(
            mask,
            context.head_positions + num_prompt_tokens,
            context.tail_positions + num_prompt_tokens,
        )

    def output_rows(
        self, context: TextContext, num_prompt_tokens: int, readout: Readout
    ) -> OutputRows | None:
        # the leading tokens, the prompt tokens if asked, then (entity pooling) the two
        # markers of each sample, whose positions differ per sample
        kept_prompt = num_prompt_tokens if readout == "prompt" else 0
        first = self.num_leading_tokens + kept_prompt
        if self.pooling == "cls":
            return OutputRows(leading=first, context=context, num_prompt_tokens=kept_prompt)
        head, tail = context.head_positions, context.tail_positions
        leading = torch.arange(first, device=head.device).expand(head.shape[0], first)
        index = torch.cat([leading, head[:, None], tail[:, None]], dim=1)
        kept = TextContext(
            context.key_padding_mask.gather(1, index),
            torch.full_like(head, first),
            torch.full_like(tail, first + 1),
        )
        return OutputRows(index=index, context=kept, num_prompt_tokens=kept_prompt)

    def run_block(
        self,
        index: int,
        hidden: Tensor,
        context: TextContext,
        layer: LayerPrompt,
        rows: OutputRows | None = None,
    ) -> Tensor:
        block = self.model.encoder.layer[index]
        attention, delta = block.attention.self, layer.delta

        def heads(projection: nn.Linear, target: str, states: Tensor) -> Tensor:
            out = project(projection, states, delta, target)
            return out.view(out.shape[0], states.shape[1], self.num_heads, -1).transpose(1, 2)

        # keys and values from every token; queries and all after them for the kept rows
        keys = heads(attention.key, "k", hidden)
        values = heads(attention.value, "v", hidden)
        if rows is not None:
            hidden = rows.take(hidden, 1)
        batch, length, _ = hidden.shape
        prefix = layer.prefix
        if layer.kv_tokens is not None:
            tokens = layer.kv_tokens.to(hidden.dtype)
            prefix = join(prefix, self._key_value_prefix(attention, tokens, delta), dim=2)
        out = prompted_attention(
            heads(attention.query, "q", hidden),
            keys,
            values,
            prefix=prefix,
            gate=layer.gate,
            key_padding_mask=context.key_padding_mask,
        )
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        if delta is None or not delta.touches(("o", *MLP_TARGETS)):
            attended = block.attention.output(out, hidden)
            return block.output(block.intermediate(attended), attended)
        # BertSelfOutput, BertIntermediate and BertOutput written out, so their dense
        # layers take the deltas
        self_output = block.attention.output
        dense = project(self_output.dense, out, delta, "o")
        attended = self_output.LayerNorm(self_output.dropout(dense) + hidden)
        intermediate = block.intermediate
        inner = intermediate.intermediate_act_fn(
            project(intermediate.dense, attended, delta, "fc1")
        )
        output = block.output
        dense = project(output.dense, inner, delta, "fc2")
        return output.LayerNorm(output.dropout(dense) + attended)

    @staticmethod
    def _key_value_prefix(attention: Any, tokens: Tensor, delta: LayerDelta | None) -> Tensor:
        """Key/value-only tokens [b, Lk, D] -> prefix [b, 2, Lk, D] through the layer's
        own key / value projections (and their deltas). BERT normalises after each
        sub-layer, so a token inserted into a layer's input meets no norm before them:
        this is exactly what the layer computes for an inserted VPT-deep token."""
        keys = project(attention.key, tokens, delta, "k")
        values = project(attention.value, tokens, delta, "v")
        batch = max(keys.shape[0], values.shape[0])
        keys = keys.expand(batch, *keys.shape[1:])
        values = values.expand(batch, *values.shape[1:])
        return torch.stack([keys, values], dim=1)

    def projection_weight(self, index: int, target: str) -> Tensor:
        check_target(target)
        block = self.model.encoder.layer[index]
        modules = {
            "q": block.attention.self.query,
            "k": block.attention.self.key,
            "v": block.attention.self.value,
            "o": block.attention.output.dense,
            "fc1": block.intermediate.dense,
            "fc2": block.output.dense,
        }
        return modules[target].weight.detach()

    def pool(self, hidden: Tensor, context: TextContext, num_prompt_tokens: int) -> Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return torch.cat(
            [hidden[rows, context.head_positions], hidden[rows, context.tail_positions]], dim=-1
        )


def create_bert(
    name_or_path: str | Path,
    pooling: Literal["entity", "cls"] = "entity",
    *,
    local_only: bool = False,
) -> BertEncoder:
    """A BERT-family encoder from the Hugging Face hub or a local directory."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # the load report lists BERT's pooler as unused: we never use it (add_pooling_layer=False)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_only)
        model = AutoModel.from_pretrained(
            str(name_or_path),
            local_files_only=local_only,
            add_pooling_layer=False,
            attn_implementation="eager",
        )
    except OSError as error:
        raise UsageError(
            f"could not load the encoder {name_or_path!r} ({str(error).splitlines()[0]}); "
            "offline, put the model files in a directory and pass backbone.path=DIR"
        ) from error
    return BertEncoder(model, tokenizer, pooling)

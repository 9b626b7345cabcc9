"""Promptable adapter for Hugging Face BERT-family encoders (BERT, MiniLM, RoBERTa).

Input is one LongTensor [B, L] of token ids (padding = the tokenizer's pad id), so text
batches collate like images. For relation extraction the entity markers
[E11] head [E12] ... [E21] tail [E22] are written with BERT's reserved ``[unused0..3]``
vocabulary entries (as RP-CRE / CRL do), so no embedding matrix is resized; the pooled
feature is the concatenation of the final states at [E11] and [E21] (2 x hidden size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from clbench.encoders.attention import PrefixGate, prompted_attention
from clbench.encoders.base import PromptableEncoder
from clbench.errors import UsageError

ENTITY_MARKERS = ("[E11]", "[E12]", "[E21]", "[E22]")
MARKER_VOCAB_ENTRIES = ("[unused0]", "[unused1]", "[unused2]", "[unused3]")


@dataclass
class TextContext:
    key_padding_mask: Tensor  # [B, N] True where a token may be attended
    head_positions: Tensor  # [B] position of [E11]
    tail_positions: Tensor  # [B] position of [E21]


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
        self.freeze()

    @property
    def blocks(self) -> Any:
        return self.model.encoder.layer

    def embed(self, x: Tensor) -> tuple[Tensor, TextContext]:
        # Scenarios pad every sentence to one fixed length so batches collate; cutting the
        # batch to its longest sentence (padding is at the end) removes attention over
        # padding that would be masked anyway: ~3x faster on FewRel, identical outputs.
        longest = int((x != self.pad_token_id).sum(dim=1).max())
        x = x[:, :longest]
        hidden = self.model.embeddings(input_ids=x, token_type_ids=torch.zeros_like(x))
        mask = x != self.pad_token_id
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

    def run_block(
        self,
        index: int,
        hidden: Tensor,
        context: TextContext,
        prefix: Tensor | None,
        gate: PrefixGate | None,
    ) -> Tensor:
        layer = self.model.encoder.layer[index]
        attention = layer.attention.self
        batch, length, _ = hidden.shape

        def heads(projection: nn.Module) -> Tensor:
            return projection(hidden).view(batch, length, self.num_heads, -1).transpose(1, 2)

        out = prompted_attention(
            heads(attention.query),
            heads(attention.key),
            heads(attention.value),
            prefix=prefix,
            gate=gate,
            key_padding_mask=context.key_padding_mask,
        )
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        attended = layer.attention.output(out, hidden)
        return layer.output(layer.intermediate(attended), attended)

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

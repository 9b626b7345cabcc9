"""Inputs and hand-written references shared by the low-rank and key/value-token tests."""

from __future__ import annotations

import copy

import torch

WORDS = [
    ["[CLS]", "[unused0]", "paris", "[unused1]", "is", "the", "capital", "of"]
    + ["[unused2]", "france", "[unused3]", "[SEP]"],
    ["[CLS]", "the", "[unused0]", "nile", "[unused1]", "flows", "into", "[unused2]"]
    + ["egypt", "[unused3]", ".", "more", "words", "[SEP]"],
    ["[CLS]", "[unused0]", "bach", "[unused1]", "wrote", "[unused2]", "fugues", "[unused3]"]
    + ["[SEP]"],
]


def text_batch(encoder) -> torch.Tensor:
    """Three marked sentences of different lengths, padded: [3, L] token ids."""
    tokenizer = encoder.tokenizer
    length = max(map(len, WORDS))
    ids = torch.full((len(WORDS), length), tokenizer.pad_token_id)
    for row, words in enumerate(WORDS):
        ids[row, : len(words)] = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    return ids


def batch_for(encoder, seed: int = 0) -> torch.Tensor:
    if encoder.modality == "text":
        return text_batch(encoder)
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def frozen_linear(encoder, layer: int, target: str) -> tuple[torch.nn.Linear, slice]:
    """The module a target names and the rows of its weight, written out per backbone
    (independently of ``encoder.projection_weight``)."""
    if encoder.modality == "vision":
        block = encoder.model.blocks[layer]
        width = encoder.embed_dim
        qkv = {"q": slice(0, width), "k": slice(width, 2 * width), "v": slice(2 * width, None)}
        if target in qkv:
            return block.attn.qkv, qkv[target]
        module = {"o": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}[target]
        return module, slice(None)
    block = encoder.model.encoder.layer[layer]
    module = {
        "q": block.attention.self.query,
        "k": block.attention.self.key,
        "v": block.attention.self.value,
        "o": block.attention.output.dense,
        "fc1": block.intermediate.dense,
        "fc2": block.output.dense,
    }[target]
    return module, slice(None)


def merged_copy(encoder, updates: dict[tuple[int, str], torch.Tensor]):
    """A deep copy of ``encoder`` with W += dW written into the copy's weights: the
    merged model a delta must reproduce (test-only; the real path never writes)."""
    merged = copy.deepcopy(encoder)
    with torch.no_grad():
        for (layer, target), update in updates.items():
            module, rows = frozen_linear(merged, layer, target)
            module.weight[rows] += update
    return merged

"""Key/value-only prompt tokens are exact VPT-deep; per-layer generators see the block input.

The references insert the prompt tokens into the sequence before every block and drop
them after it (VPT-deep's replacement), running the libraries' own blocks (timm
``Block.forward``, Hugging Face ``BertLayer.forward``). The kv-token path never lengthens
the sequence, so the two sum the softmax in a different order: fp32 tolerance (1e-5 on the
ViT, 1e-4 on MiniLM as the other BERT-vs-transformers tests use), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from encoder_inputs import batch_for, merged_copy

from clbench.adapters import LayerAdapters, LoRA
from clbench.encoders import Prompt, ResidualGate
from clbench.encoders.attention import LayerPrompt
from clbench.prompts import merge_prompts

ENCODERS = ["tiny_vit", "minilm"]
TOLERANCE = {"tiny_vit": 1e-5, "minilm": 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")


def vpt_deep_vit(encoder, x, tokens):
    """VPT-deep written out on timm's blocks: tokens[i] [1, L, D] inserted after the
    leading tokens before block i and removed after it; pooled feature and tokens."""
    model = encoder.model
    hidden = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    lead, batch = encoder.num_leading_tokens, x.shape[0]
    for index, block in enumerate(model.blocks):
        prompt = tokens[index].expand(batch, -1, -1)
        out = block(torch.cat([hidden[:, :lead], prompt, hidden[:, lead:]], dim=1))
        hidden = torch.cat([out[:, :lead], out[:, lead + prompt.shape[1] :]], dim=1)
    hidden = model.norm(hidden)
    return model.forward_head(hidden, pre_logits=True), hidden


def vpt_deep_bert(encoder, ids, tokens):
    """VPT-deep written out on Hugging Face's BertLayer, with the padding mask extended
    by the (always visible) prompt positions."""
    model = encoder.model
    hidden = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    mask = ids != encoder.pad_token_id
    batch = ids.shape[0]
    for index, layer in enumerate(model.encoder.layer):
        prompt = tokens[index].expand(batch, -1, -1)
        length = prompt.shape[1]
        visible = torch.cat([mask[:, :1], mask.new_ones(batch, length), mask[:, 1:]], dim=1)
        additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
        sequence = torch.cat([hidden[:, :1], prompt, hidden[:, 1:]], dim=1)
        out = layer(sequence, attention_mask=additive[:, None, None, :])
        out = out[0] if isinstance(out, tuple) else out
        hidden = torch.cat([out[:, :1], out[:, 1 + length :]], dim=1)
    rows = torch.arange(batch)
    head = (ids == encoder.marker_ids["[E11]"]).int().argmax(1)
    tail = (ids == encoder.marker_ids["[E21]"]).int().argmax(1)
    pooled = torch.cat([hidden[rows, head], hidden[rows, tail]], dim=-1)
    return pooled, hidden


def vpt_deep(encoder, x, tokens):
    reference = vpt_deep_bert if encoder.modality == "text" else vpt_deep_vit
    return reference(encoder, x, tokens)


def random_tokens(encoder, length=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, length, encoder.embed_dim, generator=generator)
        for _ in range(encoder.num_layers)
    ]


def valid_positions(encoder, x):
    if encoder.modality == "text":
        return x != encoder.pad_token_id
    return torch.ones(x.shape[0], 1 + encoder.model.patch_embed.num_patches, dtype=torch.bool)


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_kv_tokens_equal_vpt_deep_with_inserted_and_replaced_tokens(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    tokens = random_tokens(encoder)
    with torch.no_grad():
        ours = encoder(x, Prompt(kv_tokens=dict(enumerate(tokens))))
        pooled, hidden = vpt_deep(encoder, x, tokens)
    tolerance = TOLERANCE[encoder_name]
    torch.testing.assert_close(ours.pooled, pooled, atol=tolerance, rtol=tolerance)
    valid = valid_positions(encoder, x)
    torch.testing.assert_close(ours.tokens[valid], hidden[valid], atol=tolerance, rtol=tolerance)
    assert not torch.allclose(ours.pooled, encoder(x).pooled, atol=1e-3)


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_kv_tokens_take_the_layers_key_value_deltas(encoder_name, request):
    # an inserted VPT-deep token meets the adapted k / v weights: so must a kv token
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    tokens = random_tokens(encoder, length=2, seed=1)
    generator = torch.Generator().manual_seed(5)

    def lora(weight, layer, target):
        d_out, d_in = weight.shape
        up = 0.2 * torch.randn(d_out, 2, generator=generator)
        return LoRA(d_in, d_out, 2, target=target, up=up)

    adapters = LayerAdapters.build(encoder, [0, encoder.num_layers - 1], ("q", "k", "v"), lora)
    updates = {}
    for layer, adapter in adapters.items():
        updates[layer, adapter.targets[0]] = adapter.scale * (adapter.up @ adapter.down).detach()
    with torch.no_grad():
        ours = encoder(x, Prompt(kv_tokens=dict(enumerate(tokens)), deltas=adapters.deltas()))
        pooled, _ = vpt_deep(merged_copy(encoder, updates), x, tokens)
    tolerance = TOLERANCE[encoder_name]
    torch.testing.assert_close(ours.pooled, pooled, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_kv_tokens_are_prefix_positions_for_the_gate_and_gradients(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    tokens = torch.randn(1, 3, encoder.embed_dim, requires_grad=True)
    blocked = Prompt(kv_tokens={0: tokens}, gates={0: lambda s: torch.full_like(s, float("-inf"))})
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, blocked).pooled, encoder(x).pooled, atol=1e-5, rtol=0)
    # a kv token shared by the batch is the same as one copy per input
    with torch.no_grad():
        shared = encoder(x, Prompt(kv_tokens={1: tokens})).pooled
        copies = encoder(x, Prompt(kv_tokens={1: tokens.expand(x.shape[0], -1, -1)})).pooled
    torch.testing.assert_close(shared, copies, atol=1e-6, rtol=1e-6)
    gate = ResidualGate("sigmoid")
    out = encoder(x, Prompt(kv_tokens={1: tokens}, gates={1: gate}))
    out.pooled.square().sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert gate.alpha.grad is not None
    assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_a_generator_runs_on_its_blocks_input(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    seen = []
    static = torch.randn(1, 2, encoder.embed_dim)

    def generator(hidden, context):
        seen.append((hidden, context))
        return LayerPrompt(kv_tokens=static)

    with torch.no_grad():
        generated = encoder(x, Prompt(generators={1: generator}))
        fixed = encoder(x, Prompt(kv_tokens={1: static}))
        hidden, context = encoder.embed(x)
        after_first = encoder.run_block(0, hidden, context, LayerPrompt())
    assert torch.equal(generated.pooled, fixed.pooled)
    assert len(seen) == 1 and torch.equal(seen[0][0], after_first)
    if encoder.modality == "text":  # the generator gets the padding mask with the input
        assert torch.equal(seen[0][1].key_padding_mask, context.key_padding_mask)


def test_an_input_adaptive_generator_trains_and_gives_per_sample_tokens(tiny_vit):
    # VAPT's shape: tokens computed from the block input's patch tokens, per sample
    x = batch_for(tiny_vit)
    projector = torch.nn.Linear(tiny_vit.embed_dim, 2 * tiny_vit.embed_dim)
    lead = tiny_vit.num_leading_tokens

    def adaptive(hidden, context):
        summary = projector(hidden[:, lead:].mean(dim=1))  # [B, 2D]
        return LayerPrompt(kv_tokens=summary.view(hidden.shape[0], 2, -1))

    out = tiny_vit(x, Prompt(generators={2: adaptive}))
    out.pooled.square().sum().backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    # row b of the batch used its own tokens: running it alone gives the same feature
    with torch.no_grad():
        alone = tiny_vit(x[1:2], Prompt(generators={2: adaptive})).pooled
    torch.testing.assert_close(out.pooled[1:2].detach(), alone, atol=1e-5, rtol=1e-5)


def test_merge_prompts_keeps_kv_tokens_generators_and_deltas(tiny_vit):
    x = batch_for(tiny_vit)
    first, second = torch.randn(1, 2, 32), torch.randn(1, 3, 32)
    merged = merge_prompts(Prompt(kv_tokens={0: first}), Prompt(kv_tokens={0: second}))
    assert merged.kv_tokens[0].shape == (1, 5, 32)
    calls = []

    def generator(name, tokens):
        def generate(hidden, context):
            calls.append(name)
            return LayerPrompt(kv_tokens=tokens)

        return generate

    both = merge_prompts(
        Prompt(generators={1: generator("a", first)}),
        Prompt(generators={1: generator("b", second)}),
    )
    with torch.no_grad():
        joined = tiny_vit(x, both).pooled
        concatenated = tiny_vit(x, Prompt(kv_tokens={1: torch.cat([first, second], 1)})).pooled
    assert calls == ["a", "b"] and torch.equal(joined, concatenated)


def test_kv_tokens_beyond_the_encoder_are_an_error(tiny_vit):
    with pytest.raises(ValueError, match="Prompt.kv_tokens has layers \\[3\\]"):
        tiny_vit(batch_for(tiny_vit), Prompt(kv_tokens={3: torch.zeros(1, 1, 32)}))

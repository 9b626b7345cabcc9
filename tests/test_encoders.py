"""The promptable encoders: exact un-prompted forward, prefixes, tokens, gates, gradients."""

from __future__ import annotations

import pytest
import torch

from clbench.encoders import Prompt, ResidualGate, prompted_attention
from clbench.encoders.attention import split_prefix
from clbench.errors import UsageError


def _text_batch(encoder):
    tokenizer = encoder.tokenizer
    sentences = [
        [
            "[CLS]",
            "[unused0]",
            "paris",
            "[unused1]",
            "is",
            "the",
            "capital",
            "of",
            "[unused2]",
            "france",
            "[unused3]",
            "[SEP]",
        ],
        [
            "[CLS]",
            "the",
            "[unused0]",
            "nile",
            "[unused1]",
            "flows",
            "into",
            "[unused2]",
            "egypt",
            "[unused3]",
            ".",
            "more",
            "words",
            "[SEP]",
        ],
    ]
    length = max(map(len, sentences))
    ids = torch.full((len(sentences), length), tokenizer.pad_token_id)
    for row, words in enumerate(sentences):
        ids[row, : len(words)] = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    return ids, (ids != tokenizer.pad_token_id).long()


def test_vit_without_prompt_equals_timm(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    ours = tiny_vit(x).pooled
    reference = tiny_vit.model.forward_head(tiny_vit.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_bert_without_prompt_equals_transformers(minilm):
    ids, mask = _text_batch(minilm)
    ours = minilm(ids).tokens
    reference = minilm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-4, rtol=1e-4)


def test_bert_pools_entity_markers(minilm):
    ids, _ = _text_batch(minilm)
    out = minilm(ids)
    assert out.pooled.shape == (2, 2 * minilm.embed_dim)
    head = (ids == minilm.marker_ids["[E11]"]).int().argmax(1)
    torch.testing.assert_close(out.pooled[:, : minilm.embed_dim], out.tokens[torch.arange(2), head])


@pytest.mark.parametrize("encoder_name", ["tiny_vit", "minilm"])
def test_prefix_with_minus_infinite_logits_equals_no_prefix(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = torch.randn(2, 3, 32, 32) if encoder_name == "tiny_vit" else _text_batch(encoder)[0]
    prefix = torch.randn(1, 2, 4, encoder.embed_dim)
    blocked = Prompt(
        prefixes={0: prefix, 1: prefix},
        gates={
            0: lambda s: torch.full_like(s, float("-inf")),
            1: lambda s: torch.full_like(s, float("-inf")),
        },
    )
    torch.testing.assert_close(encoder(x, blocked).pooled, encoder(x).pooled, atol=1e-5, rtol=1e-5)
    # and an unblocked prefix does change the output
    assert not torch.allclose(encoder(x, Prompt(prefixes={0: prefix})).pooled, encoder(x).pooled)


def test_gate_with_zero_alpha_is_plain_prefix_tuning(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    prefix = torch.randn(1, 2, 3, tiny_vit.embed_dim)
    gate = ResidualGate("tanh", alpha=0.0)
    gated = tiny_vit(x, Prompt(prefixes={1: prefix}, gates={1: gate})).pooled
    plain = tiny_vit(x, Prompt(prefixes={1: prefix})).pooled
    torch.testing.assert_close(gated, plain, atol=1e-5, rtol=1e-5)
    gate_on = ResidualGate("tanh", alpha=1.0)
    assert not torch.allclose(
        tiny_vit(x, Prompt(prefixes={1: prefix}, gates={1: gate_on})).pooled, plain
    )


def test_gate_formula_on_prefix_logits_only():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    prefix = torch.randn(2, 2, 3, 8)  # D = heads x dh = 8
    gate = ResidualGate("sigmoid", tau=0.5, alpha=2.0)
    out = prompted_attention(q, k, v, prefix=prefix, gate=gate)
    pk, pv = split_prefix(prefix, num_heads=2, batch_size=2)
    prefix_logits = q @ pk.transpose(-2, -1) / 2.0
    token_logits = q @ k.transpose(-2, -1) / 2.0
    gated = prefix_logits + 2.0 * torch.sigmoid(0.5 * prefix_logits)
    weights = torch.cat([gated, token_logits], -1).softmax(-1)
    expected = weights @ torch.cat([pv, v], dim=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prefix_split_is_a_permute_not_a_reshape():
    # key of prefix position p, head h must be prefix[0, 0, p, h*dh:(h+1)*dh]
    prefix = torch.arange(2 * 3 * 8, dtype=torch.float).reshape(1, 2, 3, 8)
    keys, values = split_prefix(prefix, num_heads=2, batch_size=1)
    assert keys.shape == (1, 2, 3, 4)
    torch.testing.assert_close(keys[0, 1, 2], prefix[0, 0, 2, 4:8])
    torch.testing.assert_close(values[0, 0, 1], prefix[0, 1, 1, 0:4])


@pytest.mark.parametrize("encoder_name", ["tiny_vit", "minilm"])
def test_gradients_reach_prompts_and_never_frozen_weights(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = torch.randn(2, 3, 32, 32) if encoder_name == "tiny_vit" else _text_batch(encoder)[0]
    tokens = torch.zeros(1, 2, encoder.embed_dim, requires_grad=True)
    prefix = torch.zeros(1, 2, 3, encoder.embed_dim, requires_grad=True)
    gate = ResidualGate("gelu")
    out = encoder(x, Prompt(tokens=tokens, prefixes={0: prefix}, gates={0: gate}))
    # squared: the sum of a freshly initialised final LayerNorm's output (weight 1, bias 0)
    # is 0 for any input, so a plain sum has a zero gradient everywhere
    out.pooled.square().sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert gate.alpha.grad is not None
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())


def test_prompt_tokens_shift_entity_positions(minilm):
    ids, _ = _text_batch(minilm)
    tokens = torch.randn(1, 3, minilm.embed_dim)
    out = minilm(ids, Prompt(tokens=tokens))
    assert out.tokens.shape[1] == ids.shape[1] + 3
    head = (ids == minilm.marker_ids["[E11]"]).int().argmax(1) + 3
    torch.testing.assert_close(out.pooled[:, : minilm.embed_dim], out.tokens[torch.arange(2), head])
    torch.testing.assert_close(
        out.prompt_token_states().shape, torch.Size([2, 3, minilm.embed_dim])
    )


def test_encoder_stays_in_eval_mode(minilm):
    minilm.train()
    assert not minilm.training and not any(m.training for m in minilm.modules())


def test_vit_local_checkpoint_loads_and_mismatch_is_an_error(tmp_path, tiny_vit):
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    good = tmp_path / "vit.pth"
    torch.save(tiny_vit.model.state_dict(), good)
    loaded = vit_tiny_random(
        TinyViTOptions(depth=3, embed_dim=32, num_heads=4, checkpoint=str(good))
    )
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x).pooled, tiny_vit(x).pooled)

    state = dict(tiny_vit.model.state_dict())
    state.pop("blocks.0.attn.qkv.weight")
    state["not.a.key"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(UsageError, match="does not match"):
        vit_tiny_random(TinyViTOptions(depth=3, embed_dim=32, num_heads=4, checkpoint=str(bad)))
    with pytest.raises(UsageError, match="does not exist"):
        vit_tiny_random(TinyViTOptions(checkpoint=str(tmp_path / "missing.pth")))

"""Readouts: the last block computed only for the rows the output needs, same results."""

from __future__ import annotations

import pytest
import torch
from test_encoders import _text_batch

from clbench.encoders import Prompt, ResidualGate
from clbench.encoders.deltas import LayerDelta, LowRankTerm
from clbench.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(name, encoder):
    if name == "tiny_vit":
        torch.manual_seed(1)
        return torch.randn(3, 3, 32, 32)
    return _text_batch(encoder)[0]


def _prompts(encoder, batch):
    """Every kind of prompt the encoder takes, on the last layer too (its rows are cut)."""
    torch.manual_seed(2)
    d, last = encoder.embed_dim, encoder.num_layers - 1
    rank = 2

    def term(d_out):
        return LowRankTerm(down=torch.randn(rank, d) * 0.1, up=torch.randn(d_out, rank) * 0.1)

    return {
        "none": None,
        "tokens": Prompt(tokens=torch.randn(batch, 3, d, requires_grad=True)),
        "prefix": Prompt(prefixes={last: torch.randn(batch, 2, 4, d, requires_grad=True)}),
        "gated prefix": Prompt(
            prefixes={0: torch.randn(1, 2, 4, d), last: torch.randn(1, 2, 4, d)},
            gates={last: ResidualGate("sigmoid", alpha=0.5)},
        ),
        "kv tokens": Prompt(kv_tokens={last: torch.randn(1, 2, d)}),
        "deltas": Prompt(
            tokens=torch.randn(1, 2, d),
            deltas={last: LayerDelta(terms={"q": [term(d)], "o": [term(d)]})},
        ),
    }


@pytest.mark.parametrize("encoder_name", ["tiny_vit", "minilm"])
def test_pruned_readouts_equal_the_full_pass(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = _inputs(encoder_name, encoder)
    for kind, prompt in _prompts(encoder, len(x)).items():
        full = encoder(x, prompt)
        assert full.readout == "tokens"
        pooled = encoder(x, prompt, readout="pooled")
        with_prompt = encoder(x, prompt, readout="prompt")
        assert pooled.readout == "pooled" and with_prompt.readout == "prompt", kind
        for cut in (pooled, with_prompt):
            torch.testing.assert_close(cut.pooled, full.pooled, atol=2e-5, rtol=2e-5, msg=kind)
        torch.testing.assert_close(
            with_prompt.prompt_token_states(), full.prompt_token_states(), atol=2e-5, rtol=2e-5
        )


@pytest.mark.parametrize("encoder_name", ["tiny_vit", "minilm"])
def test_pruned_readout_gradients_equal_the_full_pass(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = _inputs(encoder_name, encoder)
    torch.manual_seed(3)
    tokens = torch.randn(1, 3, encoder.embed_dim, requires_grad=True)
    gradients = []
    for readout in ("tokens", "prompt"):
        out = encoder(x, Prompt(tokens=tokens), readout=readout)
        (out.pooled.square().sum() + out.prompt_token_states().mean(1).sum()).backward()
        gradients.append(tokens.grad.clone())
        tokens.grad = None
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-5, rtol=1e-4)


def _last_block_rows(encoder, x, readout):
    """How many rows the last block's MLP saw."""
    seen = []
    last = encoder.blocks[-1]
    mlp = last.mlp.fc1 if hasattr(last, "mlp") else last.intermediate.dense
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        encoder(x, Prompt(tokens=torch.zeros(1, 3, encoder.embed_dim)), readout=readout)
    finally:
        handle.remove()
    return seen[0]


def test_the_last_block_runs_only_the_kept_rows(tiny_vit, minilm):
    image = _inputs("tiny_vit", tiny_vit)
    length = 1 + 3 + (32 // tiny_vit.model.patch_embed.patch_size[0]) ** 2
    assert _last_block_rows(tiny_vit, image, "tokens") == length
    assert _last_block_rows(tiny_vit, image, "pooled") == 1  # [CLS]
    assert _last_block_rows(tiny_vit, image, "prompt") == 1 + 3
    text = _inputs("minilm", minilm)
    assert _last_block_rows(minilm, text, "pooled") == 1 + 2  # [CLS], the two markers
    assert _last_block_rows(minilm, text, "prompt") == 1 + 3 + 2


def test_a_pool_over_every_token_keeps_every_row(tiny_vit):
    model = tiny_vit.model
    model.global_pool = "avg"
    try:
        x = _inputs("tiny_vit", tiny_vit)
        out = tiny_vit(x, readout="pooled")
        assert out.readout == "tokens"
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(out.pooled, reference, atol=1e-5, rtol=1e-5)
    finally:
        model.global_pool = "token"


def test_a_tap_on_the_last_block_sees_every_row(tiny_vit):
    seen = []
    last = tiny_vit.num_layers - 1
    delta = LayerDelta(taps={"fc1": lambda inputs: seen.append(inputs.shape[1])})
    x = _inputs("tiny_vit", tiny_vit)
    out = tiny_vit(x, Prompt(deltas={last: delta}), readout="pooled")
    patches = (32 // tiny_vit.model.patch_embed.patch_size[0]) ** 2
    assert out.readout == "tokens" and seen == [1 + patches]


def test_readout_errors_are_clear(tiny_vit):
    x = _inputs("tiny_vit", tiny_vit)
    with pytest.raises(UsageError, match="valid: tokens, pooled, prompt"):
        tiny_vit(x, readout="cls")
    out = tiny_vit(x, Prompt(tokens=torch.zeros(1, 2, tiny_vit.embed_dim)), readout="pooled")
    with pytest.raises(UsageError, match="readout='prompt'"):
        out.prompt_token_states()

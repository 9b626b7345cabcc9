"""Low-rank deltas in the one attention path, and the LoRA-family parameterisations.

Tolerances: "bit for bit" is ``torch.equal``; "fp32" is ``assert_close`` at atol = rtol =
1e-5 (a merged weight rounds once where the factorised path rounds twice).
"""

from __future__ import annotations

import pytest
import torch
from encoder_inputs import batch_for, merged_copy

from clbench.adapters import (
    KaSA,
    LayerAdapters,
    LoRA,
    MergedOffsets,
    RepLoRA,
    loraplus_parameter_groups,
    milora,
    pissa,
    stack_tasks,
)
from clbench.encoders import Prompt
from clbench.encoders.deltas import TARGETS, LayerDelta, LowRankTerm, merge_deltas
from clbench.prompts import merge_prompts

ENCODERS = ["tiny_vit", "minilm"]


pytestmark = pytest.mark.usefixtures("one_thread")


FP32 = {"atol": 1e-5, "rtol": 1e-5}


def random_lora(weight, layer, target, rank=3, alpha=6.0, seed=0):
    """A LoRA whose B is random (not zero), so the delta really changes the block."""
    generator = torch.Generator().manual_seed(1000 * seed + 10 * layer + TARGETS.index(target))
    d_out, d_in = weight.shape
    up = 0.2 * torch.randn(d_out, rank, generator=generator)
    down = torch.randn(rank, d_in, generator=generator) / d_in**0.5
    return LoRA(d_in, d_out, rank, target=target, alpha=alpha, down=down, up=up)


def layers_of(encoder):
    return [0, encoder.num_layers - 1]


# -- the encoder path ---------------------------------------------------------------------


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_zero_initialised_delta_equals_no_delta_bit_for_bit(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    plain = encoder(x)
    adapters = LayerAdapters.build(
        encoder,
        range(encoder.num_layers),
        TARGETS,
        lambda w, layer, target: LoRA(w.shape[1], w.shape[0], 4, target=target, alpha=8.0),
    )
    adapted = encoder(x, adapters.prompt())
    assert torch.equal(adapted.pooled, plain.pooled)
    assert torch.equal(adapted.tokens, plain.tokens)
    replora = LayerAdapters()
    for layer in range(encoder.num_layers):
        width = encoder.embed_dim
        replora.add(layer, RepLoRA(width, width, 4, targets=("q", "v", "o"), hidden=8))
    assert torch.equal(encoder(x, replora.prompt()).pooled, plain.pooled)


@pytest.mark.parametrize("targets", [TARGETS, ("k", "v")], ids=["all", "kv"])
@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_delta_equals_forward_of_merged_weight(encoder_name, targets, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    adapters = LayerAdapters.build(encoder, layers_of(encoder), targets, random_lora)
    updates = {}
    for layer in layers_of(encoder):
        for target in targets:
            lora = adapters[layer, target]
            updates[layer, target] = lora.scale * lora.up.detach() @ lora.down.detach()
    merged = merged_copy(encoder, updates)
    with torch.no_grad():
        adapted = encoder(x, adapters.prompt())
        reference = merged(x)
    torch.testing.assert_close(adapted.pooled, reference.pooled, **FP32)
    assert not torch.allclose(adapted.pooled, encoder(x).pooled, atol=1e-3)

    # the same updates as a frozen accumulated offset (dense, applied functionally)
    offsets = MergedOffsets(encoder, layers_of(encoder), targets)
    offsets.absorb(adapters)
    with torch.no_grad():
        dense = encoder(x, Prompt(deltas=offsets.deltas()))
    torch.testing.assert_close(dense.pooled, reference.pooled, **FP32)


def test_middle_matrix_and_magnitude_equal_the_merged_weight(tiny_vit):
    # NuSA's trained r x r middle (not symmetric) and SD-LoRA's learned magnitude
    x = batch_for(tiny_vit)
    generator = torch.Generator().manual_seed(7)

    def lora(weight, layer, target):
        d_out, d_in = weight.shape
        factors = {
            "down": torch.randn(3, d_in, generator=generator) / d_in**0.5,
            "up": torch.randn(d_out, 3, generator=generator) / 3**0.5,
            "middle": torch.randn(3, 3, generator=generator),
        }
        return LoRA(d_in, d_out, 3, target=target, magnitude=0.7, **factors)

    adapters = LayerAdapters.build(tiny_vit, [1], ("v", "fc2"), lora)
    updates = {}
    for target in ("v", "fc2"):
        a = adapters[1, target]
        updates[1, target] = 0.7 * a.scale * (a.up @ a.middle @ a.down).detach()
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_vit(x, adapters.prompt()).pooled,
            merged_copy(tiny_vit, updates)(x).pooled,
            **FP32,
        )


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_a_value_delta_changes_only_the_values(encoder_name, request, monkeypatch):
    # timm fuses q, k, v into one Linear: a delta on v must touch only the last third
    encoder = request.getfixturevalue(encoder_name)
    module = __import__(type(encoder).__module__, fromlist=["prompted_attention"])
    seen = []
    original = module.prompted_attention

    def recording(q, k, v, **kwargs):
        seen.append((q, k, v))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(module, "prompted_attention", recording)
    x = batch_for(encoder)
    inputs = []
    only_v = LayerAdapters.build(encoder, [0], ["v"], random_lora)
    tap = {0: LayerDelta(taps={"v": inputs.append})}
    with torch.no_grad():
        encoder(x)
        encoder(x, Prompt(deltas=merge_deltas(only_v.deltas(), tap)))
    (q0, k0, v0), (q1, k1, v1) = seen[0], seen[encoder.num_layers]
    assert torch.equal(q0, q1) and torch.equal(k0, k1)
    lora = only_v[0, "v"]
    added = lora.scale * inputs[0] @ lora.down.T @ lora.up.T  # [B, N, D]
    batch, heads, length, head_dim = v0.shape
    added = added.view(batch, length, heads, head_dim).transpose(1, 2)
    torch.testing.assert_close(v1, v0 + added, **FP32)


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_per_sample_deltas_in_one_batch_equal_separate_batches(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    tasks = [
        LayerAdapters.build(
            encoder,
            layers_of(encoder),
            ("q", "v", "fc1"),
            lambda w, layer, target, seed=seed: random_lora(w, layer, target, seed=seed),
        )
        for seed in range(3)
    ]
    index = torch.tensor([2, 0, 2])
    # shared key/value tokens meet each sample's own k / v weights
    tokens = {layer: torch.randn(1, 2, encoder.embed_dim) for layer in layers_of(encoder)}
    with torch.no_grad():
        mixed = encoder(x, Prompt(deltas=stack_tasks(tasks, index), kv_tokens=tokens)).pooled
        for task in (0, 2):
            rows = index == task
            alone = encoder(x[rows], Prompt(deltas=tasks[task].deltas(), kv_tokens=tokens))
            torch.testing.assert_close(mixed[rows], alone.pooled, **FP32)

    # the other per-sample form: factors with a batch dimension
    lora = [task[0, "q"] for task in tasks]
    down = torch.stack([lora[t].down for t in index.tolist()]).detach()
    up = torch.stack([lora[t].up for t in index.tolist()]).detach()
    batched = {0: LayerDelta({"q": [LowRankTerm(down, up, lora[0].scale)]})}
    indexed = {0: LayerDelta({"q": [LowRankTerm(*_stacked(lora), lora[0].scale, index=index)]})}
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(x, Prompt(deltas=batched)).pooled,
            encoder(x, Prompt(deltas=indexed)).pooled,
            **FP32,
        )


def _stacked(loras):
    return (
        torch.stack([lora.down for lora in loras]).detach(),
        torch.stack([lora.up for lora in loras]).detach(),
    )


def test_deltas_merge_with_prefixes_through_merge_prompts(tiny_vit):
    x = batch_for(tiny_vit)
    adapters = LayerAdapters.build(tiny_vit, [1], ["k", "o"], random_lora)
    prefix = Prompt(prefixes={1: torch.randn(1, 2, 3, tiny_vit.embed_dim)})
    merged = merge_prompts(prefix, adapters.prompt())
    assert merged.deltas.keys() == {1} and merged.prefixes.keys() == {1}
    both = Prompt(prefixes=prefix.prefixes, deltas=adapters.deltas())
    with torch.no_grad():
        assert torch.equal(tiny_vit(x, merged).pooled, tiny_vit(x, both).pooled)
        assert not torch.allclose(tiny_vit(x, merged).pooled, tiny_vit(x, prefix).pooled)


def test_bad_targets_and_layers_are_errors(tiny_vit):
    with pytest.raises(ValueError, match="valid: q, k, v, o, fc1, fc2"):
        LayerDelta({"qkv": []})
    with pytest.raises(ValueError, match="valid: q, k, v"):
        LoRA(4, 4, 2, target="query")
    beyond = Prompt(deltas={tiny_vit.num_layers: LayerDelta()})
    with pytest.raises(ValueError, match="this encoder has layers 0..2"):
        tiny_vit(batch_for(tiny_vit), beyond)
    container = LayerAdapters.build(tiny_vit, [0], ["q"], random_lora)
    with pytest.raises(ValueError, match="already has an adapter"):
        container.add(0, LoRA(32, 32, 2, target="q"))


# -- the frozen encoder stays frozen ------------------------------------------------------


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_frozen_encoder_is_bit_identical_after_a_training_step(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    before = {name: p.detach().clone() for name, p in encoder.state_dict().items()}
    query_before = encoder.query(x)
    layer = encoder.num_layers - 1
    lora = LayerAdapters.build(encoder, [0, layer], ("q", "v"), random_lora)
    svd = LayerAdapters.build(encoder, [layer], ["o"], lambda w, _, t: pissa(w, 2, target=t))
    kasa = LayerAdapters.build(encoder, [0], ["fc1"], lambda w, _, t: KaSA(w, 2, target=t))
    offsets = MergedOffsets(encoder, [0], ["k"])
    offsets.absorb(LayerAdapters.build(encoder, [0], ["k"], random_lora))
    modules = torch.nn.ModuleList([lora, svd, kasa])
    optimizer = torch.optim.SGD(modules.parameters(), lr=0.1)
    trained_before = [p.detach().clone() for p in modules.parameters()]

    deltas = merge_deltas(lora.deltas(), svd.deltas(), kasa.deltas(), offsets.deltas())
    out = encoder(x, Prompt(deltas=deltas))
    loss = out.pooled.square().mean() + kasa.aux_loss()
    loss.backward()
    optimizer.step()

    after = encoder.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert torch.equal(encoder.query(x), query_before)
    changed = [not torch.equal(a, b) for a, b in zip(trained_before, modules.parameters())]
    assert all(changed)


# -- parameterisations --------------------------------------------------------------------


@pytest.mark.parametrize("encoder_name", ENCODERS)
def test_pissa_and_milora_start_at_the_frozen_function_bit_for_bit(encoder_name, request):
    encoder = request.getfixturevalue(encoder_name)
    x = batch_for(encoder)
    plain = encoder(x).pooled
    for make in (
        lambda w, layer, target: pissa(w, 4, target=target, alpha=8.0),
        lambda w, layer, target: pissa(w, 4, target=target, niter=2),
        lambda w, layer, target: milora(w, 4, target=target, alpha=4.0),
    ):
        # every target; on MiniLM two blocks (a full SVD per matrix is the slow part)
        adapters = LayerAdapters.build(encoder, layers_of(encoder), TARGETS, make)
        assert torch.equal(encoder(x, adapters.prompt()).pooled, plain)


def test_pissa_and_milora_factors_are_the_principal_and_minor_components(tiny_vit):
    weight = tiny_vit.projection_weight(1, "k")
    singular = torch.linalg.svdvals(weight)
    for make, kept in ((pissa, singular[4:]), (milora, singular[:-4])):
        lora = make(weight, 4, target="k", alpha=2.0)
        update = lora.scale * lora.up.detach() @ lora.down.detach()
        residual = torch.linalg.svdvals(weight - update)
        # W - s B A has exactly the other singular values (and r zeros)
        torch.testing.assert_close(residual[: len(kept)], kept, atol=1e-5, rtol=1e-4)
        assert residual[len(kept) :].abs().max() < 1e-4


def test_kasa_removes_the_minor_components_and_regularises(tiny_vit):
    weight = tiny_vit.projection_weight(0, "v")
    kasa = KaSA(weight, 3, target="v", beta=0.5, gamma=0.25)
    offset = kasa.offset_term()
    assert offset is not None
    truncated = weight + offset.weight()
    singular, left = torch.linalg.svdvals(weight), torch.linalg.svdvals(truncated)
    torch.testing.assert_close(left[:-3], singular[:-3], atol=1e-5, rtol=1e-4)
    assert left[-3:].abs().max() < 1e-5
    eye = torch.eye(3)
    expected = 0.5 * kasa.singular.square().sum() + 0.25 * (
        torch.linalg.matrix_norm(kasa.up.T @ kasa.up - eye)
        + torch.linalg.matrix_norm(kasa.down @ kasa.down.T - eye)
    )
    torch.testing.assert_close(kasa.aux_loss(), expected)
    # the trained part is s B diag(sigma) A, zero at initialisation (B = 0)
    assert kasa.terms()["v"][0].middle is not None
    assert torch.equal(kasa.delta_weight()["v"], offset.weight())


def test_replora_freeze_keeps_the_function_and_round_trips(tiny_vit):
    x = batch_for(tiny_vit)
    width = tiny_vit.embed_dim
    torch.manual_seed(3)
    container = LayerAdapters()
    container.add(0, RepLoRA(width, width, 2, targets=("q", "v"), hidden=8))
    optimizer = torch.optim.SGD(container.parameters(), lr=1.0)
    tiny_vit(x, container.prompt()).pooled.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        trained = tiny_vit(x, container.prompt()).pooled
        assert not torch.allclose(trained, tiny_vit(x).pooled)
        container.freeze()
        assert not any(p.requires_grad for p in container.parameters())
        torch.testing.assert_close(tiny_vit(x, container.prompt()).pooled, trained, **FP32)

    fresh = LayerAdapters()
    fresh.add(0, RepLoRA(width, width, 2, targets=("q", "v"), hidden=8))
    fresh.load_state_dict(container.state_dict())
    assert fresh[0, "q"].frozen_now
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit(x, fresh.prompt()).pooled, trained, **FP32)


def test_merged_offsets_round_trip_and_start_empty(tiny_vit):
    offsets = MergedOffsets(tiny_vit, [0, 2], ["q", "fc2"])
    assert offsets.deltas() == {}
    adapters = LayerAdapters.build(tiny_vit, [2], ["fc2"], random_lora)
    offsets.absorb(adapters)
    offsets.absorb(adapters, weight=0.5)
    fc2 = adapters[2, "fc2"]
    expected = 1.5 * fc2.scale * fc2.up.detach() @ fc2.down.detach()
    torch.testing.assert_close(offsets.offset(2, "fc2"), expected)
    assert torch.equal(offsets.offset(0, "q"), torch.zeros(32, 32))
    fresh = MergedOffsets(tiny_vit, [0, 2], ["q", "fc2"])
    fresh.load_state_dict(offsets.state_dict())
    assert fresh.merged_tasks == 2 and set(fresh.deltas()) == {0, 2}
    with pytest.raises(ValueError, match="no merged offset"):
        MergedOffsets(tiny_vit, [0], ["q"]).absorb(adapters)


def test_lora_scaling_dropout_and_frozen_factors():
    lora = LoRA(8, 6, 4, target="q", alpha=8.0)
    assert lora.scale == 2.0 and LoRA(8, 6, 4, target="q", rslora=True, alpha=8.0).scale == 4.0
    designed = torch.randn(4, 8)
    inflora = LoRA(8, 6, 4, target="k", down=designed, train_down=False)
    assert not inflora.down.requires_grad and inflora.up.requires_grad
    assert torch.equal(inflora.down, designed)
    dropped = LoRA(8, 6, 4, target="q", dropout=0.5)
    assert dropped.terms()["q"][0].dropout == 0.5
    assert dropped.eval().terms()["q"][0].dropout == 0.0
    with pytest.raises(ValueError, match=r"A \[4, 8\] and B \[6, 4\]"):
        LoRA(8, 6, 4, target="q", down=torch.zeros(3, 8))


def test_loraplus_puts_b_factors_in_the_fast_group():
    lora = LoRA(8, 6, 2, target="q")
    head = torch.nn.Linear(6, 3)
    model = torch.nn.ModuleDict({"lora": lora, "head": head})
    base, fast = loraplus_parameter_groups(model, lr=0.01, ratio=16.0)
    assert fast["lr"] == pytest.approx(0.16) and base["lr"] == 0.01
    assert {id(p) for p in fast["params"]} == {id(lora.up)}
    assert {id(p) for p in base["params"]} == {id(lora.down), id(head.weight), id(head.bias)}
    _, official = loraplus_parameter_groups(model, 0.01, 16.0, one_dimensional="up")
    assert {id(p) for p in official["params"]} == {id(lora.up), id(head.bias)}
    optimizer = torch.optim.Adam([base, fast], lr=1.0)
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, pytest.approx(0.16)]


def test_bf16_autocast_delta_matches_fp32(tiny_vit):
    x = batch_for(tiny_vit)
    adapters = LayerAdapters.build(tiny_vit, [0, 1, 2], ("q", "v", "fc1"), random_lora)
    with torch.no_grad():
        reference = tiny_vit(x, adapters.prompt()).pooled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_vit(x, adapters.prompt()).pooled
    assert (low.float() - reference).abs().max() <= 0.05 * reference.abs().max()


# -- peft as an outside oracle for plain LoRA ---------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "rslora", "pissa"])
def test_lora_matches_peft_on_a_linear(variant):
    # peft as an outside oracle (never on the run path): same factors -> same outputs
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10).requires_grad_(False)
    model = torch.nn.Sequential()
    model.add_module("layer", torch.nn.Linear(12, 10))
    model.layer.load_state_dict(linear.state_dict())
    init = "pissa" if variant == "pissa" else False  # False: a random B, not zero
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["layer"],
        init_lora_weights=init,
        use_rslora=variant == "rslora",
    )
    model = peft.inject_adapter_in_model(config, model)
    down = model.layer.lora_A["default"].weight.detach()
    up = model.layer.lora_B["default"].weight.detach()
    if variant == "pissa":
        ours = pissa(linear.weight, 4, target="q", alpha=8.0)
        torch.testing.assert_close(ours.down.detach(), down, **FP32)
        torch.testing.assert_close(ours.up.detach(), up, **FP32)
        # both then train B away from its start: the outputs must keep agreeing
        with torch.no_grad():
            bump = 0.1 * torch.randn(10, 4)
            ours.up += bump
            model.layer.lora_B["default"].weight += bump
    else:
        ours = LoRA(12, 10, 4, target="q", alpha=8.0, rslora=variant == "rslora", down=down, up=up)
    assert ours.scale == pytest.approx(model.layer.scaling["default"])
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        expected = model(x)
        got = LayerDelta(ours.terms()).project(linear, x, "q")
    torch.testing.assert_close(got, expected, **FP32)

"""VAPT adaptive prompts (arXiv 2501.18936) as a per-task prompt module.

Parameter counts as the paper's ViT-B/16 setting gives them (N_p = 10: ~56k against
VPT-deep's 92k), output shapes, zero adaptive prompts at initialisation, per-sample
routing equal to one task at a time, gradients, the HiDe lifecycle, and the option on
hide-prompt / norga (vision only: a clear error on a text encoder).
"""

from __future__ import annotations

import pytest
import torch

from clbench.errors import UsageError
from clbench.prompts.vapt import AdaptivePrompts, VAPTSlot, patch_grid
from clbench.registry import STRATEGIES
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parameter_counts_of_the_papers_vit_b16_setting():
    # ViT-B/16 at 224 px: D = 768, a 14 x 14 grid, 12 prompted layers, N_p = 10, k = 2, r = 8
    slot = VAPTSlot(12, 10, 768, (14, 14), kernel=2, hidden=8, patch_area=16 * 16)
    counts = {name: p.numel() for name, p in slot.named_parameters()}
    assert counts["static"] == 10 * 768  # 7.7k static prompt at layer 1
    assert counts["norm_weight"] + counts["norm_bias"] == 11 * 2 * 768  # LN 1.5k per layer
    assert counts["kernel"] == 11 * 4  # one 2x2 kernel per layer, shared by the channels
    assert counts["down_weight"] + counts["down_bias"] == 11 * (13 * 13 * 10 + 10)  # 1.7k
    assert counts["up"] + counts["out"] == 2 * 768 * 8  # the shared F: 12.3k, no biases
    total = sum(counts.values())
    assert total == 55_608  # ~56k
    assert total < 12 * 10 * 768  # VPT-deep with the same N_p: 92k


def small_module(tiny_vit, num_tasks=2, **options):
    grid, area = patch_grid(tiny_vit)
    return AdaptivePrompts(
        num_tasks, [0, 1, 2], tiny_vit.embed_dim, grid, tokens=3, patch_area=area, **options
    )


def images(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=generator)


def perturb(module, seed=0):
    """Random non-zero generator weights (D_k starts at zero) for every slot."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_shapes_and_zero_adaptive_prompts_at_initialisation(tiny_vit):
    module = small_module(tiny_vit)
    prompt = module(task=0).prompt
    assert set(prompt.kv_tokens) == {0} and prompt.kv_tokens[0].shape == (1, 3, 32)
    assert set(prompt.generators) == {1, 2}
    hidden = torch.randn(4, 1 + 16, 32)  # [CLS] + the 4 x 4 patch grid
    generated = prompt.generators[1](hidden, None)
    assert generated.kv_tokens is not None and generated.kv_tokens.shape == (4, 3, 32)
    assert torch.equal(generated.kv_tokens, torch.zeros(4, 3, 32))  # D_k is zero at init
    output = tiny_vit(images(), prompt)
    assert output.pooled.shape == (4, tiny_vit.feature_dim)
    assert output.tokens.shape[1] == 1 + 16  # the sequence is not lengthened


def test_per_sample_tasks_equal_one_task_at_a_time_and_gradients_reach_the_slot(tiny_vit):
    module = small_module(tiny_vit, num_tasks=3)
    perturb(module)
    x = images(batch=3)
    tasks = torch.tensor([2, 0, 2])
    with torch.no_grad():
        together = tiny_vit(x, module(task=tasks).prompt).pooled
        alone = torch.cat(
            [tiny_vit(x[i : i + 1], module(task=int(t)).prompt).pooled for i, t in enumerate(tasks)]
        )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # the generated prompts depend on the input: two inputs give two prompt sets
    hidden = torch.randn(2, 17, 32)
    generated = module(task=0).prompt.generators[2](hidden, None).kv_tokens
    assert generated is not None and not torch.allclose(generated[0], generated[1])
    module.begin_task(1)
    tiny_vit(x, module(task=1, train=True).prompt).pooled.square().sum().backward()
    for name, parameter in module.slots[1].named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in module.slots[0].parameters())


def test_hide_lifecycle_copies_the_previous_slot_and_freezes_with_momentum(tiny_vit):
    module = small_module(tiny_vit, num_tasks=2, momentum=0.5)
    perturb(module)
    module.begin_task(1)
    for new, old in zip(module.slots[1].parameters(), module.slots[0].parameters()):
        assert torch.equal(new, old)
    assert all(p.requires_grad for p in module.slots[1].parameters())
    assert not any(p.requires_grad for p in module.slots[0].parameters())
    with torch.no_grad():
        module.slots[1].static.add_(2.0)
    expected = 0.5 * module.slots[1].static.detach() + 0.5 * module.slots[0].static.detach()
    module.end_task(1)
    torch.testing.assert_close(module.slots[1].static.detach(), expected)
    assert not any(p.requires_grad for p in module.slots[1].parameters())
    assert len(module.prompts) == 2 and module.prompts[0].ndim == 1


SMALL = dict(
    epochs=1, batch_size=64, eval_batch_size=256, num_tasks=5, prompt_layers=[0, 1, 2],
    tii_epochs=1, tii_align_epochs=1, tap_epochs=1, samples_per_class=16,
    lr_schedule="constant", prompt="vapt", vapt_tokens=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


@pytest.mark.parametrize("name", ["hide-prompt", "norga"])
def test_hide_prompt_with_vapt_trains_and_round_trips(name, tiny_vit, digits):
    strategy_class = STRATEGIES.get(name)
    torch.manual_seed(0)
    strategy = strategy_class(
        encoder=tiny_vit, num_classes=digits.num_classes, config=strategy_class.Config(**SMALL)
    )
    assert isinstance(strategy.model.prompts, AdaptivePrompts)
    assert (len(strategy.model.prompts.gates) > 0) == (name == "norga")
    strategy.train(digits.benchmark.train_stream[0])
    first = [p.detach().clone() for p in strategy.model.prompts.slots[0].parameters()]
    assert strategy.model.prompts.slots[0].down_weight.abs().sum() > 0, (
        "the generator did not train"
    )
    strategy.train(digits.benchmark.train_stream[1])
    for before, after in zip(first, strategy.model.prompts.slots[0].parameters()):
        assert torch.equal(before, after), "task 0's prompts changed in task 1"
    restored = strategy_class(
        encoder=tiny_vit, num_classes=digits.num_classes, config=strategy_class.Config(**SMALL)
    )
    restored.load_state_dict(strategy.state_dict())
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), strategy.classify(x), rtol=0, atol=0)


def test_vapt_on_text_and_with_reparameterised_prefixes_are_clear_errors(minilm, tiny_vit):
    hide = STRATEGIES.get("hide-prompt")
    with pytest.raises(UsageError, match="needs a vision encoder"):
        hide(encoder=minilm, num_classes=4, config=hide.Config(prompt="vapt", num_tasks=2))
    with pytest.raises(UsageError, match="prompt=vapt has none"):
        hide(
            encoder=tiny_vit,
            num_classes=4,
            config=hide.Config(
                prompt="vapt", num_tasks=2, prompt_layers=[0, 1], prefix_param="mlp"
            ),
        )
    with pytest.raises(UsageError, match="vapt_kernel"):
        small_module(tiny_vit, kernel=5)

"""Reparameterised prefixes (arXiv 2410.02200): generated while a task trains, plain after.

Shapes and the official key / value interleaving, the free prefixes' scale at
initialisation, gradients into the generator only, the stored prefix equal to the
generator's output and untouched by later tasks, checkpoints, and the option on every
prefix strategy (free: no generator at all, so default runs are unchanged).
"""

from __future__ import annotations

import pytest
import torch

from clbench.errors import UsageError
from clbench.prompts import TaskPrefixPrompts, TaskPromptPools
from clbench.prompts.pools import VotingKeyedPrefixPool
from clbench.prompts.prefixes import SharedPrefix
from clbench.prompts.reparam import FREE_PREFIX_STD, PrefixGenerator, PrefixReparam
from clbench.registry import STRATEGIES
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

MLP = PrefixReparam("mlp", hidden=6)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_shapes_parameter_count_and_interleaved_keys_and_values(kind):
    layers, rows, dim, hidden = 3, 5, 16, 7
    generator = PrefixGenerator(layers, rows, dim, kind=kind, hidden=hidden)
    prefix = generator()
    assert prefix.shape == (layers, 2, rows, dim)
    if kind == "mlp":  # Linear(D, h) -> tanh -> Linear(h, 2D)
        per_layer = dim * hidden + hidden + hidden * 2 * dim + 2 * dim
    else:  # Linear(D, 2D) -> tanh
        per_layer = dim * 2 * dim + 2 * dim
    count = sum(p.numel() for p in generator.parameters())
    assert count == layers * (rows * dim + per_layer)
    # the official code reshapes the 2D outputs to (Lp, D, 2): even -> key, odd -> value
    raw = generator._raw()
    assert torch.equal(prefix[:, 0], raw[..., 0::2])
    assert torch.equal(prefix[:, 1], raw[..., 1::2])


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_the_generated_prefix_starts_at_the_free_prefixs_scale(kind):
    torch.manual_seed(0)
    free = TaskPrefixPrompts(num_tasks=1, layers=[0, 1], length=20, embed_dim=64)
    generator = PrefixGenerator(2, 20, 64, kind=kind, hidden=48)
    generated = generator().detach()
    tolerance = 1e-4 if kind == "mlp" else 1e-3  # one exact rescale / a bisection
    assert abs(generated.std().item() - FREE_PREFIX_STD) < tolerance
    assert abs(generated.std().item() - free.prompts[0].std().item()) < 0.02
    assert abs(generated.mean().item()) < 0.05


def test_gradients_reach_the_generator_not_a_free_tensor():
    module = TaskPrefixPrompts(num_tasks=2, layers=[0, 2], length=3, embed_dim=8, reparam=MLP)
    module.begin_task(0)
    prefixes = module(task=0, train=True).prompt.prefixes
    assert set(prefixes) == {0, 2} and prefixes[0].shape == (1, 2, 3, 8)
    sum(p.square().sum() for p in prefixes.values()).backward()
    assert module.generator is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    assert all(not p.requires_grad and p.grad is None for p in module.prompts)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in module.generator.parameters()}


def train_steps(module, task, steps=3):
    """A few Adam steps on the generator's prefix of ``task`` (a stand-in for a task)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        prefix = module(torch.zeros(1, 8), task=task, train=True).prompt.prefixes[0]
        loss = (prefix - 0.3 * (task + 1)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_end_task_stores_a_plain_tensor_equal_to_the_generator_that_later_tasks_keep():
    torch.manual_seed(1)
    module = TaskPrefixPrompts(num_tasks=3, layers=[0], length=2, embed_dim=8, reparam=MLP)
    module.begin_task(0)
    train_steps(module, 0)
    module.end_task(0)
    assert module.generator is not None
    with torch.no_grad():
        expected = module.generator()
    assert torch.equal(module.prompts[0], expected)
    assert not module.prompts[0].requires_grad
    assert not any(p.requires_grad for p in module.generator.parameters())
    # after the task the plain tensor is the prompt: the generator is not read
    seeds = module.generator.seeds.detach().clone()
    with torch.no_grad():
        module.generator.seeds.add_(1.0)
    assert torch.equal(module(task=0).prompt.prefixes[0][0], module.prompts[0][0])
    with torch.no_grad():
        module.generator.seeds.copy_(seeds)
    stored = module.prompts[0].detach().clone()
    # HiDe's initialisation: task 1 starts from task 0's prefix (the same generator)
    module.begin_task(1)
    with torch.no_grad():
        start = module(task=1).prompt.prefixes[0][0]
    assert torch.equal(start, stored[0])
    train_steps(module, 1)
    module.end_task(1)
    module.begin_task(2)
    train_steps(module, 2)
    module.end_task(2)
    assert torch.equal(module.prompts[0], stored), "task 0's prefix changed in later tasks"
    assert not torch.equal(module.prompts[1], stored)
    # per-sample gathering at test time reads the stored tensors
    gathered = module(task=torch.tensor([2, 0])).prompt.prefixes[0]
    assert torch.equal(gathered[1], stored[0]) and torch.equal(gathered[0], module.prompts[2][0])


def test_momentum_applies_to_the_materialised_prefix():
    module = TaskPrefixPrompts(
        num_tasks=2, layers=[0], length=2, embed_dim=8, momentum=0.25, reparam=MLP
    )
    module.begin_task(0)
    module.end_task(0)
    module.begin_task(1)
    train_steps(module, 1)
    assert module.generator is not None
    with torch.no_grad():
        generated = module.generator()
    module.end_task(1)
    expected = 0.75 * generated + 0.25 * module.prompts[0].detach()
    torch.testing.assert_close(module.prompts[1].detach(), expected)


def test_dualprompt_pools_draw_per_task_or_inherit_with_the_shared_pool():
    torch.manual_seed(2)
    fresh = VotingKeyedPrefixPool(3, 2, 8, 8, layers=[0, 1], reparam=MLP)
    inherit = VotingKeyedPrefixPool(3, 2, 8, 8, layers=[0, 1], reparam=MLP, shared_prompt_pool=True)
    query = torch.randn(4, 8)
    for pool in (fresh, inherit):
        pool.begin_task(0)
        train_steps_pool(pool, query, 0)
        pool.end_task(0)
        pool.begin_task(1)
    with torch.no_grad():
        fresh_start = fresh(query, task=1, train=True).prompt.prefixes[0][0]
        inherited_start = inherit(query, task=1, train=True).prompt.prefixes[0][0]
    assert torch.equal(inherited_start, inherit.prompts[0][0])
    assert not torch.equal(fresh_start, fresh.prompts[0][0])
    # at test time the key match chooses among plain tensors and the generated slot
    with torch.no_grad():
        chosen = fresh(query, task=1).selected[:, 0]
        expected = torch.stack(fresh.slot_prompts())[chosen][:, 0]
        assert torch.equal(fresh(query, task=1).prompt.prefixes[0], expected)


def train_steps_pool(pool, query, task):
    params = [p for p in pool.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(2):
        selection = pool(query, task=task, train=True)
        loss = selection.prompt.prefixes[0].square().mean() + selection.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_shared_prefix_keeps_one_generator_across_tasks():
    prefix = SharedPrefix(3, 8, layers=[0], reparam=MLP)
    prefix.begin_task(0)
    assert not prefix.prompts.requires_grad
    train_steps(prefix, 0)
    prefix.end_task(0)
    assert prefix.generator is not None
    assert torch.equal(prefix.prompts, prefix.generator().detach())
    stored = prefix.prompts.detach().clone()
    prefix.begin_task(1)  # trained on, not redrawn
    assert torch.equal(prefix(torch.zeros(1, 8), train=True).prompt.prefixes[0][0], stored[0])


def test_wave_pools_generate_the_trained_pool_and_store_it():
    torch.manual_seed(3)
    pools = TaskPromptPools(
        2,
        variant="prefix",
        pool_size=4,
        prompt_length=1,
        top_k=2,
        embed_dim=8,
        key_dim=8,
        layers=(0, 1),
        reparam=MLP,
    )
    query = torch.randn(5, 8)
    pools.begin_task(0)
    assert set(map(id, pools.generator_parameters())) <= {
        id(p) for p in pools.parameters() if p.requires_grad
    }
    assert not pools.task_pools()[0].prompts.requires_grad
    selection = pools(query, task=0, train=True)
    selection.prompt.prefixes[1].sum().backward()
    assert all(p.grad is not None for p in pools.generator_parameters())
    pools.end_task(0)
    stored = pools.task_pools()[0].prompts
    assert stored.shape == (4, 2, 2, 1, 8)
    expected = pools.generated.generate(train=False).detach()
    assert torch.equal(stored, expected)
    with torch.no_grad():
        generated_path = selection.prompt.prefixes[0]
        plain_path = pools(query, task=torch.zeros(5, dtype=torch.long)).prompt.prefixes[0]
    torch.testing.assert_close(plain_path, generated_path)
    with pytest.raises(UsageError, match="prefix prompts"):
        TaskPromptPools(
            1,
            variant="soft-tokens",
            pool_size=2,
            prompt_length=1,
            top_k=1,
            embed_dim=8,
            key_dim=8,
            layers=(),
            reparam=MLP,
        )


SMALL = dict(epochs=1, batch_size=64, eval_batch_size=256, lr_schedule="constant")
HIDE = dict(
    SMALL, num_tasks=5, prompt_layers=[0, 1], prompt_length=3, tii_epochs=1,
    tii_align_epochs=1, tap_epochs=1, samples_per_class=16,
)  # fmt: skip
PER_STRATEGY = {
    "hide-prompt": HIDE,
    "norga": HIDE,
    "dualprompt": dict(
        epochs=1, batch_size=64, eval_batch_size=256, pool_size=5, g_layers=(0,), e_layers=(1, 2)
    ),
    "wave-cre": dict(
        SMALL,
        num_tasks=5,
        pool_size=4,
        top_k=2,
        head_epochs=1,
        samples_per_class=8,
        prompt_layers=[0, 1],
    ),  # fmt: skip
}


def make(name, encoder, scenario, **options):
    strategy_class = STRATEGIES.get(name)
    config = strategy_class.Config(**{**PER_STRATEGY[name], **options})
    return strategy_class(encoder=encoder, num_classes=scenario.num_classes, config=config)


# the stored (plain) prefix of task 0 and of task 1, per strategy
SLOTS = {
    "hide-prompt": ("prompts.prompts.0", "prompts.prompts.1"),
    "norga": ("prompts.prompts.0", "prompts.prompts.1"),
    "dualprompt": ("e_prompts.prompts.0", "e_prompts.prompts.1"),
    "wave-cre": ("pools.pools.0.prompts", "pools.pools.1.prompts"),
}


@pytest.mark.parametrize("name", sorted(PER_STRATEGY))
def test_every_prefix_strategy_trains_with_a_generator_and_round_trips(name, tiny_vit, digits):
    free = make(name, tiny_vit, digits)
    assert not any("generator" in key for key in free.model.state_dict()), "free has a generator"
    torch.manual_seed(0)
    strategy = make(name, tiny_vit, digits, prefix_param="mlp", reparam_hidden=8)
    first, second = SLOTS[name]
    strategy.train(digits.benchmark.train_stream[0])
    state = strategy.model.state_dict()
    assert any(".generator." in key for key in state)
    task_zero, untrained = state[first].clone(), state[second].clone()
    strategy.train(digits.benchmark.train_stream[1])
    state = strategy.model.state_dict()
    assert torch.equal(state[first], task_zero), "task 0's stored prefix changed in task 1"
    assert not torch.equal(state[second], untrained), "task 1's prefix was not stored"
    restored = make(name, tiny_vit, digits, prefix_param="mlp", reparam_hidden=8)
    restored.load_state_dict(strategy.state_dict())
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), strategy.classify(x), rtol=0, atol=0)


def test_bad_settings_are_clear_errors(tiny_vit, digits):
    with pytest.raises(UsageError, match="free, mlp, linear"):
        PrefixReparam("deep")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="coda-prompt takes prefix_param=free"):
        coda = STRATEGIES.get("coda-prompt")
        coda(
            encoder=tiny_vit,
            num_classes=digits.num_classes,
            config=coda.Config(pool_size=6, num_tasks=3, layers=(0,), prefix_param="mlp"),
        )
    with pytest.raises(UsageError, match="prompt_init=jax"):
        make("dualprompt", tiny_vit, digits, prefix_param="mlp", prompt_init="jax")

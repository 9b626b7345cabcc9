"""HiDe-Prompt and NoRGa: prompt layout, momentum, freezing, gates, statistics, checkpoints."""

from __future__ import annotations

import pytest
import torch
from small_configs import HIDE_SMALL

from clbench.consolidation import ClassStatistics
from clbench.prompts import TaskPrefixPrompts
from clbench.registry import STRATEGIES
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

SMALL = HIDE_SMALL


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


def make(name, encoder, scenario, construction_tasks=None, **options):
    strategy_class = STRATEGIES.get(name)
    config = strategy_class.Config(**{**SMALL, **options})
    return strategy_class(
        encoder=encoder,
        num_classes=scenario.num_classes,
        config=config,
        num_tasks=construction_tasks,
    )


def test_one_prefix_per_task_with_the_papers_size(tiny_vit, digits):
    strategy = make("hide-prompt", tiny_vit, digits, prompt_layers=[0, 1, 2], prompt_length=5)
    prompts = strategy.model.prompts.prompts
    assert len(prompts) == 5
    # 3 layers x (key, value) x L_p x D trainable prompt values per task
    assert all(p.numel() == 3 * 2 * 5 * tiny_vit.embed_dim for p in prompts)
    assert len(strategy.model.prompts.gates) == 0  # plain HiDe has no gate


def test_new_prompt_starts_from_the_previous_and_old_ones_freeze():
    module = TaskPrefixPrompts(num_tasks=3, layers=[0], length=2, embed_dim=4, momentum=0.1)
    module.begin_task(1)
    torch.testing.assert_close(module.prompts[1], module.prompts[0])
    assert [p.requires_grad for p in module.prompts] == [False, True, False]
    with torch.no_grad():
        module.prompts[1].add_(1.0)
    expected = 0.9 * module.prompts[1].detach() + 0.1 * module.prompts[0].detach()
    module.end_task(1)  # prompt momentum, then frozen
    torch.testing.assert_close(module.prompts[1].detach(), expected)
    assert not module.prompts[1].requires_grad
    # at test time the stored prompt, gathered per sample from the inferred tasks
    gathered = module(task=torch.tensor([1, 0, 1])).prompt.prefixes[0]
    torch.testing.assert_close(gathered[0], module.prompts[1][0])
    torch.testing.assert_close(gathered[1], module.prompts[0][0])


def test_training_changes_only_the_current_prompt_and_gates_train_in_task_one_only(
    tiny_vit, digits
):
    strategy = make("norga", tiny_vit, digits, gate_activation="tanh")
    gates = strategy.model.prompts.gates
    assert set(gates) == {"0", "1"}
    initial = {name: p.detach().clone() for name, p in gates.named_parameters()}
    encoder_before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    strategy.train(digits.benchmark.train_stream[0])
    after_first = {name: p.detach().clone() for name, p in gates.named_parameters()}
    assert any(not torch.equal(initial[n], after_first[n]) for n in initial), "gates did not train"
    prompt_zero = strategy.model.prompts.prompts[0].detach().clone()
    strategy.train(digits.benchmark.train_stream[1])
    for name, parameter in gates.named_parameters():
        assert torch.equal(parameter, after_first[name]), f"{name} changed after task 1"
        assert not parameter.requires_grad
    assert torch.equal(strategy.model.prompts.prompts[0], prompt_zero)
    assert not torch.equal(strategy.model.prompts.prompts[1], prompt_zero)
    assert not any(p.requires_grad for p in strategy.model.prompts.prompts)
    for key, value in tiny_vit.state_dict().items():
        assert torch.equal(value, encoder_before[key])
    assert strategy.consolidation.query_statistics.classes == sorted(
        digits.classes_per_experience[0] + digits.classes_per_experience[1]
    )


def test_task_identity_accuracy_is_reported_and_checkpoints_round_trip(tiny_vit, digits):
    strategy = make("hide-prompt", tiny_vit, digits)
    for index in range(2):
        strategy.train(digits.benchmark.train_stream[index])
    strategy.eval(digits.benchmark.test_stream[:3])
    summary = strategy.evaluation_summary()
    identity = summary["task_identity_accuracy"]
    assert len(identity) == 3 and identity[2] is None
    assert all(0.0 <= value <= 100.0 for value in identity[:2])
    assert strategy.evaluation_summary() == {"task_identity_accuracy": []}  # reset

    restored = make("hide-prompt", tiny_vit, digits)
    restored.load_state_dict(strategy.state_dict())
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(16)])
    strategy.model.eval()
    restored.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), strategy.classify(x))
    ours, theirs = (
        restored.consolidation.prompted_statistics,
        strategy.consolidation.prompted_statistics,
    )
    seen = theirs.classes
    assert len(seen) == 4 and ours.classes == seen
    torch.testing.assert_close(ours.class_means(seen), theirs.class_means(seen))


def test_too_many_tasks_is_a_clear_error(tiny_vit, digits):
    from clbench.errors import UsageError

    # checked once, before anything trains, as for every method with per-task slots (it
    # used to fail only at task 1, after a whole task of training)
    strategy = make("hide-prompt", tiny_vit, digits, num_tasks=1)
    with pytest.raises(UsageError, match="prompt slots"):
        strategy.train(digits.benchmark.train_stream[0])
    with pytest.raises(UsageError, match="num_tasks=5"):  # told at construction: fails there
        make("hide-prompt", tiny_vit, digits, num_tasks=1, construction_tasks=5)


@pytest.mark.parametrize("mode", ["covariance", "centroids"])
def test_gaussian_samples_reproduce_mean_and_covariance(mode):
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5])
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.2, -0.3, 0.4]])
    data = torch.randn(4000, 3) @ mixing.T + mean
    labels = torch.zeros(4000, dtype=torch.long)
    statistics = ClassStatistics(3, mode)
    statistics.update(data, labels)
    samples, sampled_labels = statistics.sample([0], 20000)
    assert sampled_labels.eq(0).all() and samples.shape == (20000, 3)
    torch.testing.assert_close(samples.mean(0), data.mean(0), atol=0.05, rtol=0)
    if mode == "covariance":
        torch.testing.assert_close(samples.T.cov(), data.T.cov(), atol=0.06, rtol=0)

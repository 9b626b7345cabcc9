"""Strategies as Avalanche strategies: train / eval, frozen encoder, checkpoints, L2P pool."""

from __future__ import annotations

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from clbench.prompts import PromptPool
from clbench.registry import STRATEGIES
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


def make(name, encoder, scenario, evaluator=None, **options):
    strategy_class = STRATEGIES.get(name)
    settings = {"epochs": 1, "batch_size": 64, "eval_batch_size": 256, **options}
    config = strategy_class.Config(**settings)
    extra = {"evaluator": evaluator} if evaluator is not None else {}
    return strategy_class(encoder=encoder, num_classes=scenario.num_classes, config=config, **extra)


def test_a_plain_avalanche_script_can_use_a_clbench_strategy(tiny_vit, digits):
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = make(
        "l2p",
        tiny_vit,
        digits,
        evaluator=evaluator,
        pool_size=4,
        top_k=2,
        prompt_length=2,
        epochs=3,
        batch_size=16,
        lr=0.01,
        head_input="pooled",
    )
    strategy.train(digits.benchmark.train_stream[0])
    results = strategy.eval(digits.benchmark.test_stream[:2])
    keys = [k for k in results if k.startswith("Top1_Acc_Exp")]
    assert len(keys) == 2
    seen = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp") and k.endswith("Exp000")]
    unseen = [
        v for k, v in results.items() if k.startswith("Top1_Acc_Exp") and k.endswith("Exp001")
    ]
    # two classes only, the tiny random ViT still separates digits better than chance
    assert seen[0] > 0.6
    assert unseen[0] == 0.0  # unseen classes are masked out of the prediction


def test_frozen_encoder_never_changes_and_only_prompts_and_head_train(tiny_vit, digits):
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    strategy = make("l2p", tiny_vit, digits, pool_size=4, top_k=2, prompt_length=2)
    pool_before = strategy.model.prompt_pool.prompts.detach().clone()
    strategy.train(digits.benchmark.train_stream[0])
    for key, value in tiny_vit.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(strategy.model.prompt_pool.prompts, pool_before)
    trained = {n for n, p in strategy.model.named_parameters() if p.requires_grad}
    assert trained == {"prompt_pool.prompts", "prompt_pool.keys", "head.weight", "head.bias"}


@pytest.mark.parametrize("name", ["l2p", "seq-ft", "joint-linear"])  # joint: test_joint_upper_bound
def test_checkpoint_round_trip(tiny_vit, digits, name):
    strategy = make(name, tiny_vit, digits)
    strategy.train(digits.benchmark.train_stream[0])
    state = strategy.state_dict()
    assert not any(key.startswith("encoder.") for key in state["model"])  # no backbone copy
    restored = make(name, tiny_vit, digits)
    restored.load_state_dict(state)
    x = torch.stack([digits.benchmark.test_stream[0].dataset[i][0] for i in range(8)])
    strategy.model.eval()
    restored.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(strategy.classify(x), restored.classify(x))
    assert restored.task_classes == strategy.task_classes
    bad = dict(state, model={**state["model"], "head.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="does not match"):
        restored.load_state_dict(bad)


def test_joint_trains_on_everything_seen(tiny_vit, digits):
    from avalanche.core import SupervisedPlugin

    trained_on = []

    class RecordSize(SupervisedPlugin):
        def before_training_epoch(self, strategy, *args, **kwargs):
            trained_on.append(len(strategy.adapted_dataset))

    strategy = make("joint-linear", tiny_vit, digits)
    strategy.plugins.append(RecordSize())
    for index in range(2):
        strategy.train(digits.benchmark.train_stream[index])
    sizes = [len(digits.benchmark.train_stream[i].dataset) for i in range(2)]
    assert trained_on == [sizes[0], sizes[0] + sizes[1]]


def test_l2p_pool_selects_top_k_by_cosine_and_pulls_keys():
    torch.manual_seed(0)
    pool = PromptPool(pool_size=6, prompt_length=3, top_k=2, embed_dim=8, key_dim=5)
    query = torch.randn(4, 5)
    selection = pool(query, train=True)
    cosine = torch.nn.functional.cosine_similarity(query[:, None], pool.keys[None], dim=-1)
    expected = cosine.topk(2, dim=1).indices
    assert torch.equal(selection.selected, expected)
    assert selection.prompt.tokens.shape == (4, 2 * 3, 8)
    torch.testing.assert_close(selection.prompt.tokens[1, 3:], pool.prompts[expected[1, 1]])
    pull = (1 - cosine.gather(1, expected)).sum(1).mean()
    torch.testing.assert_close(selection.aux_loss, pull)
    selection.aux_loss.backward()
    assert pool.keys.grad is not None


def test_l2p_batchwise_selection_gives_every_input_the_same_prompts():
    pool = PromptPool(
        pool_size=6, prompt_length=1, top_k=2, embed_dim=4, key_dim=4, batchwise_selection=True
    )
    selection = pool(torch.randn(7, 4))
    assert (selection.selected == selection.selected[0]).all()


def test_prefix_pool_layout():
    pool = PromptPool(
        pool_size=5, prompt_length=2, top_k=3, embed_dim=8, key_dim=4, mode="prefix", layers=(0, 2)
    )
    selection = pool(torch.randn(3, 4))
    assert set(selection.prompt.prefixes) == {0, 2}
    assert selection.prompt.prefixes[2].shape == (3, 2, 3 * 2, 8)
    first = selection.selected[0, 0]
    torch.testing.assert_close(selection.prompt.prefixes[2][0, :, :2], pool.prompts[first, 1])

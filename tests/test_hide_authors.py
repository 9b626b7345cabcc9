"""HiDe-Prompt / NoRGa authors'-code options: the batch-mixing prefix layout (pinned index
by index), prompt momentum while training, TII on augmented passes, the separate
sample-stage learning rates and weight decay, NoRGa's own presets and gate activations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clbench.config import authors_quirks
from clbench.consolidation import statistics as statistics_module
from clbench.consolidation.statistics import class_batches
from clbench.encoders.attention import ResidualGate
from clbench.errors import UsageError
from clbench.prompts import TaskPrefixPrompts
from clbench.prompts.prefixes import (
    authors_batch_mix,
    batch_mix_sources,
    mix_prefixes_across_batch,
)
from clbench.registry import STRATEGIES
from clbench.resolution import resolve_preset, split_preset
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

SMALL = dict(
    epochs=1,
    batch_size=32,
    eval_batch_size=32,
    num_tasks=5,
    prompt_layers=[0, 1],
    prompt_length=3,
    tii_epochs=2,
    tii_align_epochs=1,
    tap_epochs=1,
    samples_per_class=16,
    lr_schedule="constant",
)


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5, train_per_class=40), tiny_vit, seed=0)


def make(name, encoder, scenario, **options):
    strategy_class = STRATEGIES.get(name)
    config = strategy_class.Config(**{**SMALL, **options})
    return strategy_class(
        encoder=encoder, num_classes=scenario.num_classes, config=config, num_tasks=5
    )


def test_batch_mix_is_the_authors_reshape_index_by_index():
    for batch in (1, 2, 4, 5, 7):
        prefix = torch.randn(batch, 2, 3, 8)  # one layer: [B, (key, value), Lp, D]
        mixed = authors_batch_mix(prefix, batch)
        for b in range(batch):
            for half in range(2):
                block = 2 * b + half  # block of the (2, B) layout the reshape reads
                source_sample, source_half = block % batch, block // batch
                assert torch.equal(mixed[b, half], prefix[source_sample, source_half])
        sample, half = batch_mix_sources(batch)
        expected = torch.arange(2 * batch).view(batch, 2)
        assert torch.equal(sample, expected % batch) and torch.equal(half, expected // batch)


def test_in_training_the_first_half_gets_key_halves_and_the_second_value_halves():
    prompt = torch.randn(1, 2, 3, 8)  # one prompt for the whole batch
    mixed = authors_batch_mix(prompt, 6)
    for b in range(3):
        assert torch.equal(mixed[b, 0], prompt[0, 0]) and torch.equal(mixed[b, 1], prompt[0, 0])
    for b in range(3, 6):
        assert torch.equal(mixed[b, 0], prompt[0, 1]) and torch.equal(mixed[b, 1], prompt[0, 1])
    odd = authors_batch_mix(prompt, 5)  # the middle input of an odd batch keeps (K, V)
    assert torch.equal(odd[2, 0], prompt[0, 0]) and torch.equal(odd[2, 1], prompt[0, 1])


def test_mixing_acts_on_every_layer_and_keeps_the_gates():
    module = TaskPrefixPrompts(3, [0, 2], 2, 8, gate_activation="sigmoid")
    tasks = torch.tensor([2, 0, 1, 1, 0])
    prompt = module(task=tasks).prompt
    mixed = mix_prefixes_across_batch(prompt, len(tasks))
    assert mixed.gates is prompt.gates
    for index, layer in enumerate([0, 2]):
        for b in range(len(tasks)):
            for half in range(2):
                block = 2 * b + half
                task = tasks[block % len(tasks)]
                expected = module.prompts[task][index, block // len(tasks)]
                assert torch.equal(mixed.prefixes[layer][b, half], expected)


def test_tasks_of_mixed_prefixes_name_the_prompt_used():
    tasks_of = STRATEGIES.get("hide-prompt").tasks_of_mixed_prefixes
    # b0 <- samples 0, 1; b1 <- 2, 3; b2 <- 0, 1 (value halves); b3 <- 2, 3
    assert tasks_of(torch.tensor([0, 0, 1, 1])).tolist() == [0, 1, 0, 1]
    assert tasks_of(torch.tensor([0, 1, 1, 1])).tolist() == [-1, 1, -1, 1]


def test_momentum_while_training_trains_the_mix_and_stores_it():
    torch.manual_seed(0)
    for while_training in (False, True):
        module = TaskPrefixPrompts(
            3, [0], 2, 4, momentum=0.1, momentum_while_training=while_training
        )
        module.begin_task(0)
        module.end_task(0)
        module.begin_task(1)
        with torch.no_grad():
            module.prompts[1].add_(1.0)
        raw, old = module.prompts[1].detach().clone(), module.prompts[0].detach().clone()
        used = module(task=1, train=True).prompt.prefixes[0][0]
        expected = (0.9 * raw + 0.1 * old if while_training else raw)[0]  # layer 0
        torch.testing.assert_close(used, expected)
        used.sum().backward()
        assert module.prompts[0].grad is None  # the mean of the old prompts is detached
        grad = module.prompts[1].grad
        torch.testing.assert_close(grad, torch.full_like(grad, 0.9 if while_training else 1.0))
        # test-time calls read the stored prompt, untouched while the task trains
        torch.testing.assert_close(module(task=torch.tensor([1])).prompt.prefixes[0][0], raw[0])
        module.end_task(1)  # the stored prompt is the mix either way
        torch.testing.assert_close(module.prompts[1].detach(), 0.9 * raw + 0.1 * old)


@pytest.fixture(scope="module")
def mixed_hide(tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make("hide-prompt", tiny_vit, digits, prefix_layout="authors_batch_mix")
    for index in range(2):
        strategy.train(digits.benchmark.train_stream[index])
    strategy.model.eval()
    return strategy


def test_mixed_layout_features_follow_the_index_map_and_the_cache_is_bypassed(
    mixed_hide, tiny_vit, digits
):
    strategy = mixed_hide
    test = digits.benchmark.test_stream
    x = torch.cat([torch.stack([test[i].dataset[j][0] for j in range(5)]) for i in range(2)])
    tasks = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    with torch.no_grad():
        features = strategy.prompted_features(x, tasks)
        # the same prefixes built index by index, run per sample
        prompts = strategy.model.prompts.prompts
        prefixes = {}
        for index, layer in enumerate(strategy.config.prompt_layers):
            rows = []
            for b in range(len(x)):
                halves = []
                for half in range(2):
                    block = 2 * b + half
                    task = tasks[block % len(x)]
                    halves.append(prompts[task][index, block // len(x)])
                rows.append(torch.stack(halves))
            prefixes[layer] = torch.stack(rows)
        from clbench.encoders.attention import Prompt

        expected = tiny_vit(x, Prompt(prefixes=prefixes)).pooled
        torch.testing.assert_close(features, expected)
        # per-sample prompts give other features: the option is not a no-op
        per_sample = tiny_vit(x, strategy.model.prompts(task=tasks).prompt).pooled
        assert not torch.allclose(features, per_sample)
        # cached and uncached predictions agree (a feature depends on its whole batch)
        cached = strategy.classify(x)
        again = strategy.classify(x[:7])  # a sub-batch mixes differently ...
        assert len(strategy.prompted_cache) == 0  # ... and nothing was cached
        config = strategy.config
        strategy.config = dataclasses.replace(config, prompted_cache=False)
        try:
            torch.testing.assert_close(strategy.classify(x), cached)
            torch.testing.assert_close(strategy.classify(x[:7]), again)
        finally:
            strategy.config = config


def test_mixed_layout_reports_both_task_identity_accuracies(mixed_hide, digits):
    strategy = mixed_hide
    strategy.eval(digits.benchmark.test_stream[:2])
    summary = strategy.evaluation_summary()
    used, chosen = summary["task_identity_accuracy"], summary["task_identity_choice_accuracy"]
    assert len(used) == len(chosen) == 2
    assert all(0.0 <= value <= 100.0 for value in used + chosen)
    assert "task_identity_choice_accuracy" not in strategy.evaluation_summary()  # reset


def test_per_class_batches_hold_one_class_each_and_every_item_once():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0])
    batches = class_batches(labels, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(labels)))
    assert all(len(batch) <= 3 and len(set(labels[batch].tolist())) == 1 for batch in batches)


def test_mixed_layout_statistics_pass_runs_one_class_per_batch(tiny_vit, digits, monkeypatch):
    seen = []
    original = statistics_module.extract_features

    def recording(feature_fn, dataset, **kwargs):
        if kwargs.get("batches") is not None:
            seen.append([dataset.targets[i] for batch in kwargs["batches"] for i in batch[:1]])
            for batch in kwargs["batches"]:
                assert len({int(dataset.targets[i]) for i in batch}) == 1
        return original(feature_fn, dataset, **kwargs)

    monkeypatch.setattr(statistics_module, "extract_features", recording)
    monkeypatch.setattr("clbench.consolidation.gaussian.extract_features", recording)
    strategy = make("hide-prompt", tiny_vit, digits, prefix_layout="authors_batch_mix")
    strategy.train(digits.benchmark.train_stream[0])
    assert len(seen) == 1
    default = make("hide-prompt", tiny_vit, digits)
    default.train(digits.benchmark.train_stream[0])
    assert len(seen) == 1  # the default pass keeps its in-order batches


def test_sample_stages_take_their_own_lr_decay_and_sample_count(tiny_vit, digits, monkeypatch):
    def recorded(**options):
        calls = []
        strategy = make("hide-prompt", tiny_vit, digits, **options)
        monkeypatch.setattr(
            strategy.consolidation,
            "refit",
            lambda head, features, classes, **recipe: calls.append((features, recipe)),
        )
        for index in range(2):
            strategy.train(digits.benchmark.train_stream[index])
        return {features: recipe for features, recipe in calls}

    default = recorded(replay_lr=0.007)
    for stage in ("query", "prompted"):
        assert default[stage]["lr"] == 0.007 and default[stage]["weight_decay"] == 5e-4
        assert default[stage]["samples_per_class"] == default[stage]["batch_size"] == 16
    split = recorded(
        tii_align_lr=0.0025, tap_lr=0.05, replay_weight_decay=0.0, tii_align_samples_per_class=8
    )
    assert split["query"]["lr"] == 0.0025 and split["prompted"]["lr"] == 0.05
    assert split["query"]["samples_per_class"] == split["query"]["batch_size"] == 8
    assert split["prompted"]["samples_per_class"] == 16
    assert split["query"]["weight_decay"] == split["prompted"]["weight_decay"] == 0.0


def test_tii_on_augmented_reencodes_the_training_images_every_epoch(tiny_vit, digits, monkeypatch):
    import sys

    hide_module = sys.modules[STRATEGIES.get("hide-prompt").__module__]

    passes = []
    original = hide_module.extract_features

    def counting(feature_fn, dataset, **kwargs):
        passes.append(kwargs["label"])
        return original(feature_fn, dataset, **kwargs)

    monkeypatch.setattr(hide_module, "extract_features", counting)
    strategy = make("hide-prompt", tiny_vit, digits, tii_on_augmented=True, tii_grad_clip=1.0)
    strategy.train(digits.benchmark.train_stream[0])
    assert passes == ["task-identity features of augmented training images"] * 2  # tii_epochs
    passes.clear()
    make("hide-prompt", tiny_vit, digits).train(digits.benchmark.train_stream[0])
    assert passes == []
    # text has no augmentation: the one un-augmented pass serves (documented no-op)
    text = make("hide-prompt", tiny_vit, digits, tii_on_augmented=True)
    monkeypatch.setattr(tiny_vit, "modality", "text")
    text.train(digits.benchmark.train_stream[0])
    assert passes == []


def test_authors_presets_carry_each_methods_own_consolidation():
    hide, norga = STRATEGIES.get("hide-prompt"), STRATEGIES.get("norga")
    assert norga.presets is not hide.presets
    _, cifar = resolve_preset(norga, "authors", "split-cifar100", "split-cifar100")
    assert (cifar["tap_lr"], cifar["tap_epochs"]) == (0.05, 80)
    _, hide_cifar = resolve_preset(hide, "authors", "split-cifar100", "split-cifar100")
    assert (hide_cifar["tap_lr"], hide_cifar["tap_epochs"]) == (0.005, 30)
    for strategy in (hide, norga):
        _, imr = resolve_preset(strategy, "authors", "imagenet-r", "imagenet-r")
        assert (imr["tap_lr"], imr["tap_epochs"], imr["prompt_length"]) == (0.005, 30, 20)
        assert imr["scenario.normalize"] == "none"
    assert cifar["tii_lr"] == 2.5e-4 and cifar["tii_align_lr"] == 0.0025
    assert cifar["scenario.normalize"] == "cifar100"
    values, _ = split_preset(cifar, set())  # the strategy's own values
    quirks = authors_quirks(norga.Config(**values))
    assert set(quirks) == {
        "prefix_layout",
        "momentum_while_training",
        "tii_on_augmented",
        "replay_weight_decay",
    }
    assert authors_quirks(norga.Config()) == []  # the defaults are the paper's method
    with pytest.raises(UsageError, match="no authors preset"):
        resolve_preset(norga, "authors", "fewrel-offline", "fewrel")


@pytest.mark.parametrize("activation", ["softplus", "elu"])
def test_new_gate_activations(activation):
    gate = ResidualGate(activation, tau=0.5, alpha=2.0)
    logits = torch.linspace(-3, 3, 13)
    act = F.softplus if activation == "softplus" else F.elu
    torch.testing.assert_close(gate(logits), logits + 2.0 * act(0.5 * logits))
    # identity stays the authors' None: a learnable scale (1 + alpha tau) s
    identity = ResidualGate("identity", tau=0.5, alpha=2.0)
    torch.testing.assert_close(identity(logits), 2.0 * logits)


def test_vapt_refuses_the_prefix_quirks(tiny_vit, digits):
    with pytest.raises(UsageError, match="prompt=vapt"):
        make("hide-prompt", tiny_vit, digits, prompt="vapt", prefix_layout="authors_batch_mix")

"""DualPrompt and CODA-Prompt: prompt modules, parameter counts, freezing, selection, runs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from clbench.config import apply_overrides
from clbench.encoders.attention import split_prefix
from clbench.errors import UsageError
from clbench.prompts import ComponentPrompt, SharedPrefix, TaskKeyedPrefixPool, merge_prompts
from clbench.registry import STRATEGIES
from clbench.runner import split_preset
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.strategy import CLStrategy

WIDTH = 32  # the tiny ViT: embed_dim = feature_dim = 32, 4 heads


@pytest.fixture(scope="module")
def vit5():
    """The tiny test ViT with the 5 blocks both papers prompt (layers 0-4)."""
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    torch.manual_seed(0)
    return vit_tiny_random(TinyViTOptions(depth=5, embed_dim=WIDTH, num_heads=4))


@pytest.fixture(scope="module")
def digits(vit5):
    return digits_offline(DigitsOptions(num_experiences=5), vit5, seed=0)


def make(name, encoder, num_classes=10, tasks=None, **options):
    """``tasks``: the scenario's number of tasks, as the run loop passes it (None: the
    strategy learns it from the first experience's stream)."""
    strategy_class = STRATEGIES.get(name)
    settings = {"epochs": 1, "batch_size": 32, "eval_batch_size": 256, "lr": 0.01, **options}
    return strategy_class(
        encoder=encoder,
        num_classes=num_classes,
        config=strategy_class.Config(**settings),
        num_tasks=tasks,
    )


class RecordLearningRate(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []

    def before_training_epoch(self, strategy, *args, **kwargs):
        self.rates.append(strategy.optimizer.param_groups[0]["lr"])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def items_of(digits, tasks):
    datasets = [digits.benchmark.test_stream[task].dataset for task in tasks]
    x = torch.stack([d[i][0] for d in datasets for i in range(len(d))])
    y = torch.tensor([int(d[i][1]) for d in datasets for i in range(len(d))])
    return x, y


@dataclass
class TwoTaskRun:
    strategy: CLStrategy
    after_first: dict[str, torch.Tensor]  # the strategy's state after task 0
    encoder_before: dict[str, torch.Tensor]
    first_task_accuracy: float  # on task 0's test set, right after task 0
    learning_rates: list[float]  # at the start of each epoch


def train_two_tasks(name, encoder, digits, **options) -> TwoTaskRun:
    torch.manual_seed(0)
    # weight decay would move frozen prompts that merely get a zero gradient
    options = {"epochs": 3, "batch_size": 16, **options}
    strategy = make(name, encoder, weight_decay=0.01, **options)
    recorder = RecordLearningRate()
    strategy.plugins.append(recorder)
    encoder_before = snapshot(encoder)
    strategy.train(digits.benchmark.train_stream[0])
    after_first = snapshot(strategy.model)
    x, y = items_of(digits, [0])
    with torch.no_grad():
        accuracy = (strategy.classify(x).argmax(1) == y).float().mean().item()
    strategy.train(digits.benchmark.train_stream[1])
    return TwoTaskRun(strategy, after_first, encoder_before, accuracy, recorder.rates)


@pytest.fixture(scope="module")
def dualprompt_run(vit5, digits):
    return train_two_tasks("dualprompt", vit5, digits, epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def coda_run(vit5, digits):
    return train_two_tasks("coda-prompt", vit5, digits, pool_size=10, num_tasks=5)


def test_dualprompt_parameters_follow_the_paper(vit5):
    strategy = make("dualprompt", vit5)
    g_prompt, e_prompts = strategy.model.g_prompt, strategy.model.e_prompts
    # G: 2 layers x (keys, values) x L_g x D; E per task: 3 layers x 2 x L_e x D + key of D_q
    assert g_prompt.prompts.shape == (2, 2, 5, WIDTH)
    assert e_prompts.num_slots == 10
    assert all(p.shape == (3, 2, 5, WIDTH) for p in e_prompts.prompts)
    assert all(k.shape == (WIDTH,) for k in e_prompts.keys)
    longer = make("dualprompt", vit5, e_length=20)
    assert longer.model.e_prompts.prompts[0].numel() == 3 * 2 * 20 * WIDTH


def test_coda_parameters_follow_the_paper():
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    # wide enough for the paper's M = 100 mutually orthogonal keys
    encoder = vit_tiny_random(TinyViTOptions(depth=5, embed_dim=128, num_heads=4))
    # the components are split over the scenario's tasks: 10, as in the paper
    components = make("coda-prompt", encoder, tasks=10).model.components
    assert components.num_tasks == 10 and components.per_task == 10
    for task in range(10):  # per task and layer: 10 x L_p x D prompts, 10 x D_q keys / A
        assert components.prompts[task].shape == (5, 10, 8, 128)
        assert components.keys[task].shape == (5, 10, 128)
        assert components.attention[task].shape == (5, 10, 128)
    selection = components(torch.randn(3, 128), task=0)
    assert set(selection.prompt.prefixes) == {0, 1, 2, 3, 4}
    assert selection.prompt.prefixes[4].shape == (3, 2, 4, 128)  # L_p = 8: 4 keys, 4 values


def coded(*shape: int) -> torch.Tensor:
    """A tensor whose every entry names its position: 1000 * kv + 100 * row + column."""
    kv, rows, columns = torch.meshgrid(*(torch.arange(n) for n in shape[-3:]), indexing="ij")
    return (1000 * kv + 100 * rows + columns).float().expand(shape).clone()


def test_e_prompt_prefix_values_reach_the_right_position_and_head():
    pool = TaskKeyedPrefixPool(2, prompt_length=3, embed_dim=8, key_dim=4, layers=(2, 3))
    with torch.no_grad():
        pool.prompts[1].copy_(coded(2, 2, 3, 8))
    prefix = pool(torch.randn(5, 4), task=1, train=True).prompt.prefixes[3]
    keys, values = split_prefix(prefix, num_heads=2, batch_size=5)  # [B, H, Lp, dh]
    assert keys.shape == (5, 2, 3, 4)
    for head in range(2):
        for position in range(3):
            expected = 100 * position + head * 4 + torch.arange(4.0)
            torch.testing.assert_close(keys[4, head, position], expected)
            torch.testing.assert_close(values[0, head, position], expected + 1000)


def test_coda_prompt_first_half_keys_second_half_values():
    components = ComponentPrompt(1, 1, prompt_length=4, embed_dim=8, key_dim=4, layers=(0,))
    with torch.no_grad():  # alpha = cos(q * 1, 1) = 1 for q = 1
        components.keys[0].fill_(1.0)
        components.attention[0].fill_(1.0)
        components.prompts[0].copy_(100 * torch.arange(4.0)[:, None] + torch.arange(8.0))
    prefix = components(torch.ones(2, 4), task=0).prompt.prefixes[0]
    keys, values = split_prefix(prefix, num_heads=2, batch_size=2)
    assert keys.shape == (2, 2, 2, 4)
    for head in range(2):
        for position in range(2):
            expected = 100 * position + head * 4 + torch.arange(4.0)
            torch.testing.assert_close(keys[1, head, position], expected)
            torch.testing.assert_close(values[1, head, position], expected + 200)


def test_dualprompt_picks_the_e_prompt_whose_key_is_closest():
    pool = TaskKeyedPrefixPool(4, prompt_length=1, embed_dim=2, key_dim=4, layers=(0,))
    with torch.no_grad():
        for slot in range(4):
            pool.keys[slot].copy_(torch.eye(4)[slot])
            pool.prompts[slot].fill_(float(slot))
    query = torch.tensor(
        [[0.9, 0.1, 0.0, 0.0], [0.1, 1.0, 0.2, 0.0], [0.0, 0.2, 1.0, 0.0], [0.0, 0.0, 0.1, 3.0]]
    )
    selection = pool(query, task=2)  # tasks 0..2 learnt: slot 3 is no candidate
    assert selection.selected[:, 0].tolist() == [0, 1, 2, 2]
    assert selection.prompt.prefixes[0][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 2.0]
    cosine = F.cosine_similarity(query, torch.eye(4)[[0, 1, 2, 2]], dim=-1)
    torch.testing.assert_close(selection.aux_loss, (1 - cosine).mean())
    assert pool(query, task=3).selected[3, 0] == 3
    training = pool(query, task=1, train=True)  # training: the task's own prompt for all
    assert training.selected[:, 0].tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(training.aux_loss, (1 - F.normalize(query)[:, 1]).mean())


def test_g_and_e_prefixes_merge_per_layer():
    g = SharedPrefix(2, 8, layers=(0, 1))(torch.zeros(3, 4)).prompt
    e = TaskKeyedPrefixPool(2, 3, 8, 4, layers=(1, 2))(torch.randn(3, 4), task=1).prompt
    merged = merge_prompts(g, e)
    assert merged.prefixes[0].shape == (1, 2, 2, 8)
    assert merged.prefixes[1].shape == (3, 2, 5, 8)  # G then E along the length
    torch.testing.assert_close(merged.prefixes[1][2, :, 2:], e.prefixes[1][2])


def test_coda_weights_are_cosines_of_attended_query_and_exclude_future_components():
    components = ComponentPrompt(4, 2, prompt_length=2, embed_dim=3, key_dim=4, layers=(0,))
    components.begin_task(1)
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in (*components.keys, *components.attention, *components.prompts):
            tensor.normal_()
        components.attention[0][0, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
        components.keys[0][0, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    query = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 1.0]])
    alpha = components.weights(query, task=0)
    assert alpha.shape == (1, 2, 2)  # task 0 only: its two components
    # hand example: q * A = (1, 0, 3, 0), K = (1, 1, 0, 0): cos = 1 / (sqrt(10) sqrt(2))
    torch.testing.assert_close(alpha[0, 0, 0], torch.tensor(1 / (10**0.5 * 2**0.5)))
    attention = components.attention[0][0]
    expected = F.cosine_similarity(
        query[:, None] * attention[None], components.keys[0][0][None], dim=-1
    )
    torch.testing.assert_close(alpha[0], expected)
    prompt = torch.einsum("bm,mpd->bpd", expected, components.prompts[0][0])
    before = components(query, task=0).prompt.prefixes[0]
    torch.testing.assert_close(before, prompt.reshape(2, 2, 1, 3))
    with torch.no_grad():  # task 1's components carry no weight while task 0 is current
        for tensor in (components.keys[1], components.attention[1], components.prompts[1]):
            tensor.mul_(-3.0)
    torch.testing.assert_close(components(query, task=0).prompt.prefixes[0], before)
    assert components.weights(query, task=1).shape == (1, 2, 4)


def test_coda_new_components_are_orthogonal_to_all_earlier_ones():
    components = ComponentPrompt(6, 3, prompt_length=2, embed_dim=4, key_dim=8, layers=(0, 3))
    with torch.no_grad():  # training has moved task 0's components off orthonormality
        for chunk in (components.keys[0], components.attention[0], components.prompts[0]):
            chunk.add_(0.3 * torch.randn_like(chunk))
    components.begin_task(1)
    for chunks in (components.keys, components.attention, components.prompts):
        for layer in range(2):
            old, new = chunks[0][layer].flatten(1), chunks[1][layer].flatten(1)
            torch.testing.assert_close(new @ old.T, torch.zeros(2, 2), atol=1e-5, rtol=0)
            torch.testing.assert_close(new @ new.T, torch.eye(2), atol=1e-5, rtol=0)
        assert [c.requires_grad for c in chunks] == [False, True, False]
    initialised = components.keys[1].detach().clone()
    components.begin_task(1)  # a second visit keeps the trained components
    assert torch.equal(components.keys[1], initialised)
    query = torch.randn(2, 8)
    selection = components(query, task=1, train=True)
    selection.prompt.prefixes[0].sum().backward()
    assert components.keys[0].grad is None and components.keys[1].grad is not None


def test_coda_orthogonality_regulariser():
    components = ComponentPrompt(4, 2, 2, 4, 8, layers=(0,), ortho_weight=0.5)
    query = torch.randn(3, 8)
    assert components(query, task=0, train=True).aux_loss.abs() < 1e-6  # orthonormal at init
    with torch.no_grad():
        components.keys[0].mul_(2.0)
    keys = components.keys[0][0]
    expected = 0.5 * ((keys @ keys.T - torch.eye(2)) ** 2).mean()
    torch.testing.assert_close(components(query, task=0, train=True).aux_loss, expected)
    assert components(query, task=0).aux_loss == 0  # test time: no regulariser


@pytest.mark.parametrize("run", ["dualprompt_run", "coda_run"])
def test_frozen_encoder_never_changes(request, run, vit5):
    encoder_before = request.getfixturevalue(run).encoder_before
    for key, value in vit5.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key


def test_old_e_prompts_stay_as_learnt(dualprompt_run):
    strategy, after_first = dualprompt_run.strategy, dualprompt_run.after_first
    now = snapshot(strategy.model)
    for name in ("e_prompts.prompts.0", "e_prompts.keys.0"):
        assert torch.equal(now[name], after_first[name]), name
    for name in ("e_prompts.prompts.1", "e_prompts.keys.1", "g_prompt.prompts"):
        assert not torch.equal(now[name], after_first[name]), name
    assert torch.equal(now["e_prompts.prompts.2"], after_first["e_prompts.prompts.2"])
    trained = {n for n, p in strategy.model.named_parameters() if p.requires_grad}
    assert trained == {
        "g_prompt.prompts",
        "e_prompts.prompts.1",
        "e_prompts.keys.1",
        "head.weight",
        "head.bias",
    }


def test_dualprompt_reports_how_often_the_key_match_finds_the_task(dualprompt_run, digits):
    strategy = dualprompt_run.strategy
    strategy.eval(digits.benchmark.test_stream[:3])
    accuracy = strategy.evaluation_summary()["task_identity_accuracy"]
    assert len(accuracy) == 3 and accuracy[2] is None  # task 2 not learnt yet
    x, _ = items_of(digits, [1])
    with torch.no_grad():
        chosen = strategy.model.e_prompts(strategy.encoder.query(x), task=1).selected[:, 0]
    assert accuracy[1] == pytest.approx(100.0 * (chosen == 1).float().mean().item())
    assert strategy.evaluation_summary() == {"task_identity_accuracy": []}  # reset after reading


def test_old_coda_components_stay_as_learnt(coda_run):
    strategy, after_first = coda_run.strategy, coda_run.after_first
    now = snapshot(strategy.model)
    for kind in ("keys", "attention", "prompts"):
        assert torch.equal(now[f"components.{kind}.0"], after_first[f"components.{kind}.0"])
        assert not torch.equal(now[f"components.{kind}.1"], after_first[f"components.{kind}.1"])
    assert int(now["components.num_initialised"]) == 2
    # Adam with a cosine decay over each task's 3 epochs, restarted per task
    assert coda_run.learning_rates == pytest.approx([0.01, 0.0075, 0.0025] * 2)


@pytest.mark.parametrize("run", ["dualprompt_run", "coda_run"])
def test_two_tasks_predict_seen_classes_and_checkpoints_round_trip(request, run, vit5, digits):
    result = request.getfixturevalue(run)
    strategy = result.strategy
    if run == "coda_run":  # chance is 0.5 on a task of two digits
        assert result.first_task_accuracy > 0.65
    # no accuracy bar for DualPrompt here: its uniform(-1, 1) prefixes swamp the keys and
    # values of a random tiny ViT (std ~0.1), so its accuracy on it is noise (0.5-0.75
    # over seeds); the fewrel-offline run on MiniLM is its accuracy check
    x, _ = items_of(digits, [0, 1])
    with torch.no_grad():
        logits = strategy.classify(x)
    assert torch.isfinite(logits.gather(1, logits.argmax(1, keepdim=True))).all()
    predicted = set(logits.argmax(1).tolist())
    assert predicted <= set(strategy.task_classes[0] + strategy.task_classes[1])

    state = strategy.state_dict()
    assert not any(key.startswith("encoder.") for key in state["model"])
    restored = make(strategy.name, vit5, **{k: v for k, v in state["config"].items()})
    restored.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x[:64]), logits[:64])
    restored_trainable = {n for n, p in restored.model.named_parameters() if p.requires_grad}
    assert restored_trainable == {
        n for n, p in strategy.model.named_parameters() if p.requires_grad
    }


def test_more_tasks_than_slots_is_a_clear_error(vit5, digits, tiny_vit):
    too_small = make("dualprompt", vit5, pool_size=3)
    with pytest.raises(UsageError, match="pool_size=5"):
        too_small.train(digits.benchmark.train_stream[0])
    too_few = make("coda-prompt", vit5, pool_size=6, num_tasks=3)
    with pytest.raises(UsageError, match="num_tasks=3"):
        too_few.train(digits.benchmark.train_stream[0])
    with pytest.raises(UsageError, match="orthogonal"):
        make("coda-prompt", vit5, tasks=10)  # 100 components in a 32-wide query space
    with pytest.raises(UsageError, match="e_layers"):
        make("dualprompt", tiny_vit)  # 3 blocks: layers 3 and 4 do not exist


@pytest.mark.parametrize("name", ["dualprompt", "coda-prompt"])
def test_presets_are_valid_settings(name):
    strategy_class = STRATEGIES.get(name)
    for preset, values in strategy_class.presets.items():
        # the strategy's own values; a preset's scenario.* keys (the quick data subset) are
        # checked against the scenarios' options in test_quick_presets.py
        strategy_values, _ = split_preset(values, scenario_fields=set())
        apply_overrides(strategy_class.Config(), strategy_values, what=f"{name} preset {preset}")
    assert {"quick", "digits-offline", "fewrel-offline", "split-cifar100", "imagenet-r"} <= set(
        strategy_class.presets
    )

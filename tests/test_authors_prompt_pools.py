"""The authors'-code options of L2P, DualPrompt and CODA-Prompt (issue 15), each pinned to
what the official code computes on small tensors: the batch-wise vote of google-research/
l2p (per device group, ties to the lower index), its prompt mask and shared pool, flax's
initialisation, CODA-Prompt's quarter cosine and dropped last batch, and the presets."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from avalanche.core import SupervisedPlugin

from clbench.errors import UsageError
from clbench.prompts import TaskKeyedPrefixPool
from clbench.prompts.pools import PromptPool, VotingKeyedPrefixPool, batchwise_vote
from clbench.registry import STRATEGIES
from clbench.runner import RunRequest, resolve_run
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

WIDTH = 32


@pytest.fixture(scope="module")
def vit5():
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    torch.manual_seed(0)
    return vit_tiny_random(TinyViTOptions(depth=5, embed_dim=WIDTH, num_heads=4))


@pytest.fixture(scope="module")
def digits(vit5):
    return digits_offline(DigitsOptions(num_experiences=5), vit5, seed=0)


def make(name, encoder, **options):
    strategy_class = STRATEGIES.get(name)
    settings = {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "lr": 0.01, **options}
    return strategy_class(
        encoder=encoder, num_classes=10, config=strategy_class.Config(**settings), num_tasks=5
    )


def jax_vote(chosen: list[list[int]], top_k: int) -> list[int]:
    """The JAX vote of models/prompt.py re-derived: jnp.unique's sorted ids and counts, then
    a top-k by count that keeps the first of equal counts (jax.lax.top_k)."""
    counts = Counter(i for row in chosen for i in row)
    ids = sorted(counts)
    return sorted(ids, key=lambda i: -counts[i])[:top_k]  # sorted() is stable


# -- the batch-wise vote ---------------------------------------------------------------


def test_vote_is_the_groups_most_chosen_prompts_with_ties_to_the_lower_index() -> None:
    chosen = torch.tensor([[3, 1], [1, 2], [3, 0], [2, 1], [0, 4], [4, 0], [0, 1], [4, 2]])
    # group 0 counts 1:3, 2:2, 3:2, 0:1 -> 1, then 2 before 3; group 1: 0:3, 4:3 -> 0, 4
    voted = batchwise_vote(chosen, 5, group_size=4)
    assert voted.tolist() == [[1, 2]] * 4 + [[0, 4]] * 4
    # one group: 0:4, 1:4, 2:3, 4:3, 3:2 -> 0, 1
    assert batchwise_vote(chosen, 5).tolist() == [[0, 1]] * 8
    # a last group shorter than the others votes on its own inputs
    assert batchwise_vote(chosen[:6], 5, group_size=4)[4:].tolist() == [[0, 4]] * 2


def test_vote_equals_the_jax_code_on_random_choices() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        pool, top_k, group = 10, 3, 6
        chosen = torch.stack([torch.randperm(pool, generator=generator)[:top_k] for _ in range(24)])
        voted = batchwise_vote(chosen, pool, group)
        for start in range(0, 24, group):
            expected = jax_vote(chosen[start : start + group].tolist(), top_k)
            assert all(row == expected for row in voted[start : start + group].tolist())


def test_l2p_pool_uses_each_groups_majority_and_pulls_its_keys() -> None:
    pool = PromptPool(4, 1, 1, 3, 4, batchwise_selection=True, vote_group=2)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4))
    query = torch.eye(4)[[0, 0, 1, 2]]  # alone, the inputs pick prompts 0, 0, 1, 2
    for train in (True, False):
        selection = pool(query, task=0, train=train)
        assert selection.selected.tolist() == [[0], [0], [1], [1]]  # tie 1 / 2 -> 1
        assert torch.equal(selection.prompt.tokens[3], pool.prompts[1])
        # the pull term reads the keys used: input 3 has cos(e_2, e_1) = 0
        torch.testing.assert_close(selection.aux_loss, torch.tensor(0.25))


# -- L2P's prompt mask and shared pool (configs/five_datasets_l2p.py) -------------------


def test_prompt_mask_trains_task_t_on_prompts_tN_to_t1N() -> None:
    torch.manual_seed(0)
    pool = PromptPool(6, 2, 2, 4, 5, task_prompt_mask=True)
    query = torch.randn(3, 5)
    assert pool(query, task=1, train=True).selected.tolist() == [[2, 3]] * 3
    assert pool(query, task=2, train=True).selected.tolist() == [[4, 5]] * 3
    key_match = torch.topk(pool.similarity(query), 2, dim=1).indices
    # task 3 would need prompts 6-7, beyond the pool: the key match, as in the JAX code;
    # at test time the key match always
    assert torch.equal(pool(query, task=3, train=True).selected, key_match)
    assert torch.equal(pool(query, task=1, train=False).selected, key_match)
    pull = (1 - pool.similarity(query)[:, 2:4]).sum(1).mean()
    torch.testing.assert_close(pool(query, task=1, train=True).aux_loss, pull)


def test_shared_pool_starts_task_t_from_task_t_minus_1s_prompts_not_keys() -> None:
    torch.manual_seed(0)
    pool = PromptPool(6, 2, 2, 4, 5, task_prompt_mask=True, shared_prompt_pool=True)
    prompts, keys = pool.prompts.detach().clone(), pool.keys.detach().clone()
    pool.begin_task(1)
    assert torch.equal(pool.prompts[2:4], prompts[0:2])
    assert torch.equal(pool.prompts[[0, 1, 4, 5]], prompts[[0, 1, 4, 5]])
    assert torch.equal(pool.keys, keys)
    pool.begin_task(3)  # prompts 6-7 do not exist: nothing is copied
    assert torch.equal(pool.prompts[4:], prompts[4:])
    default = PromptPool(6, 2, 2, 4, 5)
    before = default.prompts.detach().clone()
    default.begin_task(1)
    assert torch.equal(default.prompts, before)


# -- DualPrompt's E-prompts ---------------------------------------------------------------


def voting_pool(**options) -> VotingKeyedPrefixPool:
    pool = VotingKeyedPrefixPool(3, 2, 8, 4, layers=(2, 3), **options)
    with torch.no_grad():
        for slot in range(3):
            pool.keys[slot].copy_(torch.eye(4)[slot])
            pool.prompts[slot].fill_(float(slot))
    return pool


def test_e_prompt_vote_gives_each_test_group_its_majority_task() -> None:
    query = torch.eye(4)[[0, 0, 1, 2, 2, 0]]  # alone: tasks 0, 0, 1, 2, 2, 0
    grouped = voting_pool(batchwise_selection=True, vote_group=3)(query, task=2)
    assert grouped.selected[:, 0].tolist() == [0, 0, 0, 2, 2, 2]
    assert grouped.prompt.prefixes[3][:, 0, 0, 0].tolist() == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    # the matching term of the keys used: inputs 2 and 5 have cos 0
    torch.testing.assert_close(grouped.aux_loss, torch.tensor(2 / 6))
    whole = voting_pool(batchwise_selection=True)(query, task=2)
    assert whole.selected[:, 0].tolist() == [0] * 6  # 0:3, 2:2, 1:1
    alone = voting_pool()(query, task=2)
    assert alone.selected[:, 0].tolist() == [0, 0, 1, 2, 2, 0]
    # training is the task's own E-prompt either way (the JAX prompt mask)
    trained = voting_pool(batchwise_selection=True)(query, task=1, train=True)
    assert trained.selected[:, 0].tolist() == [1] * 6


def test_shared_prompt_pool_starts_e_t_from_e_t_minus_1_and_keeps_k_t() -> None:
    pool = voting_pool(shared_prompt_pool=True)
    keys = [key.detach().clone() for key in pool.keys]
    pool.begin_task(1)
    assert torch.equal(pool.prompts[1], pool.prompts[0])
    assert torch.equal(pool.prompts[2], torch.full_like(pool.prompts[2], 2.0))
    assert all(torch.equal(key, before) for key, before in zip(pool.keys, keys, strict=True))
    assert [p.requires_grad for p in pool.prompts] == [False, True, False]
    unshared = voting_pool()
    unshared.begin_task(1)
    assert torch.equal(unshared.prompts[1], torch.ones_like(unshared.prompts[1]))


def test_voting_pool_at_defaults_is_the_plain_e_prompt_pool() -> None:
    torch.manual_seed(3)
    plain = TaskKeyedPrefixPool(4, 2, 8, 6, layers=(2, 3, 4))
    torch.manual_seed(3)
    voting = VotingKeyedPrefixPool(4, 2, 8, 6, layers=(2, 3, 4))
    for name, value in plain.state_dict().items():
        assert torch.equal(voting.state_dict()[name], value)
    query = torch.randn(5, 6)
    expected, got = plain(query, task=3), voting(query, task=3)
    assert torch.equal(got.selected, expected.selected)
    assert torch.equal(got.prompt.prefixes[4], expected.prompt.prefixes[4])


# -- flax's initialisation ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_jax_init_is_uniform_0_to_001_with_a_zero_head(vit5, name: str) -> None:
    strategy = make(name, vit5, prompt_init="jax")
    prompts = [
        p for n, p in strategy.model.named_parameters() if "prompt" in n and "encoder" not in n
    ]
    assert prompts
    for parameter in prompts:
        assert parameter.min() >= 0.0 and parameter.max() < 0.01
    assert not strategy.model.head.weight.any() and not strategy.model.head.bias.any()
    default = make(name, vit5)
    assert min(p.min() for n, p in default.model.named_parameters() if "prompt" in n) < -0.5


# -- the strategies with the options on ------------------------------------------------------


class RecordEPromptAtStart(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.at_start: list[torch.Tensor] = []

    def before_training_epoch(self, strategy, *args, **kwargs):
        task = strategy.current_task
        self.at_start.append(strategy.model.e_prompts.prompts[task].detach().clone())


def test_dualprompt_with_the_authors_options_runs_and_votes_per_group(vit5, digits) -> None:
    torch.manual_seed(0)
    strategy = make(
        "dualprompt",
        vit5,
        batchwise_selection=True,
        vote_group=8,
        shared_prompt_pool=True,
        prompt_init="jax",
        grad_clip=1.0,
    )
    recorder = RecordEPromptAtStart()
    strategy.plugins.append(recorder)
    strategy.train(digits.benchmark.train_stream[0])
    first = strategy.model.e_prompts.prompts[0].detach().clone()
    strategy.train(digits.benchmark.train_stream[1])
    assert torch.equal(recorder.at_start[1], first)  # e_1 began as the trained e_0
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(24)])
    with torch.no_grad():
        tasks = strategy.predict(x).tasks
    assert all(len(set(tasks[g : g + 8].tolist())) == 1 for g in range(0, 24, 8))
    strategy.eval(digits.benchmark.test_stream[:2])
    assert len(strategy.evaluation_summary()["task_identity_accuracy"]) == 2


def test_l2p_with_the_prompt_mask_trains_only_its_tasks_prompts(vit5, digits) -> None:
    torch.manual_seed(0)
    strategy = make(
        "l2p", vit5, pool_size=10, top_k=2, task_prompt_mask=True, shared_prompt_pool=True
    )
    before = strategy.model.prompt_pool.prompts.detach().clone()
    strategy.train(digits.benchmark.train_stream[0])
    after_first = strategy.model.prompt_pool.prompts.detach().clone()
    assert not torch.equal(after_first[:2], before[:2])
    assert torch.equal(after_first[2:], before[2:])  # no other prompt was used
    strategy.train(digits.benchmark.train_stream[1])
    # task 1 started from task 0's prompts and trained only prompts 2-3
    assert torch.equal(strategy.model.prompt_pool.prompts[:2], after_first[:2])
    assert not torch.equal(strategy.model.prompt_pool.prompts[2:4], after_first[:2])
    assert torch.equal(strategy.model.prompt_pool.prompts[4:], before[4:])


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_a_vote_group_must_divide_both_batch_sizes(vit5, name: str) -> None:
    with pytest.raises(UsageError, match="vote_group=16 must divide batch_size"):
        make(name, vit5, batchwise_selection=True, vote_group=16, batch_size=24)
    with pytest.raises(UsageError, match="eval_batch_size"):
        make(name, vit5, batchwise_selection=True, vote_group=16, eval_batch_size=24)
    with pytest.raises(UsageError, match=">= 0"):
        make(name, vit5, vote_group=-1)
    make(name, vit5, vote_group=16, batch_size=24)  # no vote: no constraint


# -- CODA-Prompt's schedule and loader -------------------------------------------------------


def epoch_rates(strategy, epochs: int) -> list[float]:
    strategy.make_optimizer()
    rates = []
    for _ in range(epochs):
        rates.append(strategy.optimizer.param_groups[0]["lr"])
        strategy.scheduler.step()
    return rates


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_coda_quarter_cosine_is_the_authors_cosine_schedule(vit5) -> None:
    quarter = make("coda-prompt", vit5, pool_size=10, epochs=5, lr=1e-3, cosine_form="quarter")
    expected = [1e-3 * math.cos(99 * math.pi * e / (200 * 4)) for e in range(5)]
    assert epoch_rates(quarter, 5) == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == pytest.approx(1e-3 * 0.0157, rel=1e-2)
    half = make("coda-prompt", vit5, pool_size=10, epochs=5, lr=1e-3)
    expected_half = [1e-3 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert epoch_rates(half, 5) == pytest.approx(expected_half, rel=1e-9)
    single = make("coda-prompt", vit5, pool_size=10, epochs=1, cosine_form="quarter")
    assert epoch_rates(single, 1) == [pytest.approx(0.01)]


class RecordBatchSizes(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def after_training_iteration(self, strategy, *args, **kwargs):
        self.sizes.append(len(strategy.mb_y))


@pytest.mark.parametrize("drop_last", [False, True])
def test_coda_drop_last_drops_the_partial_training_batch(vit5, digits, drop_last) -> None:
    strategy = make("coda-prompt", vit5, pool_size=10, batch_size=64, drop_last=drop_last)
    recorder = RecordBatchSizes()
    strategy.plugins.append(recorder)
    strategy.train(digits.benchmark.train_stream[0])
    items = len(digits.benchmark.train_stream[0].dataset)
    assert items % 64  # the test needs a partial last batch
    expected = [64] * (items // 64) + ([] if drop_last else [items % 64])
    assert recorder.sizes == expected


# -- the presets -----------------------------------------------------------------------------


def authors(strategy: str, scenario: str) -> dict:
    request = RunRequest(
        strategy=strategy,
        scenario=scenario,
        preset="authors",
        device="cpu",
        backbone="vit-tiny-random",
    )
    return resolve_run(request)


def test_l2p_authors_preset_is_the_jax_cifar_config() -> None:
    config = authors("l2p", "split-cifar100")
    options = config["strategy_options"]
    assert config["preset"] == "authors:split-cifar100"
    assert options["lr"] == pytest.approx(0.03 * 128 / 256)
    assert (options["batch_size"], options["epochs"], options["grad_clip"]) == (128, 5, 1.0)
    assert (options["pool_size"], options["prompt_length"], options["top_k"]) == (10, 5, 5)
    assert options["batchwise_selection"] and options["vote_group"] == 16
    assert config["scenario_options"]["normalize"] == "none"
    assert config["scenario_options"]["class_order"] == "natural"
    assert config["authors_quirks"] == [
        "batchwise_selection",
        "vote_group",
        "prompt_init",
        "scenario.normalize",
    ]
    five = authors("l2p", "5-datasets")["strategy_options"]
    assert five["task_prompt_mask"] and five["shared_prompt_pool"] and five["pool_size"] == 20


def test_dualprompt_authors_presets_scale_the_lr_by_the_global_batch() -> None:
    cifar = authors("dualprompt", "split-cifar100")["strategy_options"]
    assert cifar["lr"] == pytest.approx(0.03 * 192 / 256) and cifar["batch_size"] == 192
    assert cifar["batchwise_selection"] and cifar["vote_group"] == 24
    assert cifar["eval_batch_size"] % cifar["vote_group"] == 0
    assert cifar["shared_prompt_pool"] and cifar["grad_clip"] == 1.0
    imr = authors("dualprompt", "imagenet-r")
    assert imr["strategy_options"]["lr"] == pytest.approx(0.005 * 192 / 256)
    assert imr["strategy_options"]["e_length"] == 20
    assert not imr["strategy_options"]["batchwise_selection"]  # off in imr_dualprompt.py
    assert imr["scenario_options"]["normalize"] == "none"


def test_coda_authors_presets() -> None:
    cifar = authors("coda-prompt", "split-cifar100")
    options = cifar["strategy_options"]
    assert (options["epochs"], options["lr"], options["batch_size"]) == (20, 1e-3, 128)
    assert options["cosine_form"] == "quarter" and options["drop_last"]
    assert cifar["authors_quirks"] == ["cosine_form", "drop_last", "scenario.normalize"]
    imr = authors("coda-prompt", "imagenet-r")
    assert imr["strategy_options"]["epochs"] == 50
    assert imr["scenario_options"]["crop_scale_min"] == 0.08


def test_defaults_set_no_quirk() -> None:
    for name in ("l2p", "dualprompt", "coda-prompt"):
        request = RunRequest(strategy=name, scenario="digits-offline", device="cpu")
        assert resolve_run(request)["authors_quirks"] == []


def test_the_prompt_pool_keeps_its_default_initialisation() -> None:
    torch.manual_seed(5)
    pool = PromptPool(4, 2, 2, 3, 5)
    torch.manual_seed(5)
    prompts = torch.empty(4, 2, 3).uniform_(-1, 1)
    keys = torch.empty(4, 5).uniform_(-1, 1)
    assert torch.equal(pool.prompts, prompts) and torch.equal(pool.keys, keys)

"""The LoRA-based continual learners: InfLoRA, SD-LoRA, the null-space LoRA, O-LoRA and
HiDe-LoRA on the tiny random ViT and the bundled digits (seconds each)."""

from __future__ import annotations

import pytest
import torch

from clbench.adapters import LoRA
from clbench.registry import STRATEGIES
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.subspace import DualGPM, energy_rank, principal_count

NAMES = ["inflora", "sd-lora", "nusa-lora", "o-lora", "hide-lora"]
# small, fast settings on a 3-block ViT of width 32 (HiDe's block list must fit it)
SETTINGS = {
    "inflora": {"rank": 4, "lr": 0.01},
    "sd-lora": {"rank": 4, "lr": 0.01},
    "nusa-lora": {"rank": 4, "lr": 0.01, "lora_dropout": 0.0},
    "o-lora": {"rank": 4, "lr": 0.01, "lora_dropout": 0.0},
    "hide-lora": {"rank": 4, "lr": 0.01, "prompt_layers": [0, 1, 2], "tii_epochs": 3,
                  "tii_align_epochs": 3, "tap_epochs": 3, "samples_per_class": 32},
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


def make(name, encoder, scenario, **options):
    strategy_class = STRATEGIES.get(name)
    settings = {
        "epochs": 2,
        "batch_size": 32,
        "eval_batch_size": 256,
        **SETTINGS[name],
        **options,
    }
    return strategy_class(
        encoder=encoder,
        num_classes=scenario.num_classes,
        config=strategy_class.Config(**settings),
        num_tasks=len(scenario.benchmark.train_stream),
    )


def inputs_of(scenario, experience=0, count=48):
    dataset = scenario.benchmark.test_stream[experience].dataset
    return torch.stack([dataset[i][0] for i in range(count)])


def factors(strategy, slot):
    """Every parameter of task ``slot``'s adapters, cloned."""
    adapters = (
        strategy.model.prompts.tasks[slot]
        if strategy.name == "hide-lora"
        else strategy.model.adapters[slot]
    )
    return {n: p.detach().clone() for n, p in adapters.named_parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_trains_predicts_and_learns_above_chance(name, tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make(name, tiny_vit, digits)
    encoder_before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    strategy.train(digits.benchmark.train_stream[0])
    assert accuracy(strategy, digits, [0]) > 0.6  # two classes: clearly learnt
    strategy.train(digits.benchmark.train_stream[1])
    for key, value in tiny_vit.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # the shared encoder is untouched
    final = accuracy(strategy, digits, [0, 1])
    # 4 seen classes (chance 25%) on a random 3-block ViT, with no example of task 0
    # while task 1 trains: above chance, well short of a pretrained model
    assert final > 0.32, f"{name}: {final:.2f}"


def accuracy(strategy, scenario, experiences):
    correct = total = 0
    strategy.model.eval()
    for index in experiences:
        dataset = scenario.benchmark.test_stream[index].dataset
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        with torch.no_grad():
            correct += int((strategy.classify(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


@pytest.mark.parametrize("name", ["inflora", "sd-lora", "o-lora", "hide-lora"])
def test_old_tasks_adapters_stay_bit_identical(name, tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make(name, tiny_vit, digits, epochs=1)
    strategy.train(digits.benchmark.train_stream[0])
    after_first = factors(strategy, 0)
    for experience in digits.benchmark.train_stream[1:3]:
        strategy.train(experience)
    later = factors(strategy, 0)
    assert after_first.keys() == later.keys()
    for key, value in after_first.items():
        assert torch.equal(value, later[key]), key
    # and the later tasks did train something of their own
    assert any(not torch.equal(v, factors(strategy, 0)[k]) for k, v in factors(strategy, 1).items())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make(name, tiny_vit, digits, epochs=1)
    for experience in digits.benchmark.train_stream[:2]:
        strategy.train(experience)
    state = strategy.state_dict()
    assert not any(key.startswith("encoder.") for key in state["model"])
    torch.manual_seed(123)  # a fresh strategy's own random initialisation differs
    restored = make(name, tiny_vit, digits, epochs=1)
    restored.load_state_dict(state)
    x = inputs_of(digits)
    strategy.model.eval()
    restored.model.eval()
    with torch.no_grad():
        assert torch.equal(strategy.classify(x), restored.classify(x))
    # training continues identically from the restored state
    torch.manual_seed(7)
    strategy.train(digits.benchmark.train_stream[2])
    torch.manual_seed(7)
    restored.train(digits.benchmark.train_stream[2])
    with torch.no_grad():
        torch.testing.assert_close(strategy.classify(x), restored.classify(x))


def test_inflora_input_factor_lies_in_the_complement_of_the_memory(tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make("inflora", tiny_vit, digits, epochs=1, threshold=0.9)
    strategy.train(digits.benchmark.train_stream[0])
    memory = strategy.memory
    remembered = {layer: memory.remembered(layer).float() for layer in strategy.adapter_layers}
    assert all(0 < basis.shape[1] < basis.shape[0] for basis in remembered.values())
    strategy.train(digits.benchmark.train_stream[1])
    for layer, basis in remembered.items():
        for target in ("k", "v"):
            adapter = strategy.model.adapters[1][layer, target]
            assert isinstance(adapter, LoRA)
            assert not adapter.down.requires_grad  # F_1 is designed, never trained
            assert adapter.up.abs().sum() > 0  # G_1 trained
            # F_1 annihilates the old tasks' input space: G_1 F_1 x = 0 for x in it
            assert (adapter.down @ basis).abs().max() < 1e-4
            update = adapter.delta_weight()[target]
            assert (update @ basis).abs().max() < 1e-4 * max(1.0, float(update.abs().max()))


def test_dualgpm_schedule_growth_and_flip():
    torch.manual_seed(0)
    dim = 8
    basis = torch.linalg.qr(torch.randn(dim, dim))[0]

    def covariance(energies):
        return basis @ torch.diag(torch.tensor(energies)) @ basis.T

    # first task: energy ranks below the threshold, kept as a "remove" basis
    values = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125])
    assert energy_rank(values, 0.9) == int(
        (torch.cumsum(values**2 / (values**2).sum(), 0) < 0.9).sum()
    )
    assert principal_count(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1
    memory = DualGPM()
    memory.update({0: covariance([10.0, 1.0, 0, 0, 0, 0, 0, 0])}, 0.95)
    assert memory.kinds[0] == "remove" and memory.bases[0].shape == (dim, 1)
    # the projected covariance has nothing left along the remembered direction
    projected = memory.project(0, covariance([10.0, 1.0, 0, 0, 0, 0, 0, 0]))
    assert (projected.T @ basis[:, :1].double()).abs().max() < 1e-6
    # later tasks in new directions grow the basis until it passes d / 2, then it flips
    memory.update({0: covariance([0, 0, 5.0, 5.0, 0, 0, 0, 0])}, 0.99)
    assert memory.kinds[0] == "remove" and memory.bases[0].shape[1] == 3
    memory.update({0: covariance([0, 0, 0, 0, 5.0, 5.0, 0, 0])}, 0.99)
    assert memory.kinds[0] == "retain" and memory.bases[0].shape[1] == dim - 5
    remembered = memory.remembered(0)
    assert remembered.shape[1] == 5
    inside = remembered @ remembered.T
    for column in range(6):
        if column != 1:  # direction 1 carried too little energy to be kept
            direction = basis[:, column].double()
            assert torch.allclose(inside @ direction, direction, atol=1e-6)
    state = memory.state_dict()
    copy = DualGPM()
    copy.load_state_dict(state)
    assert copy.kinds == memory.kinds and torch.equal(copy.bases[0], memory.bases[0])


def test_nusa_update_avoids_the_principal_subspace(tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make("nusa-lora", tiny_vit, digits, epochs=1, energy=0.9)
    strategy.train(digits.benchmark.train_stream[0])
    offsets = strategy.model.offsets
    for layer, adapter in strategy.model.adapters[0].items():
        target = adapter.targets[0]
        weight = tiny_vit.projection_weight(layer, target).double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        principal = principal_count(s, 0.9)
        update = offsets.offset(layer, target).double()
        assert update.abs().max() > 0  # task 0 was merged
        scale = float(update.abs().max())
        assert (update @ vh[:principal].T).abs().max() < 1e-5 * max(scale, 1.0)
        assert (u[:, :principal].T @ update).abs().max() < 1e-5 * max(scale, 1.0)
        assert float(adapter.middle.abs().max()) == 0.0  # merged, then reset


def test_sd_lora_magnitudes_follow_the_option(tiny_vit, digits):
    for relearn in (False, True):
        torch.manual_seed(0)
        strategy = make("sd-lora", tiny_vit, digits, epochs=1, relearn_magnitudes=relearn)
        strategy.train(digits.benchmark.train_stream[0])
        learned = float(strategy.model.magnitudes[0].detach())
        assert learned != pytest.approx(0.8)
        strategy.begin_task(1, [])  # what the next experience does first
        now = float(strategy.model.magnitudes[0].detach())
        assert now == (pytest.approx(0.8) if relearn else learned)
        assert strategy.model.magnitudes[0].requires_grad  # earlier magnitudes train
        assert not strategy.model.adapters[0][0, "q"].up.requires_grad  # directions do not


def test_o_lora_penalty_is_the_sum_of_absolute_factor_products(tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make("o-lora", tiny_vit, digits, epochs=1, orthogonal_weight=0.5)
    strategy.train(digits.benchmark.train_stream[0])
    strategy.current_task = 1
    expected = torch.zeros(())
    for layer, adapter in strategy.model.adapters[1].items():
        old = strategy.model.adapters[0][layer, adapter.targets[0]].down
        expected = expected + 0.5 * (old @ adapter.down.T).abs().sum()
    torch.testing.assert_close(strategy.regulariser(), expected)
    strategy.current_task = 0
    assert float(strategy.regulariser()) == 0.0  # no old task, no penalty


def test_hide_lora_routes_each_input_to_its_task_lora(tiny_vit, digits):
    torch.manual_seed(0)
    strategy = make("hide-lora", tiny_vit, digits, epochs=1)
    for experience in digits.benchmark.train_stream[:2]:
        strategy.train(experience)
    x = inputs_of(digits, 0, count=6)
    tasks = torch.tensor([0, 1, 0, 1, 1, 0])
    loras = strategy.model.prompts
    with torch.no_grad():
        routed = tiny_vit(x, loras(task=tasks).prompt).pooled
        for task in (0, 1):
            alone = tiny_vit(x, loras(task=task).prompt).pooled
            torch.testing.assert_close(routed[tasks == task], alone[tasks == task])


def test_hide_lora_refuses_the_prefix_options_it_inherits(tiny_vit, digits):
    from clbench.errors import UsageError

    for options in (
        {"prompt_length": 8},
        {"prefix_layout": "authors_batch_mix"},
        {"prompt": "vapt"},
    ):
        with pytest.raises(UsageError, match="no prefixes: .*do not apply to it"):
            make("hide-lora", tiny_vit, digits, **options)

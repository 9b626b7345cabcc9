"""The strategy base's contract: what exists in setup, masking at prediction, task-identity
scoring from predict's return value, per-task slot counts and their one check, and the one
prompt-module lifecycle."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from clbench.config import option
from clbench.errors import UsageError
from clbench.prompts import (
    ComponentPrompt,
    PromptModule,
    PromptPool,
    SharedPrefix,
    TaskKeyedPrefixPool,
    TaskPrefixPrompts,
    TaskPromptPools,
)
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.strategy import (
    CLStrategy,
    Prediction,
    StrategyConfig,
    StrategyModel,
    TaskSlots,
    TrainOutput,
)


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


@dataclass
class SlotsConfig(StrategyConfig):
    num_tasks: int = option(0, "heads, one per task (0: the scenario's number of tasks)")


class PerTaskHeads(CLStrategy):
    """A linear head per task on the frozen features; the task is inferred as the head with
    the largest logit (enough to exercise every part of the contract)."""

    Config = SlotsConfig
    infers_task = True
    config: SlotsConfig

    def task_slots(self) -> TaskSlots:
        return TaskSlots("num_tasks", self.config.num_tasks, "heads")

    def setup(self, model: StrategyModel) -> None:
        # what the base promises to exist when setup runs
        self.seen_at_setup = (self.device, self.model is model, self.seen_classes.device)
        count = self.num_task_slots()
        model.heads = nn.ModuleList(
            nn.Linear(self.encoder.feature_dim, self.num_classes) for _ in range(count)
        )

    def train_logits(self, x: Tensor) -> TrainOutput:
        logits = self.model.heads[self.current_task](self.query(x))
        return TrainOutput(logits, aux_loss=logits.new_tensor(0.25))

    def predict(self, x: Tensor) -> Tensor | Prediction:
        query = self.query(x)
        learnt = range(len(self.task_classes))
        logits = torch.stack([self.model.heads[t](query) for t in learnt])  # [T, B, C]
        tasks = logits.amax(dim=2).argmax(dim=0)
        return Prediction(logits.amax(dim=0), tasks=tasks)


def make(encoder, num_tasks=None, strategy_class=PerTaskHeads, **options):
    config = strategy_class.Config(epochs=1, batch_size=64, eval_batch_size=256, **options)
    return strategy_class(encoder=encoder, num_classes=10, config=config, num_tasks=num_tasks)


def test_setup_sees_device_model_and_seen_classes(tiny_vit):
    strategy = make(tiny_vit, num_tasks=5)
    device, same_model, seen_device = strategy.seen_at_setup
    assert device == torch.device("cpu") and same_model and seen_device == device
    assert len(strategy.model.heads) == 5 and strategy.is_set_up


def test_slots_follow_the_stream_when_the_task_count_is_not_given(tiny_vit, digits):
    strategy = make(tiny_vit)  # a plain Avalanche script passes no num_tasks
    assert not strategy.is_set_up and strategy.num_tasks is None
    strategy.train(digits.benchmark.train_stream[0])
    assert strategy.num_tasks == 5 and len(strategy.model.heads) == 5
    restored = make(tiny_vit)  # built the same way, then loaded: the checkpoint says 5
    restored.load_state_dict(strategy.state_dict())
    assert len(restored.model.heads) == 5


def test_an_explicit_slot_count_is_checked_once_before_training(tiny_vit, digits):
    with pytest.raises(UsageError, match=r"has 3 heads \(num_tasks=3\).*num_tasks=5"):
        PerTaskHeads(encoder=tiny_vit, num_classes=10, config=SlotsConfig(num_tasks=3), num_tasks=5)
    late = PerTaskHeads(encoder=tiny_vit, num_classes=10, config=SlotsConfig(num_tasks=3))
    assert len(late.model.heads) == 3  # an explicit count builds at once
    with pytest.raises(UsageError, match="num_tasks=5"):  # the stream tells: before task 0
        late.train(digits.benchmark.train_stream[0])
    assert late.task_classes == []


def test_the_base_masks_unseen_classes_and_scores_the_returned_tasks(tiny_vit, digits):
    strategy = make(tiny_vit, num_tasks=5)
    for task in range(2):
        strategy.train(digits.benchmark.train_stream[task])
    x = torch.stack([digits.benchmark.test_stream[2].dataset[i][0] for i in range(8)])
    with torch.no_grad():
        raw = strategy.predict(x).logits
        logits = strategy.classify(x)
    unseen = ~strategy.seen_classes
    assert (logits[:, unseen] == torch.finfo(logits.dtype).min).all()
    torch.testing.assert_close(logits[:, ~unseen], raw[:, ~unseen])
    strategy.eval(digits.benchmark.test_stream[:2])
    identity = strategy.evaluation_summary()["task_identity_accuracy"]
    assert len(identity) == 2 and all(0.0 <= value <= 100.0 for value in identity)


def test_a_method_that_infers_tasks_must_return_them(tiny_vit, digits):
    class Forgetful(PerTaskHeads):
        def predict(self, x: Tensor) -> Tensor:
            prediction = super().predict(x)
            assert isinstance(prediction, Prediction)
            return prediction.logits  # no tasks: nothing could be scored

    strategy = make(tiny_vit, num_tasks=5, strategy_class=Forgetful)
    strategy.train(digits.benchmark.train_stream[0])
    with pytest.raises(RuntimeError, match="returned no tasks"):
        strategy.eval(digits.benchmark.test_stream[:1])


def test_the_training_loss_adds_the_returned_auxiliary_loss(tiny_vit, digits):
    strategy = make(tiny_vit, num_tasks=5)
    losses = []  # the loss the base optimises minus its cross-entropy
    original = strategy.training_loss

    def recording(output: TrainOutput, targets: Tensor) -> Tensor:
        loss = original(output, targets)
        ce = torch.nn.functional.cross_entropy(output.logits, targets)
        losses.append((loss - ce).item())
        return loss

    strategy.training_loss = recording
    strategy.train(digits.benchmark.train_stream[0])
    assert losses and all(value == pytest.approx(0.25) for value in losses)


@pytest.mark.parametrize(
    "module",
    [
        lambda: TaskKeyedPrefixPool(3, 2, 8, 4, layers=(0,)),
        lambda: TaskPrefixPrompts(3, [0], 2, 8),
        lambda: TaskPromptPools(
            3,
            variant="prefix",
            pool_size=4,
            prompt_length=1,
            top_k=2,
            embed_dim=8,
            key_dim=4,
            layers=(0,),
        ),  # fmt: skip
        lambda: ComponentPrompt(6, 3, 2, 8, 8, layers=(0,)),
    ],
)
def test_every_module_with_task_slots_trains_only_the_current_one(module):
    prompts: PromptModule = module()
    assert prompts.num_slots == 3
    prompts.begin_task(1)
    trains = [all(p.requires_grad for p in prompts.slot_parameters(s)) for s in range(3)]
    assert trains == [False, True, False]
    prompts.end_task(1)
    assert not any(p.requires_grad for s in range(3) for p in prompts.slot_parameters(s))


def test_modules_shared_by_all_tasks_have_no_slots():
    for shared in (PromptPool(4, 1, 2, 8, 4), SharedPrefix(2, 8, layers=(0,))):
        shared.begin_task(2)
        shared.end_task(2)  # no-ops: the whole module trains in every task
        assert shared.num_slots == 0 and all(p.requires_grad for p in shared.parameters())


def test_per_input_tasks_are_refused_by_modules_that_pick_by_key():
    pool = TaskKeyedPrefixPool(3, 2, 8, 4, layers=(0,))
    with pytest.raises(ValueError, match="one task for the whole batch"):
        pool(torch.randn(2, 4), task=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass task="):
        TaskPrefixPrompts(3, [0], 2, 8)(task=None)

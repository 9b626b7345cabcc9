"""`joint`: the method's own trainable parts (prefix / prompt tokens + head) trained on the
union of every seen experience's raw data; `trainable=head` is the old linear probe."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin

from clbench.errors import UsageError
from clbench.registry import STRATEGIES
from clbench.reporting.runs import load_runs
from clbench.results.folder import renamed_strategy
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

REPO = Path(__file__).resolve().parents[1]
FEWREL_FILE = REPO.parent / "shared" / "data" / "fewrel" / "val_wiki.json"
TINY_LAYERS = (0, 1, 2)  # the session's tiny ViT has 3 blocks


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


def make(name, encoder, scenario, **options):
    strategy_class = STRATEGIES.get(name)
    settings = {"epochs": 1, "batch_size": 64, "eval_batch_size": 256, **options}
    if name == "joint" and options.get("trainable", "prefix") == "prefix":
        settings.setdefault("prefix_layers", TINY_LAYERS)
    torch.manual_seed(0)
    return strategy_class(
        encoder=encoder, num_classes=scenario.num_classes, config=strategy_class.Config(**settings)
    )


def train(strategy, scenario, experiences):
    for index in experiences:
        torch.manual_seed(100 + index)  # as the run loop seeds each experience
        strategy.train(scenario.benchmark.train_stream[index])


def trained_state(strategy):
    return {k: v for k, v in strategy.state_dict()["model"].items()}


def test_trainable_head_is_the_linear_probe_bit_for_bit(tiny_vit, digits):
    old = make("joint-linear", tiny_vit, digits, epochs=2)
    new = make("joint", tiny_vit, digits, epochs=2, trainable="head")
    train(old, digits, range(2))
    train(new, digits, range(2))
    old_state, new_state = trained_state(old), trained_state(new)
    assert set(new_state) == {"head.weight", "head.bias"} == set(old_state)
    for key, value in old_state.items():
        assert torch.equal(new_state[key], value), key
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(16)])
    assert torch.equal(new.classify(x), old.classify(x))
    # the same stored features, checkpointed the same way
    old_extra, new_extra = old.state_dict()["extra"], new.state_dict()["extra"]
    for (xa, ya), (xb, yb) in zip(old_extra["seen_features"], new_extra["seen_features"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


class CountTrainingItems(SupervisedPlugin):
    """Training items and their labels, per experience, from the batches that train."""

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[int, int] = {}
        self.labels: dict[int, set[int]] = {}
        self.input_shapes: set[tuple[int, ...]] = set()

    def after_training_iteration(self, strategy, *args, **kwargs):
        task = strategy.current_task
        self.input_shapes.add(tuple(strategy.mb_x.shape[1:]))
        self.items[task] = self.items.get(task, 0) + len(strategy.mb_y)
        self.labels.setdefault(task, set()).update(strategy.mb_y.tolist())


@pytest.mark.parametrize("trainable", ["prefix", "prompt"])
def test_prompt_tuning_trains_on_the_raw_union_of_every_seen_experience(
    tiny_vit, digits, trainable
):
    encoder_before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    strategy = make("joint", tiny_vit, digits, trainable=trainable, prompt_tokens=4)
    prompt_before = [p.detach().clone() for p in strategy.model.prompt.parameters()]
    counter = CountTrainingItems()
    strategy.plugins.append(counter)
    train(strategy, digits, range(3))
    stream = digits.benchmark.train_stream
    sizes = [len(stream[i].dataset) for i in range(3)]
    assert counter.items == {0: sizes[0], 1: sizes[0] + sizes[1], 2: sum(sizes)}
    classes = [set(stream[i].classes_in_this_experience) for i in range(3)]
    assert counter.labels == {0: classes[0], 1: classes[0] | classes[1], 2: set().union(*classes)}
    # raw inputs (images), not features: the prompt changes the features
    assert counter.input_shapes == {tuple(stream[0].dataset[0][0].shape)}
    trained = {n for n, p in strategy.model.named_parameters() if p.requires_grad}
    prompt_names = {"prefix": {"prompt.prompts"}, "prompt": {"prompt.tokens"}}[trainable]
    assert trained == prompt_names | {"head.weight", "head.bias"}
    for before, after in zip(prompt_before, strategy.model.prompt.parameters()):
        assert not torch.equal(before, after)
    for key, value in tiny_vit.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    groups = strategy.optimizer.param_groups
    assert [g["lr"] for g in groups] == [strategy.config.prompt_lr, strategy.config.lr]


@pytest.mark.parametrize("trainable", ["prefix", "prompt"])
def test_resume_rebuilds_the_union_from_the_stream_and_ends_bit_for_bit(
    tiny_vit, digits, trainable
):
    unbroken = make("joint", tiny_vit, digits, trainable=trainable, prompt_tokens=4)
    train(unbroken, digits, range(2))

    first = make("joint", tiny_vit, digits, trainable=trainable, prompt_tokens=4)
    train(first, digits, [0])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what the run loop's checkpoint holds
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["extra"] == {"seen_experiences": [0]}  # indices, never the data
    resumed = make("joint", tiny_vit, digits, trainable=trainable, prompt_tokens=4)
    resumed.load_state_dict(state)
    counter = CountTrainingItems()
    resumed.plugins.append(counter)
    train(resumed, digits, [1])
    assert counter.items[1] == sum(len(digits.benchmark.train_stream[i].dataset) for i in range(2))
    expected, got = trained_state(unbroken), trained_state(resumed)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_a_prefix_on_layers_the_encoder_lacks_is_refused(tiny_vit, digits):
    with pytest.raises(UsageError, match="prefix_layers"):
        make("joint", tiny_vit, digits, prefix_layers=(0, 5))


def test_old_joint_runs_read_as_joint_linear():
    old = {"strategy": "joint", "strategy_options": {"lr": 0.001}}
    assert renamed_strategy(old)["strategy"] == "joint-linear"
    new = {"strategy": "joint", "strategy_options": {"trainable": "prefix"}}
    assert renamed_strategy(new) is new
    examples = REPO / "results" / "examples" / "fewrel-offline" / "runs" / "fewrel-offline"
    if not (examples / "joint").is_dir():
        pytest.skip("the shipped example runs are not in this checkout")
    runs = load_runs([examples / "joint"])
    assert len(runs) > 0 and set(runs["strategy"]) == {"joint-linear"}


@pytest.mark.slow
@pytest.mark.skipif(not FEWREL_FILE.is_file(), reason="needs ../shared/data/fewrel/val_wiki.json")
def test_prefix_and_prompt_match_or_beat_the_linear_probe_on_fewrel(minilm, tmp_path, monkeypatch):
    """On a pretrained encoder, tuning a prompt on all the data can only add to a linear
    probe of its features (16 relations, 2 tasks, 8 training sentences per relation)."""
    from clbench.scenarios.relation_extraction import FewRelOfflineOptions, fewrel_offline

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    options = FewRelOfflineOptions(
        data_file=str(FEWREL_FILE), num_experiences=2, n_train=8, n_val=0, n_test=8, max_length=32
    )
    scenario = fewrel_offline(options, minilm, seed=0)
    tests = [e.dataset.eval() for e in scenario.benchmark.test_stream]
    x = torch.stack([d[i][0] for d in tests for i in range(len(d))])
    y = torch.tensor([int(d[i][1]) for d in tests for i in range(len(d))])

    def accuracy(trainable: str) -> float:
        strategy = make(
            "joint", minilm, scenario, trainable=trainable, epochs=2, batch_size=16,
            prefix_layers=(0, 1, 2, 3, 4),
        )  # fmt: skip
        train(strategy, scenario, range(2))
        with torch.no_grad():
            return float((strategy.classify(x).argmax(1) == y).float().mean())

    probe = accuracy("head")
    assert accuracy("prefix") >= probe
    assert accuracy("prompt") >= probe

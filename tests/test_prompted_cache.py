"""The prompted-feature cache: versions, bounds, and per strategy the same predictions as
without it while the encoder runs only on the (input, prompt) pairs not seen before."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin

from clbench.encoders.base import EncoderOutput
from clbench.prompted_cache import PromptedFeatureCache
from clbench.registry import STRATEGIES
from clbench.scenario import TensorClassificationDataset, class_incremental
from clbench.scenarios.offline_vision import Normalise, resize_images

# -- the cache on its own -------------------------------------------------------------------


def slot_feature(x, slots, table):
    """A row-wise feature of (input, slot parameters): [B, 3]."""
    flat = x.reshape(len(x), -1).float()
    return flat[:, :3] * table[slots].sum(1, keepdim=True) + slots[:, None]


def counted(x, slots, table, calls):
    def compute(rows):
        calls.append(len(x[rows]))
        return slot_feature(x[rows], slots[rows], table)

    return compute


def test_rows_are_computed_once_per_slot_and_served_exactly():
    table = torch.randn(3, 5)
    cache = PromptedFeatureCache(3)
    cache.sync(table)
    x, slots, calls = torch.randn(6, 4), torch.tensor([0, 1, 0, 2, 1, 0]), []
    first = cache.features(x, slots, counted(x, slots, table, calls))
    assert torch.equal(first, slot_feature(x, slots, table)) and calls == [6]
    # the same inputs, reordered, some under another slot: only the new pairs are computed
    order = torch.tensor([5, 3, 0, 1])
    moved = torch.tensor([0, 2, 1, 1])  # item 0 now picks slot 1: new
    again = cache.features(x[order], moved, counted(x[order], moved, table, calls))
    assert torch.equal(again, slot_feature(x[order], moved, table))
    assert calls == [6, 1] and cache.served == 3 and cache.computed == 7
    assert len(cache) == 7 and cache.nbytes == 7 * 3 * 4


def test_a_changed_slot_drops_its_entries_and_a_shared_change_drops_all():
    table = torch.randn(3, 5)
    cache = PromptedFeatureCache(3)
    gates = torch.ones(2)
    cache.sync(table, gates)
    x, slots, calls = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), []
    cache.features(x, slots, counted(x, slots, table, calls))
    table[1, 0] += 1.0  # slot 1's prompt is written (training, momentum, a load)
    cache.sync(table, gates)
    assert cache.versions == [0, 1, 0] and len(cache) == 4
    out = cache.features(x, slots, counted(x, slots, table, calls))
    assert torch.equal(out, slot_feature(x, slots, table)) and calls == [6, 2]
    cache.sync(table, gates)  # nothing changed: nothing dropped
    assert cache.versions == [0, 1, 0] and len(cache) == 6
    cache.sync(table, gates * 2)  # the shared gates changed: every slot's features did
    assert cache.versions == [1, 2, 1] and len(cache) == 0 and cache.nbytes == 0


def test_the_memory_bound_keeps_what_fits_and_computes_the_rest():
    table = torch.randn(2, 5)
    cache = PromptedFeatureCache(2, max_bytes=4 * 3 * 4)  # four rows of 3 fp32
    cache.sync(table)
    x, slots, calls = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]), []
    cache.features(x, slots, counted(x, slots, table, calls))
    assert len(cache) == 3 and cache.nbytes == 36  # slot 0 fitted, slot 1 would not
    out = cache.features(x, slots, counted(x, slots, table, calls))
    assert torch.equal(out, slot_feature(x, slots, table)) and calls == [6, 3]


def test_inputs_without_a_fingerprint_are_always_computed():
    table = torch.randn(2, 5)
    cache = PromptedFeatureCache(2)
    cache.sync(table)
    x, slots, calls = torch.randn(3, 4).double(), torch.tensor([0, 1, 0]), []
    for _ in range(2):
        cache.features(x, slots, counted(x, slots, table, calls))
    assert calls == [3, 3] and len(cache) == 0


# -- in the strategies ------------------------------------------------------------------------

TASKS = 3
HIDE = dict(
    epochs=1,
    batch_size=64,
    eval_batch_size=64,
    lr=0.01,
    prompt_layers=[0, 1],
    prompt_length=3,
    tii_epochs=5,
    tii_align_epochs=5,
    tap_epochs=2,
    samples_per_class=32,
    lr_schedule="constant",
)
SMALL = {
    "hide-prompt": HIDE,
    "norga": HIDE,
    "hier-ot": {**HIDE, "pseudo_features": 16, "ot_samples": 32},
    "wave-cre": dict(
        epochs=1,
        batch_size=64,
        eval_batch_size=64,
        lr=0.01,
        pool_size=4,
        top_k=2,
        head_epochs=5,
        samples_per_class=32,
        head_batch_size=64,
        head_lr=3e-3,
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class RowwiseCountingEncoder:
    """Wraps an encoder's forward: counts the rows of prompted passes, and, when
    ``rowwise``, runs every row alone. Some kernels round a row differently with the
    batch it sits in (e.g. CPU attention over a short sequence); run row by row, the
    encoder is batch invariant by construction, so any difference between predictions
    with and without the cache is the cache's."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.forward = encoder.forward
        self.prompted_rows = 0
        self.rowwise = False

    def __getattr__(self, name):  # feature_dim, modality, query, ...: the encoder's
        return getattr(self.encoder, name)

    def __call__(self, x, prompt=None, readout="tokens"):
        if prompt is not None:
            self.prompted_rows += len(x)
        if not self.rowwise or len(x) == 1:
            return self.forward(x, prompt, readout=readout)
        outputs = [
            self.forward(x[i : i + 1], row_of(prompt, i, len(x)), readout=readout)
            for i in range(len(x))
        ]
        first = outputs[0]
        return EncoderOutput(
            torch.cat([o.pooled for o in outputs]),
            torch.cat([o.tokens for o in outputs]),
            first.num_prompt_tokens,
            first.prompt_offset,
            first.readout,
        )


def row_of(prompt, row, batch):
    if prompt is None:
        return None

    def pick(tensor):
        return tensor[row : row + 1] if tensor.shape[0] == batch else tensor

    tokens = None if prompt.tokens is None else pick(prompt.tokens)
    prefixes = {layer: pick(prefix) for layer, prefix in prompt.prefixes.items()}
    return dataclasses.replace(prompt, prefixes=prefixes, tokens=tokens)


class TaskRecorder(SupervisedPlugin):
    """The task each test item's prediction picked: (experience, position) -> task."""

    def __init__(self, strategy):
        super().__init__()
        self.picked: dict[tuple[int, int], int] = {}
        self.outputs: list[torch.Tensor] = []
        original = strategy.prompted_features
        self.positions: dict[int, int] = {}

        def recording(*args):
            experience = int(strategy.experience.current_experience)
            start = self.positions.get(experience, 0)
            for offset, task in enumerate(args[-1].tolist()):
                self.picked[(experience, start + offset)] = task
            self.positions[experience] = start + len(args[-1])
            return original(*args)

        strategy.prompted_features = recording

    def before_eval(self, strategy, *args, **kwargs):
        self.picked, self.outputs, self.positions = {}, [], {}

    def after_eval_iteration(self, strategy, *args, **kwargs):
        self.outputs.append(strategy.mb_output.detach().clone())


@pytest.fixture(scope="module")
def encoder():
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    torch.manual_seed(0)
    return vit_tiny_random(TinyViTOptions(depth=2, embed_dim=32, num_heads=4))


@pytest.fixture(scope="module")
def digits(encoder):
    """Nine digit classes in 3 tasks of 3, 48 training and 16 test images per class (a
    third of digits-offline: the row-by-row evaluations are the test's cost)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = resize_images(data.images / 16.0, encoder.input_size[1:])
    labels = torch.as_tensor(data.target)
    train, test = [], []
    for label in range(9):
        members = (labels == label).nonzero().flatten().tolist()
        train += members[:48]
        test += members[48:64]

    def dataset(indices):
        index = torch.tensor(indices)
        transform = Normalise(encoder.mean, encoder.std)
        return TensorClassificationDataset(images[index], labels[index], transform)

    benchmark, _ = class_incremental(dataset(train), dataset(test), list(range(9)), TASKS)
    return SimpleNamespace(benchmark=benchmark, num_classes=9)


def set_cache(strategy, on):
    strategy.config = dataclasses.replace(strategy.config, prompted_cache=on)


@pytest.fixture(scope="module", params=sorted(SMALL))
def evaluated(request, encoder, digits):
    """A 3-task run evaluated as the run loop does (the seen test experiences after each
    task), with the cache and, on the same trained state, without it; per evaluation the
    prompted rows the encoder ran, the (item, task) pairs picked and both outputs."""
    name = request.param
    torch.manual_seed(0)
    strategy_class = STRATEGIES.get(name)
    strategy = strategy_class(
        encoder=encoder,
        num_classes=digits.num_classes,
        config=strategy_class.Config(**SMALL[name]),
        num_tasks=TASKS,
    )
    wrapper = RowwiseCountingEncoder(encoder)
    strategy.encoder = wrapper  # the strategy's prompted and query passes go through it
    recorder = TaskRecorder(strategy)
    strategy.plugins.append(recorder)
    evaluations = []
    for task in range(TASKS):
        strategy.train(digits.benchmark.train_stream[task])
        stream = digits.benchmark.test_stream[: task + 1]
        wrapper.rowwise, before = True, wrapper.prompted_rows
        strategy.eval(stream)
        cached_rows = wrapper.prompted_rows - before
        picked, with_cache = dict(recorder.picked), torch.cat(recorder.outputs)
        set_cache(strategy, False)
        before = wrapper.prompted_rows
        strategy.eval(stream)
        uncached_rows = wrapper.prompted_rows - before
        without_cache = torch.cat(recorder.outputs)
        set_cache(strategy, True)
        wrapper.rowwise = False
        evaluations.append(
            dict(
                picked=picked,
                cached_rows=cached_rows,
                uncached_rows=uncached_rows,
                with_cache=with_cache,
                without_cache=without_cache,
            )
        )
    return name, strategy, wrapper, evaluations


def test_predictions_with_the_cache_equal_those_without_bit_for_bit(evaluated):
    name, _, _, evaluations = evaluated
    for task, evaluation in enumerate(evaluations):
        assert torch.equal(evaluation["with_cache"], evaluation["without_cache"]), (name, task)


def test_an_evaluation_runs_the_encoder_only_on_new_item_prompt_pairs(evaluated):
    name, _, _, evaluations = evaluated
    seen_pairs: set[tuple[int, int, int]] = set()
    for evaluation in evaluations:
        pairs = {(*item, task) for item, task in evaluation["picked"].items()}
        items = len(evaluation["picked"])
        assert evaluation["uncached_rows"] == items  # without the cache: every item, always
        assert evaluation["cached_rows"] == len(pairs - seen_pairs), name
        seen_pairs |= pairs
    # after the last task: the new pairs only (the last task's items and the items whose
    # predicted task moved), fewer than the items evaluated
    last = evaluations[-1]
    assert last["cached_rows"] < len(last["picked"])
    total_cached = sum(e["cached_rows"] for e in evaluations)
    total_items = sum(len(e["picked"]) for e in evaluations)
    assert total_cached == len(seen_pairs) < total_items


def test_a_prompt_written_after_its_task_is_recomputed(evaluated, digits):
    name, strategy, wrapper, _ = evaluated
    stream = digits.benchmark.test_stream[:TASKS]
    recorder = next(p for p in strategy.plugins if isinstance(p, TaskRecorder))
    strategy.eval(stream)
    before, versions = wrapper.prompted_rows, list(strategy.prompted_cache.versions)
    strategy.eval(stream)
    assert wrapper.prompted_rows == before  # everything is cached now
    picked = list(recorder.picked.values())
    written = max(set(picked), key=picked.count)  # the prompt most inputs pick
    if name == "wave-cre":
        prompt = strategy.model.pools.pools[written].prompts
    else:
        prompt = strategy.model.prompts.prompts[written]
    with torch.no_grad():  # through .data: no autograd version counter sees this write
        prompt.data.add_(0.5)
    wrapper.rowwise = True
    strategy.eval(stream)
    with_cache = torch.cat(recorder.outputs)
    assert wrapper.prompted_rows - before == picked.count(written)
    expected = [v + (slot == written) for slot, v in enumerate(versions)]
    assert strategy.prompted_cache.versions == expected
    set_cache(strategy, False)
    strategy.eval(stream)
    set_cache(strategy, True)
    wrapper.rowwise = False
    assert torch.equal(with_cache, torch.cat(recorder.outputs))


def test_switched_off_the_cache_keeps_nothing(encoder, digits):
    strategy_class = STRATEGIES.get("hide-prompt")
    config = strategy_class.Config(**{**HIDE, "tii_epochs": 1, "tii_align_epochs": 1})
    strategy = strategy_class(
        encoder=encoder,
        num_classes=digits.num_classes,
        config=dataclasses.replace(config, prompted_cache=False),
        num_tasks=TASKS,
    )
    strategy.train(digits.benchmark.train_stream[0])
    strategy.eval(digits.benchmark.test_stream[:1])
    assert len(strategy.prompted_cache) == 0 and strategy.prompted_cache.computed == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hide-prompt", "wave-cre"])
def test_a_runs_accuracy_matrix_is_the_same_with_and_without_the_cache(name, tmp_path):
    from clbench.cli import main

    matrices = []
    for on in ("true", "false"):
        out = tmp_path / on
        arguments = ["run", "-s", name, "--scenario", "digits-offline", "--preset", "quick"]
        arguments += ["--device", "cpu", "--out", str(out), "--set", f"prompted_cache={on}"]
        assert main(arguments) == 0
        (matrix,) = Path(out).glob("*/*/*/accuracy_matrix.csv")
        matrices.append(np.genfromtxt(matrix, delimiter=","))
    np.testing.assert_array_equal(matrices[0], matrices[1])

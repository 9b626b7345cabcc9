"""The offline scenarios: fewrel-offline (and its shared FewRel helpers) and digits-offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clbench.data import fewrel_files, relation_tokens
from clbench.data.relation_tokens import encode_relation_examples
from clbench.data.relations import (
    load_fewrel_json,
    load_relation_names,
    split_relation_examples,
)
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import ScenarioSpec, check_task_count, split_into_tasks
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.scenarios.relation_extraction import FewRelOfflineOptions, fewrel_offline

FEWREL_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/fewrel/val_wiki.json"
needs_fewrel = pytest.mark.skipif(
    not FEWREL_FILE.is_file(), reason=f"FewRel val_wiki.json not present at {FEWREL_FILE}"
)


@pytest.fixture(scope="module")
def text_encoder():
    from clbench.encoders.zoo import TextOptions, minilm_l6

    return minilm_l6(TextOptions())


@pytest.fixture(scope="module")
def vision_encoder():
    from clbench.encoders.zoo import TinyViTOptions, vit_tiny_random

    return vit_tiny_random(TinyViTOptions())


@pytest.fixture(scope="module")
def shared_data_root(tmp_path_factory):
    """One data root for the tests on the real file, so it is tokenised once per module."""
    return tmp_path_factory.mktemp("clbench-data")


def marker_counts(inputs: torch.Tensor, encoder, marker: str) -> torch.Tensor:
    return (inputs == encoder.marker_ids[marker]).sum(dim=1)


def assert_one_of_each_marker(inputs: torch.Tensor, encoder) -> None:
    for marker in ("[E11]", "[E12]", "[E21]", "[E22]"):
        assert bool((marker_counts(inputs, encoder, marker) == 1).all()), marker


# ------------------------------------------------------------------ small synthetic file


def example(tokens: list[str], head: list[int], tail: list[int]) -> dict:
    return {
        "tokens": tokens,
        "h": [" ".join(tokens[i] for i in head), "Q1", [head]],
        "t": [" ".join(tokens[i] for i in tail), "Q2", [tail]],
    }


def small_fewrel() -> dict[str, list[dict]]:
    """4 relations x 10 examples, with a few awkward ones in relation P1."""
    words = "the quick brown fox jumps over the lazy dog near a river".split()
    data = {
        f"P{r}": [example(words, [1 + (i % 3)], [8 + (i % 3)]) for i in range(10)]
        for r in range(1, 5)
    }
    long = [f"word{i}" for i in range(200)]
    data["P1"][0] = example(long, [190, 191], [196])  # entities near the end
    data["P1"][1] = example(words, [8, 9], [1, 2])  # tail before head
    data["P1"][2] = example(long, [2], [195])  # too far apart for one window
    data["P1"][3] = example(words, [3, 4, 5], [4])  # tail nested in head
    return data


@pytest.fixture
def small_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    path = tmp_path / "small.json"
    path.write_text(json.dumps(small_fewrel()))
    return path


def small_options(path: Path, **changes) -> FewRelOfflineOptions:
    values = dict(data_file=str(path), num_experiences=2, max_length=32, n_train=4, n_val=2)
    return FewRelOfflineOptions(**{**values, "n_test": 3, **changes})


def test_small_scenario_counts_and_validation_split(small_file, text_encoder):
    scenario = fewrel_offline(small_options(small_file), text_encoder, seed=0)
    assert scenario.modality == "text"
    assert scenario.num_classes == 4 and scenario.num_experiences == 2
    assert scenario.class_names == ["P1", "P2", "P3", "P4"]  # no pid2name.json beside it
    for train, test in zip(scenario.benchmark.train_stream, scenario.benchmark.test_stream):
        assert len(train.dataset) == 2 * 4 and len(test.dataset) == 2 * 3
        x, _ = train.dataset[0]
        assert x.dtype == torch.long and x.shape == (32,)
    assert len(scenario.details["validation"]) == 4 * 2
    assert scenario.details["counts"] == {"train": 16, "val": 8, "test": 12}
    assert scenario.details["relation_ids"] == ["P1", "P2", "P3", "P4"]
    assert scenario.details["data_file"] == str(small_file)


def test_markers_truncation_and_entity_order(text_encoder):
    data = small_fewrel()
    stats: dict[str, int] = {}
    inputs = encode_relation_examples(data["P1"][:4], text_encoder, max_length=32, stats=stats)
    assert inputs.shape == (4, 32)
    assert_one_of_each_marker(inputs, text_encoder)
    assert stats == {"truncated_window": 1, "truncated_cut": 1}
    tokenizer = text_encoder.tokenizer
    assert bool((inputs[:, 0] == tokenizer.cls_token_id).all())

    def between(row: torch.Tensor, opener: str, closer: str) -> str:
        ids = row.tolist()
        start = ids.index(text_encoder.marker_ids[opener])
        return tokenizer.decode(ids[start + 1 : ids.index(text_encoder.marker_ids[closer])])

    # the long sentence keeps both entities, with their words, although they sit at the end
    assert between(inputs[0], "[E11]", "[E12]") == "word190 word191"
    assert between(inputs[0], "[E21]", "[E22]") == "word196"
    # tail before head: [E21] comes first
    pos = {m: inputs[1].tolist().index(i) for m, i in text_encoder.marker_ids.items()}
    assert pos["[E21]"] < pos["[E22]"] < pos["[E11]"] < pos["[E12]"]
    assert between(inputs[1], "[E11]", "[E12]") == "dog near"
    # far apart: the middle is cut, both entities survive
    assert between(inputs[2], "[E11]", "[E12]") == "word2"
    assert between(inputs[2], "[E21]", "[E22]") == "word195"
    # nested: [E11] fox [E21] jumps [E22] over [E12]
    pos = {m: inputs[3].tolist().index(i) for m, i in text_encoder.marker_ids.items()}
    assert pos["[E11]"] < pos["[E21]"] < pos["[E22]"] < pos["[E12]"]
    # short rows end with [SEP] then padding
    row = inputs[1].tolist()
    sep = row.index(tokenizer.sep_token_id)
    assert set(row[sep + 1 :]) == {text_encoder.pad_token_id}


def test_split_is_deterministic_and_disjoint():
    data = small_fewrel()
    first = split_relation_examples(data, seed=3, n_train=4, n_val=2, n_test=3)
    assert first == split_relation_examples(data, seed=3, n_train=4, n_val=2, n_test=3)
    shuffled_keys = dict(reversed(list(data.items())))
    assert first == split_relation_examples(shuffled_keys, seed=3, n_train=4, n_val=2, n_test=3)
    assert first != split_relation_examples(data, seed=4, n_train=4, n_val=2, n_test=3)
    for relation in data:
        parts = [first.train[relation], first.val[relation], first.test[relation]]
        assert [len(p) for p in parts] == [4, 2, 3]
        assert len(set().union(*parts)) == 9
    with pytest.raises(UsageError, match="P1.*10 examples"):
        split_relation_examples(data, seed=0, n_train=8, n_val=2, n_test=3)


def test_cache_is_reused(small_file, text_encoder, monkeypatch, tmp_path):
    first = fewrel_offline(small_options(small_file), text_encoder, seed=0)
    cache_file = Path(first.details["token_cache"])
    assert cache_file.is_file() and cache_file.parent == tmp_path / "data" / "cache"
    assert not list(cache_file.parent.glob("*.tmp"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache was there")

    monkeypatch.setattr(relation_tokens, "encode_relation_examples", no_encoding)
    second = fewrel_offline(small_options(small_file), text_encoder, seed=0)
    assert second.details["token_cache"] == str(cache_file)
    assert torch.equal(first.details["validation"].inputs, second.details["validation"].inputs)
    assert second.details["truncated"] == first.details["truncated"]
    fewrel_offline(small_options(small_file), text_encoder, seed=1)  # one cache for all seeds
    # another max_length is another cache entry, so it must encode
    with pytest.raises(AssertionError, match="re-tokenised"):
        fewrel_offline(small_options(small_file, max_length=40), text_encoder, seed=0)


def test_missing_file_says_where_and_how(tmp_path, monkeypatch, text_encoder):
    missing = tmp_path / "nowhere" / "val_wiki.json"
    with pytest.raises(DataNotFoundError, match=str(missing)) as info:
        fewrel_offline(FewRelOfflineOptions(data_file=str(missing)), text_encoder, seed=0)
    assert "thunlp/FewRel" in str(info.value) and "scenario.data_file" in str(info.value)
    with pytest.raises(DataNotFoundError, match=str(missing)):
        load_fewrel_json(missing)
    # the default lookup lists every place it tried
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(fewrel_files, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(DataNotFoundError) as info:
        fewrel_offline(FewRelOfflineOptions(), text_encoder, seed=0)
    assert str(tmp_path / "data" / "fewrel" / "val_wiki.json") in str(info.value)
    assert str(tmp_path / "shared" / "data" / "fewrel" / "val_wiki.json") in str(info.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"P1": [', "not valid JSON"),
        ("[1, 2]", "non-empty JSON object"),
        ('{"P1": []}', "non-empty list"),
        ('{"P1": [{"tokens": ["a"], "h": ["a", "Q", [[0]]]}]}', "'t'"),
        ('{"P1": [{"tokens": ["a"], "h": ["a", "Q", [[0]]], "t": ["a", "Q", [[5]]]}]}', "span"),
    ],
)
def test_malformed_json_is_a_usage_error(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=problem) as info:
        load_fewrel_json(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, DataNotFoundError)


def test_relation_names(tmp_path):
    path = tmp_path / "pid2name.json"
    path.write_text(json.dumps({"P177": ["crosses", "what it crosses"]}))
    assert load_relation_names(path) == {"P177": "crosses"}
    path.write_text(json.dumps({"P177": 3}))
    with pytest.raises(UsageError, match="P177"):
        load_relation_names(path)


def test_scenarios_refuse_the_wrong_modality(small_file, text_encoder, vision_encoder):
    with pytest.raises(UsageError, match="text backbone.*minilm-l6"):
        fewrel_offline(small_options(small_file), vision_encoder, seed=0)
    with pytest.raises(UsageError, match="vision backbone"):
        digits_offline(DigitsOptions(), text_encoder, seed=0)
    assert SCENARIOS.spec("fewrel-offline").default_backbone == "minilm-l6"
    assert SCENARIOS.spec("digits-offline").default_backbone == "vit-tiny-random"


def test_every_scenario_registers_a_typed_spec():
    protocols = {}
    for entry in SCENARIOS:
        assert isinstance(entry.spec, ScenarioSpec), entry.name
        for old_attribute in ("default_backbone", "data_status", "download", "check_options"):
            assert not hasattr(entry.target, old_attribute), (entry.name, old_attribute)
        protocols[entry.name] = entry.spec.protocol or entry.name
    assert protocols == {
        "5-datasets": "5-datasets",
        "digits-offline": "digits",
        "fewrel": "fewrel",
        "fewrel-offline": "fewrel",
        "imagenet-r": "imagenet-r",
        "split-cifar100": "split-cifar100",
        "split-cub200": "split-cub200",
        "tacred": "tacred",
    }
    assert SCENARIOS.spec("fewrel-offline").metrics == ("faa", "caa", "ffm", "seen")
    assert SCENARIOS.spec("digits-offline").family == "vision"
    assert SCENARIOS.spec("digits-offline").data_status is None  # built in


def test_one_task_count_check_keeps_every_message():
    check_task_count(10, 5)
    with pytest.raises(UsageError, match="cannot split 10 classes into 3 equal experiences"):
        split_into_tasks(list(range(10)), 3)
    with pytest.raises(UsageError, match=r"scenario x: cannot split 80 relations into 3 equal "):
        check_task_count(80, 3, "x", unit="relations")
    with pytest.raises(UsageError, match=r"100 classes into 0 equal tasks \(num_experiences must"):
        check_task_count(100, 0, "split-cifar100")


# --------------------------------------------------------------------- the real val_wiki


@needs_fewrel
def test_fewrel_offline_protocol(text_encoder, shared_data_root, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(shared_data_root))
    scenario = fewrel_offline(FewRelOfflineOptions(), text_encoder, seed=42)
    assert scenario.details["data_file"] == str(FEWREL_FILE)
    assert scenario.num_classes == 16 and scenario.num_experiences == 4
    assert [len(c) for c in scenario.classes_per_experience] == [4] * 4
    assert "crosses" in scenario.class_names  # names from pid2name.json beside the file
    streams = zip(scenario.benchmark.train_stream, scenario.benchmark.test_stream)
    for index, (train, test) in enumerate(streams):
        assert len(train.dataset) == 1680 and len(test.dataset) == 560
        assert sorted(set(train.dataset.targets)) == scenario.classes_per_experience[index]
    assert scenario.details["counts"] == {"train": 6720, "val": 2240, "test": 2240}
    validation = scenario.details["validation"]
    assert len(validation) == 2240 and validation.inputs.shape == (2240, 128)
    assert_one_of_each_marker(validation.inputs, text_encoder)
    train_inputs = torch.cat(
        [
            torch.stack([exp.dataset[i][0] for i in range(50)])
            for exp in scenario.benchmark.train_stream
        ]
    )
    assert_one_of_each_marker(train_inputs, text_encoder)


@needs_fewrel
def test_fewrel_offline_relation_order_follows_the_seed(
    text_encoder, shared_data_root, monkeypatch
):
    monkeypatch.setenv("CLBENCH_DATA", str(shared_data_root))
    a = fewrel_offline(FewRelOfflineOptions(), text_encoder, seed=42)
    b = fewrel_offline(FewRelOfflineOptions(), text_encoder, seed=42)
    c = fewrel_offline(FewRelOfflineOptions(), text_encoder, seed=7)
    assert a.classes_per_experience == b.classes_per_experience
    assert a.details["class_order"] == b.details["class_order"]
    assert a.classes_per_experience != c.classes_per_experience
    assert torch.equal(a.details["validation"].inputs, b.details["validation"].inputs)
    assert not torch.equal(a.details["validation"].inputs, c.details["validation"].inputs)


# ----------------------------------------------------------------------------- digits


def test_digits_offline(vision_encoder):
    scenario = digits_offline(DigitsOptions(), vision_encoder, seed=0)
    assert scenario.modality == "vision" and scenario.class_names == [str(c) for c in range(10)]
    assert scenario.num_experiences == 5
    assert all(len(c) == 2 for c in scenario.classes_per_experience)
    counts = scenario.details["counts"]
    assert counts["train"] + counts["test"] == 1797
    assert 0.19 < counts["test"] / 1797 < 0.21
    train_sizes = [len(e.dataset) for e in scenario.benchmark.train_stream]
    test_sizes = [len(e.dataset) for e in scenario.benchmark.test_stream]
    assert sum(train_sizes) == counts["train"] and sum(test_sizes) == counts["test"]
    x, y = scenario.benchmark.train_stream[0].dataset[0]
    assert x.shape == tuple(vision_encoder.input_size) and x.dtype == torch.float32
    assert int(y) in scenario.classes_per_experience[0]
    # the split ignores the run seed: the same test images, in another class order
    other = digits_offline(DigitsOptions(), vision_encoder, seed=1)
    assert other.classes_per_experience != scenario.classes_per_experience

    def test_images(s) -> list[tuple[int, float]]:
        return sorted(
            (int(y), round(float(x.sum()), 3))
            for e in s.benchmark.test_stream
            for x, y in (e.dataset[i] for i in range(len(e.dataset)))
        )

    assert test_images(scenario) == test_images(other)

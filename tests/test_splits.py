"""Uneven and base-plus-increment task splits: the rule, its checks (before any work),
every scenario taking them, relation files of other domains, and the metrics on
uneven tasks."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from clbench import cli, metrics
from clbench.data.splits import (
    TaskSplit,
    automatic_split,
    balanced_sizes,
    check_task_count,
    resolve_task_split,
)
from clbench.errors import UsageError
from clbench.registry import SCENARIOS, options_class
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.scenarios.relation_extraction import FewRelOptions, fewrel

# ------------------------------------------------------------------------------ the rule


def split(num_classes: int, **options) -> TaskSplit:
    return resolve_task_split(num_classes, scenario="x", **options)


def test_the_three_ways_to_split():
    assert split(100, num_experiences=10).sizes == (10,) * 10
    assert split(10, num_experiences=None, task_sizes=[4, 3, 3]).sizes == (4, 3, 3)
    b50 = split(100, num_experiences=None, initial_classes=50, increment=10)
    assert b50.sizes == (50, 10, 10, 10, 10, 10)
    assert b50.describe() == "B50-Inc10: 6 tasks of 50, 10, 10, 10, 10, 10 classes"
    assert split(10, num_experiences=5).describe() == "5 tasks x 2 classes"
    assert TaskSplit((4, 3, 3)).cut([7, 8, 1, 5, 3, 4, 2, 0, 9, 6]) == [
        [1, 5, 7, 8],
        [2, 3, 4],
        [0, 6, 9],
    ]


def test_the_automatic_choice_when_no_count_divides():
    # divisible: the most tasks <= 10 with >= 2 each (FewRel 80 -> 10 x 8, 16 -> 8 x 2)
    assert automatic_split(80, "x").sizes == (8,) * 10
    assert automatic_split(16, "x").sizes == (2,) * 8
    # 17 relations: nothing from 10 down to 2 divides them -> 8 tasks, larger first
    seventeen = automatic_split(17, "x", unit="relations")
    assert seventeen.sizes == (3, 2, 2, 2, 2, 2, 2, 2)
    assert "no task count from 10 down to 2 divides 17" in seventeen.reason
    assert automatic_split(23, "x").sizes == (3, 3, 3, 2, 2, 2, 2, 2, 2, 2)
    assert balanced_sizes(100, 7) == (15, 15, 14, 14, 14, 14, 14)
    with pytest.raises(UsageError, match="too few for 2 tasks"):
        automatic_split(3, "x")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"num_experiences": 3}, r"10 classes into 3 equal tasks.*task_sizes=4,3,3"),
        ({"num_experiences": 0}, "num_experiences must be at least 1"),
        ({"num_experiences": None}, "set scenario.num_experiences"),
        ({"num_experiences": None, "task_sizes": [4, 3, 2]}, "adds up to 9 classes, but there"),
        ({"num_experiences": None, "task_sizes": [10, 0]}, "at least one of the classes"),
        ({"num_experiences": 4, "task_sizes": [4, 3, 3]}, "num_experiences=4 disagrees"),
        ({"num_experiences": None, "initial_classes": 4}, "go together and must be >= 1"),
        ({"num_experiences": None, "initial_classes": 10, "increment": 2}, "leaves no classes"),
        (
            {"num_experiences": None, "initial_classes": 6, "increment": 3},
            "4 remain: not a whole number of tasks of 3; set scenario.task_sizes=6,3,1",
        ),
        (
            {"num_experiences": None, "task_sizes": [5, 5], "initial_classes": 5, "increment": 5},
            "set one of them",
        ),
    ],
)
def test_impossible_splits_say_why(options, problem):
    with pytest.raises(UsageError, match=problem):
        split(10, **options)


def test_the_default_task_count_does_not_conflict():
    """num_experiences at its declared default was not chosen: task_sizes replaces it."""
    assert DigitsOptions(task_sizes=[4, 3, 3]).task_split(10, "d").sizes == (4, 3, 3)
    assert DigitsOptions(num_experiences=3, task_sizes=[4, 3, 3]).task_split(10, "d").num_tasks
    with pytest.raises(UsageError, match="num_experiences=2 disagrees"):
        DigitsOptions(num_experiences=2, task_sizes=[4, 3, 3]).task_split(10, "d")
    check_task_count(10, 5)


def test_split_options_are_recorded_only_when_used():
    """config.json of a run on the default split is the one recorded before the options
    existed; a run that uses them records them, and reads back."""
    assert DigitsOptions().to_dict() == {"num_experiences": 5}
    used = DigitsOptions(task_sizes=[4, 3, 3])
    assert used.to_dict() == {"num_experiences": 5, "task_sizes": [4, 3, 3]}
    assert DigitsOptions(**used.to_dict()) == used
    assert "exclude_relations" not in FewRelOptions().to_dict()
    assert list(FewRelOptions().to_dict())[:3] == ["data_file", "num_experiences", "max_length"]


@pytest.mark.parametrize("name", sorted(entry.name for entry in SCENARIOS))
def test_every_scenario_takes_the_split_options_and_checks_them_first(name):
    options_type = options_class(SCENARIOS.get(name))
    names = {field.name for field in dataclasses.fields(options_type)}
    assert {"num_experiences", "task_sizes", "initial_classes", "increment"} <= names
    spec = SCENARIOS.spec(name)
    assert spec.check_options is not None and spec.describe is not None
    # task sizes that add up to no class count: refused without any data
    with pytest.raises(UsageError, match="adds up to 1 "):
        spec.check_options(options_type(task_sizes=[1]))
    assert "tasks" in spec.describe(options_type())


def test_impossible_splits_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    for setting, problem in (
        ("scenario.task_sizes=4,3,2", "task_sizes=4,3,2 adds up to 9 classes, but there are 10"),
        ("scenario.num_experiences=4", "for 4 uneven tasks set scenario.task_sizes=3,3,2,2"),
    ):
        argv = ["run", "-s", "seq-ft", "-c", "digits-offline", "--device", "cpu"]
        code = cli.main([*argv, "--set", setting, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1
    argv = ["run", "-s", "seq-ft", "-c", "fewrel", "--out", str(out), "--set"]
    code = cli.main([*argv, "scenario.initial_classes=30", "--set", "scenario.increment=20"])
    assert code == 2 and "50 remain: not a whole number of tasks of 20" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- a scenario, uneven


def test_uneven_digits_and_the_printed_choice(tiny_vit, capsys):
    scenario = digits_offline(DigitsOptions(task_sizes=[4, 3, 3]), tiny_vit, seed=0)
    assert [len(c) for c in scenario.classes_per_experience] == [4, 3, 3]
    assert scenario.classes_per_experience == [[1, 5, 7, 8], [2, 3, 4], [0, 6, 9]]
    sizes = [len(e.dataset) for e in scenario.benchmark.test_stream]
    assert sizes == [143, 108, 108] and sum(sizes) == scenario.details["counts"]["test"]
    assert scenario.details["task_split"]["sizes"] == [4, 3, 3]
    assert "digits-offline: 10 classes in 3 tasks of 4, 3, 3 classes" in capsys.readouterr().out
    base = digits_offline(DigitsOptions(initial_classes=4, increment=2), tiny_vit, seed=0)
    assert [len(c) for c in base.classes_per_experience] == [4, 2, 2, 2]
    # the same class order: the splits only cut it differently
    flat = [c for task in scenario.classes_per_experience for c in task]
    assert sorted(flat[:4]) == base.classes_per_experience[0]


# ------------------------------------------------------- relation files of other domains


def relation_file(path: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    data = {}
    for relation, count in sizes.items():
        rows = []
        for _ in range(count):
            words = [rng.choice(["cell", "gene", "dose", "drug", "liver"]) for _ in range(10)]
            rows.append(
                {"tokens": words, "h": [words[1], "C1", [[1]]], "t": [words[7], "C2", [[7]]]}
            )
        data[relation] = rows
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def domain_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    return tmp_path


def test_a_17_relation_domain_file(domain_root, minilm, capsys):
    """FewRel-format, <= 100 sentences a relation, names unknown to pid2name: 17
    relations -> 8 tasks of 3, 2, ..., 2; 60 / 20 / 20 of the smallest relation."""
    sizes = {f"may_treat_{i}": 100 for i in range(16)} | {"rare_relation": 45}
    path = relation_file(domain_root / "pubmed_like.json", sizes)
    (domain_root / "pid2name.json").write_text(json.dumps({"P17": ["country", "..."]}))
    options = FewRelOptions(data_file=str(path), max_length=24, download=False)
    scenario = fewrel(options, minilm, seed=0)
    out = capsys.readouterr().out
    assert [len(c) for c in scenario.classes_per_experience] == [3, 2, 2, 2, 2, 2, 2, 2]
    assert "fewrel: 17 relations in 8 tasks of 3, 2, 2, 2, 2, 2, 2, 2 relations" in out
    assert "no task count from 10 down to 2 divides 17" in out
    # the smallest relation (45) sizes every relation's split: 27 / 9 / 9
    assert scenario.details["per_relation"] == {"train": 27, "val": 9, "test": 9}
    assert "the smallest with 45 sentences: 27 train / 9 validation / 9 test" in out
    assert "rare_relation" in scenario.class_names  # not in pid2name: its id
    sizes_per_task = [len(e.dataset) for e in scenario.benchmark.test_stream]
    assert sizes_per_task == [27, 18, 18, 18, 18, 18, 18, 18]
    # an explicit split of the same file, and relations left out
    explicit = fewrel(dataclasses.replace(options, task_sizes=[5, 4, 4, 4]), minilm, seed=0)
    assert [len(c) for c in explicit.classes_per_experience] == [5, 4, 4, 4]
    fewer = fewrel(dataclasses.replace(options, exclude_relations=["rare_relation"]), minilm, 0)
    assert fewer.num_classes == 16 and fewer.details["per_relation"]["train"] == 60
    assert fewer.details["token_cache"] != scenario.details["token_cache"]


def test_a_relation_below_the_minimum_is_named(domain_root, minilm):
    sizes = {f"R{i}": 30 for i in range(6)} | {"tiny": 4, "small": 8}
    path = relation_file(domain_root / "domain.json", sizes)
    options = FewRelOptions(data_file=str(path), max_length=24, download=False)
    with pytest.raises(UsageError) as info:
        fewrel(options, minilm, seed=0)
    message = str(info.value)
    assert "2 relation(s) of domain.json have fewer than 10 sentences" in message
    assert "tiny (4), small (8)" in message and "scenario.exclude_relations" in message
    lowered = fewrel(dataclasses.replace(options, min_per_relation=4), minilm, seed=0)
    assert lowered.details["per_relation"] == {"train": 2, "val": 1, "test": 1}
    with pytest.raises(UsageError, match="min_per_relation must be at least 3"):
        fewrel(dataclasses.replace(options, min_per_relation=2), minilm, seed=0)


# -------------------------------------------------------------- metrics on uneven tasks


def test_metrics_on_uneven_tasks():
    """FAA / CAA / FFM average over tasks; the seen-class accuracy over test items."""
    accuracy = np.array([[40.0, np.nan, np.nan], [20.0, 50.0, np.nan], [10.0, 30.0, 60.0]])
    counts = np.array([[200, 0, 0], [200, 50, 0], [200, 50, 50]])
    correct = np.nan_to_num(accuracy) / 100 * counts
    summary = metrics.summarise(accuracy, correct, counts)
    assert summary["faa"] == pytest.approx((10 + 30 + 60) / 3)
    assert summary["ffm"] == pytest.approx(((40 - 10) + (50 - 30)) / 2)
    assert summary["caa"] == pytest.approx((40 + 35 + 100 / 3) / 3)
    # pooled: (20 + 15 + 30) / 300, not the task mean
    assert summary["seen_accuracy"][-1] == pytest.approx(100 * (20 + 15 + 30) / 300)
    assert summary["seen_accuracy"][1] == pytest.approx(100 * (40 + 25) / 250)


def test_an_uneven_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["run", "-s", "seq-ft", "-c", "digits-offline", "--preset", "quick", "--device"]
    code = cli.main([*argv, "cpu", "--set", "scenario.task_sizes=4,3,3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    (folder,) = (out / "digits-offline" / "seq-ft").iterdir()
    config = json.loads((folder / "config.json").read_text())
    assert config["scenario_options"]["task_sizes"] == [4, 3, 3]
    summary = json.loads((folder / "metrics.json").read_text())
    records = json.loads((folder / "progress.json").read_text())
    last = records[-1]
    assert last["counts"] == [143, 108, 108]
    assert summary["faa"] == pytest.approx(np.mean(last["accuracy"]))
    assert summary["seen_accuracy"][-1] == pytest.approx(
        100 * sum(last["correct"]) / sum(last["counts"])
    )

"""Metrics against hand computations; typed options and --set parsing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

from clbench import metrics
from clbench.config import Options, apply_overrides, describe, option, parse_set_arguments
from clbench.errors import UsageError

# A[t, i] for 3 tasks
A = np.array(
    [
        [90.0, 10.0, 0.0],
        [70.0, 80.0, 5.0],
        [60.0, 85.0, 75.0],
    ]
)


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(A) == pytest.approx((60 + 85 + 75) / 3)
    assert metrics.final_average_accuracy(A[:2]) == pytest.approx((70 + 80) / 2)


def test_average_incremental_accuracy():
    expected = (90 + (70 + 80) / 2 + (60 + 85 + 75) / 3) / 3
    assert metrics.average_incremental_accuracy(A) == pytest.approx(expected)


def test_forgetting_uses_the_best_accuracy_not_the_diagonal():
    # task 0: max 90 -> 60 = 30; task 1: max(80, 85) = 85 -> 85 = 0 (Avalanche would say -5)
    assert metrics.final_forgetting(A) == pytest.approx((30 + 0) / 2)
    assert metrics.final_forgetting(A[:1]) == 0.0
    # accuracy before a task was learned does not count as "best"
    before = np.array([[50.0, 99.0], [40.0, 60.0]])
    assert metrics.final_forgetting(before) == pytest.approx(10.0)


def test_seen_accuracy_is_sample_weighted():
    correct = np.array([[9, 0, 0], [5, 40, 0], [4, 30, 10]])
    counts = np.array([10, 50, 20])
    assert metrics.seen_accuracy(correct, counts) == pytest.approx(
        [90.0, 100 * 45 / 60, 100 * 44 / 80]
    )


# The same run evaluated on the seen test experiences only: None (null in progress.json)
# where A had the entries of tasks not trained yet
A_SEEN = [
    [90.0, None, None],
    [70.0, 80.0, None],
    [60.0, 85.0, 75.0],
]


def test_metrics_of_a_run_that_evaluated_only_the_seen_tasks():
    seen = np.array(A_SEEN, dtype=float)  # None -> NaN, as RunFolder reads progress.json
    assert np.isnan(seen[0, 1]) and np.isnan(seen[1, 2])
    # by hand: FAA (60 + 85 + 75) / 3; CAA (90 + 75 + 220 / 3) / 3;
    # FFM: task 0 best 90 -> 60 = 30, task 1 best 85 -> 85 = 0
    assert metrics.final_average_accuracy(seen) == pytest.approx(220 / 3)
    assert metrics.average_incremental_accuracy(seen) == pytest.approx((90 + 75 + 220 / 3) / 3)
    assert metrics.average_accuracy_curve(seen).tolist() == pytest.approx([90, 75, 220 / 3])
    assert metrics.forgetting_terms(seen).tolist() == [30.0, 0.0]
    assert metrics.final_forgetting(seen) == pytest.approx(15.0)
    # and exactly what the same run gives when the unseen entries hold numbers instead
    for name in ("final_average_accuracy", "average_incremental_accuracy", "final_forgetting"):
        assert getattr(metrics, name)(seen) == getattr(metrics, name)(A), name
    # partial runs (the metrics.json of a run still going) read no unseen entry either
    assert metrics.final_average_accuracy(seen[:1]) == 90.0
    assert metrics.final_forgetting(seen[:2]) == pytest.approx(20.0)


def test_seen_accuracy_with_counts_per_row_and_unevaluated_entries():
    correct = np.array([[9, None, None], [5, 40, None], [4, 30, 10]], dtype=float)
    counts = np.array([[10, None, None], [10, 50, None], [10, 50, 20]], dtype=float)
    expected = [90.0, 100 * 45 / 60, 100 * 44 / 80]
    assert metrics.seen_accuracy(correct, counts) == pytest.approx(expected)
    # one counts row for all experiences (runs made before) gives the same numbers
    assert metrics.seen_accuracy(correct, np.array([10, 50, 20])) == pytest.approx(expected)
    summary = metrics.summarise(np.array(A_SEEN, dtype=float), correct, counts)
    assert summary["seen_accuracy"] == pytest.approx(expected)
    assert summary["faa"] == pytest.approx(220 / 3) and summary["experiences_finished"] == 3


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError):
        metrics.final_average_accuracy(np.zeros((3, 2)))


@dataclass
class Example(Options):
    pool_size: int = option(10, "prompts in the pool", symbol="M")
    lr: float = option(0.1, "learning rate")
    flag: bool = option(False, "a switch")
    mode: Literal["a", "b"] = option("a", "a choice")
    path: str | None = option(None, "optional path")


def test_overrides_are_parsed_by_type():
    parsed = apply_overrides(
        Example(),
        {"pool_size": "20", "lr": "1e-3", "flag": "true", "mode": "b", "path": "x"},
        what="example",
    )
    assert parsed == Example(20, 1e-3, True, "b", "x")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "abc", "lr=abc: expected float"),
        ("pool_size", "1.5", "expected int"),
        ("flag", "maybe", "expected a boolean"),
        ("mode", "c", "expected one of a, b"),
        (
            "nope",
            "1",
            "unknown example option 'nope'; valid options: flag, lr, mode, path, pool_size",
        ),
    ],
)
def test_bad_overrides_name_the_key_and_the_type(key, value, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        apply_overrides(Example(), {key: value}, what="example")


def test_set_arguments_are_grouped_by_component():
    grouped = parse_set_arguments(["lr=0.1", "scenario.num_experiences=2", "backbone.path=/x"])
    assert grouped == {
        "strategy": {"lr": "0.1"},
        "scenario": {"num_experiences": "2"},
        "backbone": {"path": "/x"},
    }
    with pytest.raises(UsageError, match="expected key=value"):
        parse_set_arguments(["lr"])


def test_describe_shows_the_paper_symbol():
    rows = {name: help_text for name, _, _, help_text in describe(Example)}
    assert rows["pool_size"] == "(M) prompts in the pool"

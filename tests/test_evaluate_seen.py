"""The run loop evaluates only the seen test experiences unless asked for all of them.

After experience t the classes of tasks t+1.. are masked, so their accuracy is 0 by
construction: evaluate="seen" (the default) skips them and records them as not evaluated
(null), evaluate="all" keeps the old zeros for forward-transfer studies. Real runs of l2p
on digits-offline (5 tasks) with the tiny random ViT (``--preset quick``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from avalanche.core import SupervisedPlugin

from clbench import runner
from clbench.errors import UsageError
from clbench.results import RunFolder
from clbench.runner import RunRequest, execute, new_run_folder, resolve_run

TASKS = 5  # digits-offline's default


class EvaluationCounter(SupervisedPlugin):
    """Evaluation iterations and items per test experience, over the whole run."""

    def __init__(self) -> None:
        super().__init__()
        self.iterations = 0
        self.items = 0
        self.passes: list[int] = []  # test experience of each experience evaluation

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.passes.append(int(strategy.experience.current_experience))

    def after_eval_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.iterations += 1
        self.items += int(strategy.mb_y.shape[0])


def request(**fields: Any) -> RunRequest:
    return RunRequest(strategy="l2p", scenario="digits-offline", preset="quick", device="cpu",
                      **fields)  # fmt: skip


def counted_run(out: Path, **fields: Any) -> tuple[RunFolder, EvaluationCounter]:
    counter = EvaluationCounter()
    build = runner.build_components

    def with_counter(config: dict[str, Any]) -> Any:
        strategy, scenario = build(config)
        strategy.plugins.append(counter)
        return strategy, scenario

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "build_components", with_counter)
        config = resolve_run(request(**fields))
        folder = execute(new_run_folder(out, config), config, echo=lambda line: None)
    return folder, counter


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunFolder, Any]]:
    root = tmp_path_factory.mktemp("evaluate")
    return {
        "default": counted_run(root / "default"),
        "all": counted_run(root / "all", evaluate="all"),
    }


def unseen(t: int, i: int) -> bool:
    return i > t


def test_seen_is_the_default_and_unseen_entries_are_null(runs) -> None:
    folder, _ = runs["default"]
    assert folder.config()["evaluate"] == "seen"
    progress = json.loads((folder.path / "progress.json").read_text())
    assert len(progress) == TASKS
    for t, record in enumerate(progress):
        for key in ("accuracy", "correct", "counts"):
            assert [v is None for v in record[key]] == [unseen(t, i) for i in range(TASKS)], key
    # an empty cell in the CSV, not 0
    rows = (folder.path / "accuracy_matrix.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1:].count("") for row in rows] == [4, 3, 2, 1, 0]
    matrix = folder.accuracy_matrix()
    assert np.isnan(matrix[np.triu_indices(TASKS, 1)]).all()
    assert not np.isnan(matrix[np.tril_indices(TASKS)]).any()


def test_all_keeps_the_zeros_and_every_metric_is_the_same(runs) -> None:
    seen, _ = runs["default"]
    every, _ = runs["all"]
    assert every.config()["evaluate"] == "all"
    matrix = every.accuracy_matrix()
    assert np.all(matrix[np.triu_indices(TASKS, 1)] == 0)  # unseen classes are never predicted
    assert all(None not in r.counts for r in every.records())
    lower = np.tril_indices(TASKS)
    np.testing.assert_array_equal(seen.accuracy_matrix()[lower], matrix[lower])  # bit for bit
    assert [r.correct[: r.experience + 1] for r in seen.records()] == [
        r.correct[: r.experience + 1] for r in every.records()
    ]
    for key in ("faa", "caa", "ffm", "seen_accuracy", "experiences_finished"):
        assert seen.metrics()[key] == every.metrics()[key], key


def test_seen_evaluates_fewer_passes(runs) -> None:
    _, seen = runs["default"]
    _, every = runs["all"]
    # after task t: test experiences 0..t, instead of all TASKS of them after every task
    assert seen.passes == [i for t in range(TASKS) for i in range(t + 1)]  # 15 of 25
    assert every.passes == list(range(TASKS)) * TASKS
    assert seen.iterations < every.iterations
    folder, _ = runs["default"]
    # the items evaluated are the items the records count, and no more
    assert seen.items == sum(n for r in folder.records() for n in r.counts if n is not None)
    assert every.items == sum(sum(r.counts) for r in runs["all"][0].records())
    assert seen.items < every.items


def test_an_unknown_mode_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown evaluate 'some'; valid choices: seen, all"):
        resolve_run(request(evaluate="some"))


def interrupted_run(out: Path, **fields: Any) -> RunFolder:
    """A run stopped (Ctrl-C) after its first finished experience."""
    original = runner.RunFolder.append_record

    def interrupt(self: RunFolder, record: Any) -> None:
        original(self, record)
        raise KeyboardInterrupt

    config = resolve_run(request(**fields))
    folder = new_run_folder(out, config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.RunFolder, "append_record", interrupt)
        with pytest.raises(KeyboardInterrupt):
            execute(folder, config, echo=lambda line: None)
    assert len(folder.records()) == 1
    return folder


def test_a_resumed_run_keeps_its_mode(runs, tmp_path: Path) -> None:
    folder = interrupted_run(tmp_path / "seen")
    execute(folder, resume=True, echo=lambda line: None)
    np.testing.assert_array_equal(folder.accuracy_matrix(), runs["default"][0].accuracy_matrix())
    assert folder.records()[-1].accuracy == runs["default"][0].records()[-1].accuracy


def test_a_run_made_before_the_option_resumes_evaluating_all(runs, tmp_path: Path) -> None:
    folder = interrupted_run(tmp_path / "old", evaluate="all")
    config = folder.config()
    del config["evaluate"]  # as config.json was written before the option existed
    folder.write_config(config)
    execute(folder, resume=True, echo=lambda line: None)
    np.testing.assert_array_equal(folder.accuracy_matrix(), runs["all"][0].accuracy_matrix())
    assert "evaluate" not in folder.config()

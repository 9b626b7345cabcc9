"""Entries not evaluated (evaluate="seen": the unseen test experiences) in run folders
and the tables: null in progress.json, an empty CSV cell, and every number of every table
the same as for a run that recorded zeros there (runs made before, or evaluate="all")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from run_folders import write_run

from clbench.reporting.display import TableRequest, build_tables
from clbench.reporting.render import render
from clbench.reporting.runs import load_runs
from clbench.results import RunFolder, write_run_folder


def make_run(root: Path, scenario: str, strategy: str, seed: int, accuracy, **kwargs) -> Path:
    tasks = len(accuracy[0])
    config = {
        "clbench_version": "0.1.0", "protocol_version": 1, "strategy": strategy,
        "scenario": scenario, "backbone": kwargs.pop("backbone", "vit-tiny-random"),
        "seed": seed, "preset": "default", "device": "cpu", "strategy_options": {"lr": 0.01},
        "scenario_options": {"num_experiences": tasks}, "backbone_options": {},
    }  # fmt: skip
    folder = root / scenario / strategy / f"{config['backbone']}_seed{seed}_x"
    counts = kwargs.pop("counts", [100] * tasks)
    return write_run(folder, config, accuracy, counts, **kwargs)


def test_entries_not_evaluated_are_null_and_empty_cells_not_zeros(tmp_path: Path) -> None:
    # evaluate="seen" (the default): after task 0 test task 1 was not evaluated
    config = {"strategy": "l2p", "scenario": "fewrel-offline", "backbone": "b", "seed": 0}
    seen = Path(write_run_folder(tmp_path / "seen", config, [[90, None], [80, 76]], [50, 150]))
    zeros = Path(write_run_folder(tmp_path / "zeros", config, [[90, 0], [80, 76]], [50, 150]))
    assert (seen / "accuracy_matrix.csv").read_text() == (
        "after,exp0,exp1\n0,90.0000,\n1,80.0000,76.0000\n"
    )
    progress = json.loads((seen / "progress.json").read_text())
    assert [(r["accuracy"], r["correct"], r["counts"]) for r in progress] == [
        ([90.0, None], [45, None], [50, None]),
        ([80.0, 76.0], [40, 114], [50, 150]),
    ]
    assert '"accuracy": [\n      90.0,\n      null\n    ]' in (seen / "progress.json").read_text()
    matrix = RunFolder(seen).accuracy_matrix()
    assert np.isnan(matrix[0, 1]) and matrix[1, 1] == 76.0
    # every metric, the seen-class accuracy included, is that of the run with zeros:
    # FAA (80 + 76) / 2, seen (40 + 114) / 200 after the last task
    written = json.loads((seen / "metrics.json").read_text())
    assert written == json.loads((zeros / "metrics.json").read_text())
    assert written["faa"] == 78.0 and written["seen_accuracy"] == [90.0, 77.0]
    assert written["ffm"] == 10.0 and written["caa"] == pytest.approx((90 + 78) / 2)


def _not_evaluated(matrix: list[list[float]]) -> list[list[float | None]]:
    """The matrix as a run that evaluates only the seen tasks records it."""
    return [[a if i <= t else None for i, a in enumerate(row)] for t, row in enumerate(matrix)]


def test_tables_read_runs_of_seen_tasks_only_as_runs_with_zeros(tmp_path: Path) -> None:
    trees = {}
    for name, entries in (("zeros", lambda m: m), ("seen", _not_evaluated)):
        root = trees[name] = tmp_path / name
        for seed, matrix in enumerate([[[90, 0, 0], [80, 70, 0], [70, 60, 80]],
                                       [[92, 0, 0], [84, 72, 0], [74, 66, 78]]]):  # fmt: skip
            make_run(root, "digits-offline", "l2p", seed, entries(matrix))
            make_run(root, "fewrel-offline", "l2p", seed, entries(matrix), counts=[50, 150, 100],
                     backbone="minilm-l6")  # fmt: skip
        make_run(root, "digits-offline", "seq-ft", 0, entries([[95, 0, 0], [40, 90, 0]]),
                 state="interrupted")  # fmt: skip

    def outputs(root: Path) -> list[str]:
        request = TableRequest(paths=[root], per_task=True, reference=True,
                               include_incomplete=True)  # fmt: skip
        return [render(build_tables(request), form) for form in ("markdown", "latex", "json")]

    assert outputs(trees["seen"]) == [
        text.replace(str(trees["zeros"]), str(trees["seen"])) for text in outputs(trees["zeros"])
    ]
    runs = load_runs([trees["seen"]], with_matrix=True).sort_values("path")
    digits = runs[(runs["scenario"] == "digits-offline") & (runs["strategy"] == "l2p")]
    # by hand: FAA (70 + 60 + 80) / 3 and (74 + 66 + 78) / 3; FFM ((90 - 70) + (70 - 60)) / 2
    # and ((92 - 74) + (72 - 66)) / 2
    assert digits["faa"].tolist() == pytest.approx([70.0, 218 / 3])
    assert digits["ffm"].tolist() == pytest.approx([15.0, 12.0])
    fewrel = runs[runs["scenario"] == "fewrel-offline"].iloc[0]
    # pooled over 50, 150 and 100 test items: 90 % of 50, then (40 + 105) of 200, ...
    pooled = (90.0, 100 * (40 + 105) / 200, 100 * (35 + 90 + 80) / 300)
    assert fewrel["seen_curve"] == pytest.approx(pooled)
    assert fewrel["seen"] == pytest.approx(pooled[-1])
    assert np.isnan(digits.iloc[0]["matrix"][0, 1])

"""Each experience records how many parameters its optimiser trained, and tables show it.

Real runs on digits-offline (tiny random ViT, --preset quick): l2p trains its pool (prompts
and keys) and head every task, so the count is the same per task and equals the sizes of
those tensors; hide-prompt trains one task's prefix and the head, not the other slots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from clbench import runner
from clbench.cli import main
from clbench.reporting.runs import load_runs
from clbench.results import RunFolder
from clbench.runner import RunRequest, execute, new_run_folder, resolve_run


def run(out: Path, strategy: str, **options: Any) -> tuple[RunFolder, Any]:
    built: dict[str, Any] = {}
    build = runner.build_components

    def keep(config: dict[str, Any]) -> Any:
        built["strategy"], scenario = build(config)
        return built["strategy"], scenario

    request = RunRequest(strategy=strategy, scenario="digits-offline", preset="quick",
                         device="cpu", scenario_overrides={"task_sizes": "4,3,3"},
                         strategy_overrides=options)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "build_components", keep)
        config = resolve_run(request)
        folder = execute(new_run_folder(out, config), config, echo=lambda line: None)
    return folder, built["strategy"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_l2p_records_its_pool_and_head(tmp_path: Path) -> None:
    folder, strategy = run(tmp_path, "l2p")
    model = strategy.model
    expected = sum(p.numel() for p in [*model.prompt_pool.parameters(), *model.head.parameters()])
    assert [r.trained_parameters for r in folder.records()] == [expected] * 3
    runs = load_runs([tmp_path])
    assert runs["params"].tolist() == [pytest.approx(expected / 1000)]


def test_hide_prompt_counts_one_task_slot_not_the_pool(tmp_path: Path) -> None:
    folder, strategy = run(tmp_path, "hide-prompt")
    model = strategy.model
    one_slot = model.prompts.prompts[0].numel()
    head = sum(p.numel() for p in model.head.parameters())
    assert [r.trained_parameters for r in folder.records()] == [one_slot + head] * 3
    assert len(model.prompts.prompts) == 3  # the other slots exist and are not counted


def test_the_table_shows_params_and_a_run_made_before_leaves_it_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, strategy = run(tmp_path / "new", "seq-ft")
    head = sum(p.numel() for p in strategy.model.head.parameters())
    old = tmp_path / "old" / "run"
    old.parent.mkdir()
    shutil.copytree(folder.path, old)
    progress = json.loads((old / "progress.json").read_text())
    for entry in progress:
        del entry["trained_parameters"]  # as written before the field existed
    (old / "progress.json").write_text(json.dumps(progress))
    runs = load_runs([tmp_path])
    assert sorted(runs["params"].fillna(-1).tolist()) == [-1, pytest.approx(head / 1000)]
    assert main(["table", str(tmp_path / "new"), "--metrics", "faa,params"]) == 0
    out = capsys.readouterr().out
    assert "Params/task (K)" in out and f"{head / 1000:.2f}" in out

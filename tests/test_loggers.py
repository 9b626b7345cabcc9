"""``clbench run --logger``: Avalanche's own loggers, fed the numbers the run records.

Real tiny runs (seq-ft on the bundled digits, the tiny random ViT, CPU): the TensorBoard
event file is read back with TensorBoard's own reader and must hold the run's accuracy
matrix, FAA and FFM; a run killed in the middle of an experience and resumed must leave
the same logs as an unbroken one.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from clbench.cli import main
from clbench.errors import UsageError
from clbench.results import RunFolder
from clbench.run_loggers import parse_logger_kinds

EPOCHS, TASKS = 2, 3
SPLIT = "scenario.task_sizes=4,3,3"  # the digits' 10 classes in 3 uneven tasks


def tiny(epochs: int = EPOCHS, split: str = SPLIT) -> list[str]:
    """seq-ft on the digits with a 2-block tiny random ViT: seconds on an idle CPU."""
    return [
        *("-s", "seq-ft", "-c", "digits-offline", "--preset", "quick", "--device", "cpu"),
        *("--seed", "3", "--set", f"epochs={epochs}", "--set", split),
        *("--set", "backbone.depth=2", "--set", "backbone.embed_dim=32"),
    ]


TINY = tiny()


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/*/config.json"))


def usage_errors(stderr: str) -> list[str]:
    """The error lines among the progress lines a run prints on standard error."""
    return [line for line in stderr.splitlines() if line.startswith("clbench: error: ")]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard log folder, as TensorBoard shows them (events
    a resumed run purged are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logged")
    assert (
        main(["run", *TINY, "--logger", "tensorboard,csv", "--logger", "text", "--out", str(out)])
        == 0
    )
    (folder,) = run_dirs(out)
    return folder


def test_logger_names_repeat_or_come_as_lists():
    assert parse_logger_kinds(["tensorboard,CSV", "text", "csv"]) == ["tensorboard", "csv", "text"]
    assert parse_logger_kinds([]) == []
    with pytest.raises(UsageError, match="valid choices: tensorboard, wandb, csv, text"):
        parse_logger_kinds(["tensorboard,nope"])
    with pytest.raises(UsageError, match="give a logger name"):
        parse_logger_kinds([","])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorboard,nope", "unknown logger 'nope'; valid choices: tensorboard, wandb, csv, text"),
        ("", "give a logger name; valid choices: tensorboard, wandb, csv, text"),
    ],
)
def test_a_bad_logger_is_one_line_and_writes_nothing(value, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", *TINY, "--logger", value, "--out", str(out)]) == 2
    (error,) = usage_errors(capsys.readouterr().err)
    assert message in error
    assert not out.exists()


def test_wandb_without_the_package_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "out"
    assert main(["run", *TINY, "--logger", "wandb", "--out", str(out)]) == 2
    (error,) = usage_errors(capsys.readouterr().err)
    assert 'pip install -e ".[wandb]"' in error
    assert not out.exists()


def test_resume_takes_no_logger_option(logged_run, capsys):
    assert main(["run", "--resume", str(logged_run), "--logger", "csv"]) == 2
    assert "give no other options" in capsys.readouterr().err


def test_tensorboard_holds_the_accuracy_matrix_faa_and_ffm(logged_run):
    folder = RunFolder(logged_run)
    assert folder.config()["loggers"] == ["tensorboard", "csv", "text"]
    matrix = folder.accuracy_matrix()
    summary = folder.metrics()
    series = scalars(logged_run / "logs" / "tensorboard")
    # the x axis is the number of training epochs done: (t + 1) * EPOCHS after experience t
    steps = [(t + 1) * EPOCHS for t in range(TASKS)]
    for i in range(TASKS):
        logged = series[f"clbench/accuracy/exp{i}"]
        assert [step for step, _ in logged] == steps[i:]
        expected = [matrix[t, i] for t in range(i, TASKS)]
        np.testing.assert_allclose([value for _, value in logged], expected, rtol=1e-6)
        # Avalanche's own name and unit (a fraction) for the same entries
        fraction = series[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{i:03d}"]
        np.testing.assert_allclose([v for _, v in fraction], np.array(expected) / 100, rtol=1e-6)
    for tag, key in (("clbench/FAA", "faa"), ("clbench/CAA", "caa"), ("clbench/FFM", "ffm")):
        last_step, last_value = series[tag][-1]
        assert last_step == steps[-1]
        assert last_value == pytest.approx(summary[key], rel=1e-6)
    losses = series["Loss_Epoch/train_phase/train_stream"]
    assert [step for step, _ in losses] == list(range(1, TASKS * EPOCHS + 1))
    assert all(np.isfinite(value) and value > 0 for _, value in losses)


def test_csv_and_text_logs_hold_the_same_numbers(logged_run):
    matrix = RunFolder(logged_run).accuracy_matrix()
    logs = logged_run / "logs"
    with open(logs / "csv" / "eval_results.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == TASKS * (TASKS + 1) // 2  # the seen test experiences after each one
    for row in rows:
        t, i = int(row["training_exp"]), int(row["eval_exp"])
        assert float(row["eval_accuracy"]) == pytest.approx(matrix[t, i] / 100, abs=5e-5)
    with open(logs / "csv" / "training_results.csv") as stream:
        epochs = list(csv.DictReader(stream))
    assert [(int(r["training_exp"]), int(r["epoch"])) for r in epochs] == [
        (t, e) for t in range(TASKS) for e in range(EPOCHS)
    ]
    with open(logs / "csv" / "clbench_metrics.csv") as stream:
        final = list(csv.DictReader(stream))[-1]
    summary = json.loads((logged_run / "metrics.json").read_text())
    for key in ("faa", "caa", "ffm"):
        assert float(final[key]) == pytest.approx(summary[key], abs=5e-5)
    text = (logs / "text" / "log.txt").read_text()
    assert f"clbench/FAA = {summary['faa']:.4f}" in text
    assert text.count("Epoch 1 ended.") == TASKS


def test_loggers_leave_the_accuracy_matrix_as_it_is(logged_run, tmp_path):
    out = tmp_path / "plain"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    (plain,) = run_dirs(out)
    assert (plain / "accuracy_matrix.csv").read_text() == (
        logged_run / "accuracy_matrix.csv"
    ).read_text()
    assert "loggers" not in RunFolder(plain).config()
    assert not (plain / "logs").exists()


def test_a_resumed_run_logs_as_an_unbroken_one(logged_run, tmp_path, monkeypatch):
    """Interrupt a run after training experience 1 (its epochs logged, not yet
    checkpointed), resume it: the logs read as those of the unbroken run."""
    import clbench.runner as runner

    class InterruptingCollector(runner.AccuracyCollector):
        def before_eval(self, strategy, *args, **kwargs):
            if strategy.current_task == 1:
                raise KeyboardInterrupt("killed")

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(runner, "AccuracyCollector", InterruptingCollector)
        assert main(["run", *TINY, "--logger", "tensorboard,csv,text", "--out", str(out)]) == 130
    (folder,) = run_dirs(out)
    assert RunFolder(folder).status()["state"] == "interrupted"
    killed = scalars(folder / "logs" / "tensorboard")
    assert [s for s, _ in killed["Loss_Epoch/train_phase/train_stream"]] == [1, 2, 3, 4]

    assert main(["run", "--resume", str(folder)]) == 0
    assert RunFolder(folder).config()["loggers"] == ["tensorboard", "csv", "text"]
    assert scalars(folder / "logs" / "tensorboard") == scalars(logged_run / "logs" / "tensorboard")
    for name in ("training_results.csv", "eval_results.csv", "clbench_metrics.csv"):
        resumed = (folder / "logs" / "csv" / name).read_text()
        assert resumed == (logged_run / "logs" / "csv" / name).read_text(), name
    assert (
        "-- resumed after 1 finished experiences --"
        in (folder / "logs" / "text" / "log.txt").read_text()
    )


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert (
        main(
            ["run", *tiny(1, "scenario.num_experiences=2"), "--logger", "wandb", "--out", str(out)]
        )
        == 0
    )
    (folder,) = run_dirs(out)
    logs = folder / "logs" / "wandb"
    run_id = (logs / "run-id").read_text().strip()
    (offline,) = (logs / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb")), "the offline run holds its log"

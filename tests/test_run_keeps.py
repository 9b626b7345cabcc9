"""What a run keeps and says: its console in run.log (appended on resume), per-epoch loss
and train accuracy in progress.json, ``--config FILE.yaml``, ``--dry-run``, the files it
depends on recorded absolute, and runs on random backbones labelled as such."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
from run_folders import write_run

from clbench.cli import main
from clbench.results import RunFolder
from clbench.results.run_log import RUN_LOG, ConsoleLog

TINY = ["--scenario", "digits-offline", "--preset", "quick", "--device", "cpu",
        "--set", "scenario.num_experiences=2"]  # fmt: skip


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/*/config.json"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of 2 experiences x 2 epochs (a few seconds on a CPU)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["run", "-s", "seq-ft", *TINY, "--set", "epochs=2", "--out", str(out)]) == 0
    (folder,) = run_dirs(out)
    return folder


def test_run_log_keeps_stdout_and_stderr_in_order(finished_run: Path) -> None:
    text = (finished_run / RUN_LOG).read_text()
    assert text.startswith("=== clbench ") and " run started on " in text.splitlines()[0]
    # the epoch lines go to stderr, the experience lines to stdout: one file, in order
    marks = [
        text.index("experience 0 epoch 1/2"),
        text.index("experience 0 epoch 2/2"),
        text.index("experience 0: train"),
        text.index("experience 1 epoch 1/2"),
        text.index("experience 1: train"),
        text.index("done: FAA"),
    ]
    assert marks == sorted(marks)
    assert "\r" not in text


def test_progress_json_has_each_epochs_loss_and_train_accuracy(finished_run: Path) -> None:
    records = RunFolder(finished_run).records()
    logged = re.findall(
        r"experience (\d) epoch (\d)/2: loss ([\d.]+), train acc ([\d.]+)%",
        (finished_run / RUN_LOG).read_text(),
    )
    assert len(logged) == 4
    for record in records:
        assert [e["epoch"] for e in record.epochs] == [1, 2]
        for epoch in record.epochs:
            assert set(epoch) == {"epoch", "loss", "train_accuracy", "seconds"}
            assert 0 <= epoch["train_accuracy"] <= 100 and epoch["loss"] > 0
            line = (str(record.experience), str(epoch["epoch"]),
                    f"{epoch['loss']:.4f}", f"{epoch['train_accuracy']:.1f}")  # fmt: skip
            assert line in logged


def test_console_log_buffers_until_the_folder_exists_and_drops_bar_redraws(
    tmp_path: Path,
) -> None:
    console = ConsoleLog()
    console.start()
    try:
        print("building")
        sys.stderr.write("\r\033[Kloading [#####.....] 50%")
        sys.stderr.write("loaded\n")
        console.keep_in(tmp_path, "=== header ===")
        print("training")
        console.note("Traceback (only in the file)")
    finally:
        console.stop()
    print("after the run")  # not kept: the streams are given back
    assert (tmp_path / RUN_LOG).read_text() == (
        "=== header ===\nbuilding\nloaded\ntraining\nTraceback (only in the file)\n"
    )


def test_a_resumed_run_appends_to_run_log_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user strategy given as a relative file, interrupted after one experience and
    resumed from elsewhere: config.json names the file absolute, run.log gets both parts."""
    from clbench import runner

    start = tmp_path / "start"
    start.mkdir()
    (start / "my_method.py").write_text(
        textwrap.dedent("""
        from clbench.strategies.baselines import SequentialFineTuning

        class Mine(SequentialFineTuning):
            name = "mine"
        """)
    )
    monkeypatch.chdir(start)
    original = runner.RunFolder.append_record

    def interrupt_after_first(self: RunFolder, record: object) -> None:
        original(self, record)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.RunFolder, "append_record", interrupt_after_first)
    out = tmp_path / "out"
    assert main(["run", "-s", "my_method.py:Mine", *TINY, "--out", str(out)]) == 130
    monkeypatch.setattr(runner.RunFolder, "append_record", original)
    (folder_path,) = run_dirs(out)
    folder = RunFolder(folder_path)
    assert folder.config()["strategy"] == f"{start / 'my_method.py'}:Mine"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--resume", str(folder_path)]) == 0
    assert folder.status()["state"] == "complete"
    headers = [line for line in (folder_path / RUN_LOG).read_text().splitlines()
               if line.startswith("=== clbench")]  # fmt: skip
    assert [" run started " in headers[0], " run resumed " in headers[1]] == [True, True]
    text = (folder_path / RUN_LOG).read_text()
    assert "interrupted after 1 finished experiences" in text
    assert "resuming " in text and "done: FAA" in text


def test_config_file_with_flags_winning_and_dry_run_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "run.yaml"
    settings.write_text(
        "strategy: seq-ft\nscenario: digits-offline\npreset: quick\nseed: 3\n"
        "lr: 0.05\nepochs: 2\nscenario.num_experiences: 2\n"
    )
    out = tmp_path / "out"
    arguments = ["run", "--config", str(settings), "--seed", "4", "--set", "epochs=3",
                 "--device", "cpu", "--out", str(out), "--dry-run"]  # fmt: skip
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    config = json.loads(printed[printed.index("{") : printed.index("\n}\n") + 2])
    assert (config["strategy"], config["scenario"], config["preset"]) == (
        "seq-ft", "digits-offline", "quick"
    )  # fmt: skip
    assert config["seed"] == 4  # the flag over the file
    assert config["strategy_options"]["lr"] == 0.05
    assert config["strategy_options"]["epochs"] == 3  # --set over the file's key
    assert config["scenario_options"]["num_experiences"] == 2
    # the per-task counts, from the scenario built as a run would build it
    assert "digits-offline: 2 experiences, 10 classes" in printed
    assert re.search(r"experience 1: 5 classes, \d+ train / \d+ test items", printed)
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("strategy: seq-ft\nscenario: digits-offline\nlrr: 1\n", "unknown seq-ft option 'lrr'"),
        ("strategy: seq-ft\nscenario: digits-offline\nseed: x\n", "seed: expected an integer"),
        ("strategy: [seq-ft\n", "not valid YAML"),
        ("- seq-ft\n", "expected a mapping"),
        ("scenario: digits-offline\nscenario.x:\n  y: 1\n", "expected a value, not a mapping"),
    ],
)
def test_a_bad_config_file_is_a_one_line_error(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "run.yaml"
    settings.write_text(text)
    out = tmp_path / "out"
    assert main(["run", "--config", str(settings), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clbench: error: ") and "\n" not in error and message in error
    assert not out.exists()


def test_file_options_are_recorded_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clbench.runner import RunRequest, resolve_run

    monkeypatch.chdir(tmp_path)
    config = resolve_run(
        RunRequest(
            strategy="seq-ft",
            scenario="fewrel-offline",
            backbone="vit-tiny-random",
            device="cpu",
            scenario_overrides={"data_file": "data/val.json"},
            backbone_overrides={"checkpoint": "weights.pth"},
        )
    )
    assert config["scenario_options"]["data_file"] == str(tmp_path / "data" / "val.json")
    assert config["backbone_options"]["checkpoint"] == str(tmp_path / "weights.pth")
    # with a weights file the tiny ViT is not random any more
    assert config["backbone_random_weights"] is False
    bert = resolve_run(
        RunRequest(
            strategy="seq-ft",
            scenario="fewrel-offline",
            backbone="bert-base-uncased",
            device="cpu",
            backbone_overrides={"path": "models/bert"},
        )  # fmt: skip
    )
    assert bert["backbone_options"]["path"] == str(tmp_path / "models" / "bert")


def test_random_backbones_are_labelled_in_list_show_and_tables(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert RunFolder(finished_run).config()["backbone_random_weights"] is True
    assert main(["list", "backbones"]) == 0
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "[random weights" in listing["vit-tiny-random"]
    assert "random weights" not in listing["vit-b16-in21k"]

    assert main(["show", str(finished_run)]) == 0
    shown = capsys.readouterr().out
    assert "backbone vit-tiny-random (random weights)" in shown and "chance level" in shown

    config = {**RunFolder(finished_run).config(), "backbone_random_weights": False}
    pretrained = write_run(tmp_path / "pretrained", config, [[70.0, None], [60.0, 50.0]], [10, 10])
    assert main(["table", str(finished_run), str(pretrained)]) == 0
    table = capsys.readouterr().out
    assert "vit-tiny-random (random weights)" in table and "chance level" in table
    assert main(["table", str(pretrained)]) == 0
    assert "random weights" not in capsys.readouterr().out
    # the filter names the backbone, marked or not
    assert main(["table", str(finished_run), "--backbone", "vit-tiny-random"]) == 0
    assert "vit-tiny-random (random weights)" in capsys.readouterr().out

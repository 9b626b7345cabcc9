"""The CLI and the run loop end to end: bad input, a full run, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clbench.cli import main
from clbench.results import RunFolder

QUICK = ["--scenario", "digits-offline", "--preset", "quick", "--device", "cpu"]


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/*/config.json"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-s", "nope", "-c", "digits-offline"], "unknown strategy 'nope'; valid choices: "),
        (["-s", "l2p", "-c", "nope"], "unknown scenario 'nope'; valid choices: "),
        (
            ["-s", "l2p", "-c", "digits-offline", "-b", "nope"],
            "unknown backbone 'nope'; valid choices: ",
        ),
        (
            ["-s", "l2p", "-c", "digits-offline", "--preset", "nope"],
            "unknown preset 'nope' for l2p; valid choices: auto, default",
        ),
        (
            ["-s", "l2p", "-c", "digits-offline", "--set", "nope=1"],
            "unknown l2p option 'nope'; valid options: ",
        ),
        (["-s", "l2p", "-c", "digits-offline", "--set", "lr=abc"], "--set lr=abc: expected float"),
        (
            ["-s", "l2p", "-c", "digits-offline", "--set", "scenario.num_experiences=x"],
            "expected int",
        ),
        (["-s", "l2p", "-c", "digits-offline", "--device", "tpu"], "unknown device 'tpu'"),
        (["-s", "missing_file.py:Thing", "-c", "digits-offline"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(arguments, message, tmp_path, capsys):
    code = main(["run", *arguments, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.startswith("clbench: error: ") and message in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "l2p",
        "seq-ft",
        "joint",
        "fewrel-offline",
        "digits-offline",
        "minilm-l6",
        "vit-b16-in21k",
    ):
        assert name in out
    assert main(["list", "strategies", "--options"]) == 0
    assert "(M) prompts in the pool" in capsys.readouterr().out


def test_full_run_writes_the_results_folder_and_show_prints_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "-s", "l2p", *QUICK, "--seed", "1", "--out", str(out)]) == 0
    (folder_path,) = run_dirs(out)
    folder = RunFolder(folder_path)
    assert folder.status()["state"] == "complete"
    config = folder.config()
    assert config["preset"] == "quick" and config["strategy_options"]["epochs"] == 1
    matrix = folder.accuracy_matrix()
    assert matrix.shape == (5, 5)
    # only the seen test experiences are evaluated (--evaluate seen, the default): the
    # unseen ones are not evaluated (NaN), not 0 (tests/test_evaluate_seen.py: --evaluate all)
    assert config["evaluate"] == "seen"
    assert np.isnan(matrix[np.triu_indices(5, 1)]).all()
    assert not np.isnan(matrix[np.tril_indices(5)]).any()
    summary = json.loads((folder_path / "metrics.json").read_text())
    assert set(summary) >= {"faa", "caa", "ffm", "seen_accuracy", "train_seconds", "peak_memory_mb"}
    environment = json.loads((folder_path / "environment.json").read_text())
    assert {"torch", "timm", "avalanche", "device", "git_commit"} <= set(environment)
    assert (folder_path / "accuracy_matrix.csv").read_text().count("\n") == 6
    capsys.readouterr()
    assert main(["show", str(folder_path)]) == 0
    shown = capsys.readouterr().out
    assert "accuracy matrix" in shown and f"FAA {summary['faa']:.2f}" in shown


def test_a_user_strategy_from_a_file(tmp_path):
    source = tmp_path / "my_method.py"
    source.write_text(
        textwrap.dedent("""
        from clbench.strategies.baselines import SequentialFineTuning

        class Mine(SequentialFineTuning):
            name = "mine"
    """)
    )
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "-s",
            f"{source}:Mine",
            *QUICK,
            "--set",
            "scenario.num_experiences=2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    (folder_path,) = run_dirs(out)
    assert folder_path.parent.name == "Mine"
    assert RunFolder(folder_path).accuracy_matrix().shape == (2, 2)


def _clbench(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "clbench.cli", *arguments]


def test_a_killed_run_resumes_to_the_same_matrix(tmp_path):
    """Kill -9 a real run after its second experience, resume it, compare to an unbroken run."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    arguments = ["run", "-s", "l2p", *QUICK, "--seed", "7"]
    killed_out = tmp_path / "killed"
    process = subprocess.Popen(
        _clbench(*arguments, "--out", str(killed_out)),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            folders = run_dirs(killed_out)
            if folders and len(RunFolder(folders[0]).records()) >= 2:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the run did not finish two experiences in time")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    (folder_path,) = run_dirs(killed_out)
    finished = len(RunFolder(folder_path).records())
    assert 2 <= finished < 5
    # its status still says "running", but its process is gone: read as dead
    status = RunFolder(folder_path).status()
    assert status["state"] == "dead" and "--resume" in status["error"]
    resumed = subprocess.run(
        _clbench("run", "--resume", str(folder_path)),
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"after {finished} finished experiences" in resumed.stdout

    unbroken_out = tmp_path / "unbroken"
    assert main([*arguments, "--out", str(unbroken_out)]) == 0
    (unbroken_path,) = run_dirs(unbroken_out)
    resumed_matrix = RunFolder(folder_path).accuracy_matrix()
    assert resumed_matrix.shape == (5, 5)
    np.testing.assert_array_equal(resumed_matrix, RunFolder(unbroken_path).accuracy_matrix())
    assert RunFolder(folder_path).status()["state"] == "complete"


def test_ctrl_c_leaves_finished_experiences_resumable(tmp_path, monkeypatch):
    from clbench import runner

    calls = {"n": 0}
    original = runner.RunFolder.append_record

    def interrupt_after_first(self, record):
        original(self, record)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.RunFolder, "append_record", interrupt_after_first)
    out = tmp_path / "out"
    code = main(
        ["run", "-s", "seq-ft", *QUICK, "--set", "scenario.num_experiences=2", "--out", str(out)]
    )
    assert code == 130
    (folder_path,) = run_dirs(out)
    folder = RunFolder(folder_path)
    assert folder.status() == {"state": "interrupted", "finished_experiences": 1}
    assert len(folder.records()) == 1
    monkeypatch.setattr(runner.RunFolder, "append_record", original)
    assert main(["run", "--resume", str(folder_path)]) == 0
    assert folder.accuracy_matrix().shape == (2, 2)


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a clbench run folder" in capsys.readouterr().err

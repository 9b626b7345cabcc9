"""What a run keeps and says: counts that must be positive, its hyper-parameters in
``clbench show``, a dead run shown as dead, the user's runs apart from the shipped ones,
and plot styles that never repeat."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from run_folders import write_run

from clbench.cli import main
from clbench.reporting.plots import colour_map
from clbench.results import RunFolder


def _config(scenario: str = "fewrel-offline", seed: int = 1) -> dict:
    return {
        "clbench_version": "0.1.0", "protocol_version": 1, "strategy": "l2p",
        "scenario": scenario, "backbone": "minilm-l6", "seed": seed, "preset": "quick",
        "device": "cpu", "strategy_options": {"lr": 0.01, "epochs": 1, "pool_size": 10},
        "scenario_options": {"n_train": 16, "max_length": 48}, "backbone_options": {},
    }  # fmt: skip


@pytest.mark.parametrize("key", ["batch_size", "epochs", "eval_batch_size"])
def test_a_zero_count_is_a_one_line_error_and_writes_nothing(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["run", "-s", "l2p", "-c", "digits-offline", "--device", "cpu",
                 "--out", str(out), "--set", f"{key}=0"])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error == f"clbench: error: {key}=0: must be at least 1"
    assert not out.exists()


def test_show_prints_the_hyper_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = write_run(tmp_path / "run", _config(), [[70.0, None], [60.0, 50.0]], [10, 10])
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "strategy options: lr=0.01 epochs=1 pool_size=10" in out
    assert "scenario options: n_train=16 max_length=48" in out


def test_a_run_whose_process_is_gone_reads_as_dead(tmp_path: Path) -> None:
    folder = RunFolder(write_run(tmp_path / "run", _config(), [[70.0, None]], [10, 10]))
    folder.set_status("running", finished_experiences=1)
    assert folder.status()["state"] == "running"  # this process: alive
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    status = folder.read_json("status.json")
    folder.set_status("running", finished_experiences=1, pid=int(gone.stdout), host=status["host"])
    dead = folder.status()
    assert dead["state"] == "dead"
    assert f"resume with: clbench run --resume {folder.path}" in dead["error"]
    # another host's run cannot be checked from here: taken as alive
    folder.set_status("running", finished_experiences=1, pid=int(gone.stdout), host="elsewhere")
    assert folder.status()["state"] == "running"


def test_table_without_folders_leaves_out_the_shipped_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLBENCH_RESULTS", raising=False)
    shipped = tmp_path / "results" / "examples" / "fewrel-offline" / "l2p" / "minilm-l6_seed1_x"
    write_run(shipped, {**_config(), "strategy": "hide-prompt"}, [[70.0]], [10])
    assert main(["table"]) == 2
    assert "no runs of yours under results/" in capsys.readouterr().err
    write_run(tmp_path / "results" / "fewrel-offline" / "l2p" / "minilm-l6_seed1_y", _config(),
              [[80.0]], [10])  # fmt: skip
    assert main(["table"]) == 0
    out = capsys.readouterr().out
    assert "l2p" in out and "hide-prompt" not in out
    assert main(["table", "results"]) == 0  # named: everything under it
    assert "hide-prompt" in capsys.readouterr().out


@pytest.mark.parametrize("count", [8, 20, 64])
def test_no_two_series_share_both_colour_and_marker(count: int) -> None:
    styles = colour_map([f"method-{i}" for i in range(count)])
    assert len(set(styles.values())) == count

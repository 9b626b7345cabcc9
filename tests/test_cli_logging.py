"""--quiet / --verbose: progress lines go through the ``clbench`` logger, command output
stays on standard output, and the caller's log level is back after each call."""

from __future__ import annotations

import logging
import subprocess

import pytest

from clbench.cli import main
from clbench.results import write_run_folder
from clbench.sweep.command import SweepCommand, plan


@pytest.mark.parametrize(
    ("flags", "level"),
    [
        ([], logging.INFO),
        (["--quiet"], logging.WARNING),
        (["--verbose"], logging.DEBUG),
    ],
)
@pytest.mark.parametrize("where", ["before", "after"])
def test_the_flags_set_the_level_for_one_call(flags, level, where, monkeypatch):
    from clbench.cli import run

    seen = []

    def record_level(args):
        seen.append(logging.getLogger("clbench").getEffectiveLevel())
        return 0

    monkeypatch.setattr(run, "command_show", record_level)
    argv = [*flags, "show", "x"] if where == "before" else ["show", "x", *flags]
    assert main(argv) == 0
    assert seen == [level]
    assert logging.getLogger("clbench").getEffectiveLevel() == logging.INFO


def test_quiet_and_verbose_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--quiet", "--verbose", "list"])
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_quiet_silences_a_status_line(capsys):
    assert main(["download", "digits-offline"]) == 0
    assert capsys.readouterr().out == (
        "digits-offline: nothing to download (its data ships with clbench or a package)\n"
    )
    assert main(["--quiet", "download", "digits-offline"]) == 0
    assert main(["download", "digits-offline", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["--verbose", "download", "digits-offline"]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_quiet_sweep_prints_its_table_without_the_progress_lines(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    arguments = [
        "sweep",
        "-s",
        "seq-ft",
        "-c",
        "digits-offline",
        "--seed",
        "0,1",
        "--preset",
        "quick",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    command = SweepCommand(
        strategies=["seq-ft"],
        scenarios=["digits-offline"],
        seeds=["0", "1"],
        presets=["quick"],
        device="cpu",
        out=out,
    )
    for spec in plan(command)[2]:
        write_run_folder(spec.folder, spec.config, [[80.0, 0.0], [70.0, 60.0]], [10, 10])

    def no_process(*args, **kwargs):
        raise AssertionError("a complete run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    table_row = "| digits-offline | vit-tiny-random (random weights) | seq-ft | 2 |"
    capsys.readouterr()
    assert main(arguments) == 0
    loud = capsys.readouterr().out
    assert "2 complete (skipped)" in loud and "sweep finished in" in loud and table_row in loud
    assert main([*arguments, "--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert table_row in quiet
    assert "complete (skipped)" not in quiet and "sweep finished" not in quiet
    assert quiet.lstrip().startswith("## ")  # nothing but the table
    assert main(["--verbose", *arguments]) == 0
    assert capsys.readouterr().out.startswith(loud.splitlines()[0])

"""Errors that only show while building (the scenario's data, a strategy's setup) leave no
run folder behind: the run loop builds everything before it creates the folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from clbench.cli import main


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # CODA's setup refuses: 100 components cannot be orthogonal in the tiny ViT's width
        (
            ["-s", "coda-prompt", "-c", "digits-offline", "--preset", "default"],
            "cannot be mutually orthogonal",
        ),
        # the scenario factory refuses: no CIFAR-100 under the data root, download off
        (
            [
                "-s",
                "l2p",
                "-c",
                "split-cifar100",
                "-b",
                "vit-tiny-random",
                "--set",
                "scenario.download=false",
            ],
            "CIFAR-100",
        ),
    ],
)
def test_an_error_while_building_exits_2_and_writes_nothing(arguments, message, tmp_path, capsys):
    out, data_root = tmp_path / "out", tmp_path / "data"
    data_root.mkdir()
    code = main(
        ["run", *arguments, "--device", "cpu", "--out", str(out), "--data-root", str(data_root)]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.startswith("clbench: error: ") and message in error
    assert files_under(out) == []
    assert files_under(data_root) == []

"""``clbench.create_*`` for Avalanche scripts, and the README's plain-Avalanche script run
exactly as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import clbench
from clbench.errors import UsageError

README = Path(__file__).resolve().parents[1] / "README.md"


def avalanche_script() -> str:
    text = README.read_text()
    start = text.index("### In a plain Avalanche script\n")
    end = text.find("\n## ", start)
    (code,) = re.findall(r"^```python\n(.*?)^```$", text[start:end], flags=re.DOTALL | re.M)
    return code


def test_importing_clbench_imports_no_torch():
    code = "import sys, clbench; clbench.create_strategy; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_the_readme_avalanche_script_prints_accuracy_and_forgetting(tmp_path):
    (tmp_path / "script.py").write_text(avalanche_script())
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = re.search(r"^accuracy (\d\.\d+)$", result.stdout, flags=re.M)
    forgetting = re.search(r"^forgetting (-?\d\.\d+)$", result.stdout, flags=re.M)
    assert accuracy and forgetting, result.stdout[-2000:]
    assert 0.0 < float(accuracy.group(1)) <= 1.0
    # the InteractiveLogger printed Avalanche's own metric lines along the way
    assert "Top1_Acc_Stream/eval_phase/test_stream" in result.stdout


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: clbench.create_encoder("nope"), "unknown backbone 'nope'; valid choices: "),
        (
            lambda: clbench.create_encoder("vit-tiny-random", nope=1),
            "unknown backbone vit-tiny-random option 'nope'; valid options: ",
        ),
        (
            lambda: clbench.create_encoder("vit-tiny-random", depth="x"),
            "--set depth=x: expected int",
        ),
        (lambda: clbench.create_scenario("nope", None), "unknown scenario 'nope'"),
        (
            lambda: clbench.create_scenario("digits-offline", None, num_experiences=3),
            "10 classes",
        ),
        (
            lambda: clbench.create_strategy("nope", encoder=None, num_classes=2),
            "unknown strategy 'nope'",
        ),
        (
            lambda: clbench.create_strategy("l2p", encoder=None, num_classes=2, nope=1),
            "unknown l2p option 'nope'; valid options: ",
        ),
        (
            lambda: clbench.create_strategy("l2p", encoder=None, num_classes=2, lr="abc"),
            "--set lr=abc: expected float",
        ),
        (
            lambda: clbench.create_strategy("l2p", encoder=None, num_classes=2, preset="nope"),
            "unknown preset 'nope' for l2p",
        ),
        (lambda: clbench.create_strategy("l2p", encoder=None), "needs num_classes= or scenario="),
    ],
)
def test_bad_names_and_options_are_usage_errors(call, message):
    with pytest.raises(UsageError) as raised:
        call()
    assert message in str(raised.value)


def test_options_and_presets_reach_the_strategy(tiny_vit):
    strategy = clbench.create_strategy(
        "l2p", encoder=tiny_vit, num_classes=4, preset="quick", lr="0.05", pool_size=6
    )
    assert strategy.config.lr == 0.05 and strategy.config.pool_size == 6
    assert strategy.config.epochs == 1  # from the preset
    assert strategy.num_classes == 4 and strategy.name == "l2p"

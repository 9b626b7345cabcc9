"""The README's "Add a strategy" example, exactly as printed: its code saved as the file
it names, its command run from that file's folder, as a user would."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def fenced_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_strategy_runs_as_printed(tmp_path):
    section = readme_section("Add a strategy")
    code = fenced_blocks(section, "python")[0]
    (command,) = fenced_blocks(section, "bash")
    file_name = re.search(r"Save it as `([\w.]+)`", section).group(1)
    (tmp_path / file_name).write_text(code)
    argv = shlex.split(command.strip())
    assert argv[:2] == ["clbench", "run"] and f"{file_name}:MLPProbe" in argv
    # the installed `clbench` script when there is one, else the same entry point
    executable = shutil.which("clbench")
    argv = [executable] if executable else [sys.executable, "-m", "clbench.cli"]
    argv += shlex.split(command.strip())[1:]
    environment = {k: v for k, v in os.environ.items() if k != "CLBENCH_RESULTS"}
    environment["OMP_NUM_THREADS"] = "1"
    # a strategy file is imported once, however often the run loop resolves its name (it
    # used to be executed twice: "strategy 'mlp-probe' is registered twice")
    result = subprocess.run(
        argv, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (status_path,) = (tmp_path / "results").glob("*/*/*/status.json")  # the default --out
    assert json.loads(status_path.read_text())["state"] == "complete"
    folder = status_path.parent
    records = json.loads((folder / "progress.json").read_text())
    assert len(records) == len(records[-1]["accuracy"]) > 1  # every experience trained

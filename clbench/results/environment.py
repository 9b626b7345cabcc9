"""environment.json: which software and hardware a run ran on.

Imports torch (and timm, transformers, avalanche) inside the function only: it is called
by the run loop, which has them loaded already, never by readers of run folders.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any


def environment(device: str) -> dict[str, Any]:
    import numpy as np
    import timm
    import torch
    import transformers

    try:
        import avalanche

        avalanche_version = avalanche.__version__
    except Exception:  # noqa: BLE001 - a version probe must never fail a run
        avalanche_version = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "avalanche": avalanche_version,
        "numpy": np.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """HEAD of the clbench checkout, ``-dirty`` when tracked files changed; None outside
    a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")

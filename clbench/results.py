"""One folder per run, written atomically as the run goes.

Layout of ``<out>/<scenario>/<strategy>/<run-id>/``:

config.json          the resolved configuration (what ``--resume`` re-reads)
environment.json     versions, device, git commit, host
progress.json        one record per finished experience: accuracy row, correct / counts
                     per test experience, train / eval seconds, peak memory
metrics.json         FAA, CAA, FFM, seen-class accuracy (recomputed after each experience)
accuracy_matrix.csv  A[t, i] in %, one row per finished experience
checkpoint.pt        strategy state after the last finished experience
status.json          running | interrupted | failed | complete

Every file is written to a temporary name and renamed, so a killed process leaves either
the old or the new version, never half of one. The checkpoint is written before the
progress record that refers to it: progress never claims an experience whose state is
missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench import metrics

CHECKPOINT = "checkpoint.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, payload: Any) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class ExperienceRecord:
    experience: int
    accuracy: list[float]  # % per test experience (seen and unseen)
    correct: list[int]
    counts: list[int]
    train_seconds: float
    eval_seconds: float
    peak_memory_mb: float
    extra: dict[str, Any]


class RunFolder:
    """Reads and writes one run's folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- writing ----------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / "config.json", config)

    def write_environment(self, device: str) -> None:
        atomic_write_json(self.path / "environment.json", environment(device))

    def set_status(self, state: str, **details: Any) -> None:
        atomic_write_json(self.path / "status.json", {"state": state, **details})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / CHECKPOINT, state)

    def append_record(self, record: ExperienceRecord) -> None:
        records = self.records()
        if len(records) != record.experience:
            raise RuntimeError(
                f"experience {record.experience} recorded after {len(records)} finished ones"
            )
        records.append(record)
        atomic_write_json(self.path / "progress.json", [vars(r) for r in records])
        self._write_derived(records)

    def _write_derived(self, records: list[ExperienceRecord]) -> None:
        accuracy = np.array([r.accuracy for r in records])
        summary = metrics.summarise(
            accuracy, np.array([r.correct for r in records]), np.array(records[0].counts)
        )
        summary["train_seconds"] = float(sum(r.train_seconds for r in records))
        summary["eval_seconds"] = float(sum(r.eval_seconds for r in records))
        summary["peak_memory_mb"] = float(max(r.peak_memory_mb for r in records))
        atomic_write_json(self.path / "metrics.json", summary)
        header = ",".join(f"exp{i}" for i in range(accuracy.shape[1]))
        lines = [f"after,{header}"] + [
            f"{r.experience}," + ",".join(f"{a:.4f}" for a in r.accuracy) for r in records
        ]
        atomic_write_bytes(self.path / "accuracy_matrix.csv", ("\n".join(lines) + "\n").encode())

    def log(self, line: str) -> None:
        with open(self.path / "log.txt", "a", encoding="utf-8") as stream:
            stream.write(line + "\n")

    # -- reading ----------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "config.json").is_file()

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def status(self) -> dict[str, Any]:
        path = self.path / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {"state": "unknown"}

    def records(self) -> list[ExperienceRecord]:
        path = self.path / "progress.json"
        if not path.is_file():
            return []
        return [ExperienceRecord(**r) for r in json.loads(path.read_text())]

    def metrics(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def accuracy_matrix(self) -> np.ndarray:
        return np.array([r.accuracy for r in self.records()])

    def load_checkpoint(self) -> dict[str, Any]:
        return torch.load(self.path / CHECKPOINT, map_location="cpu", weights_only=False)


def environment(device: str) -> dict[str, Any]:
    import timm
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
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
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
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
        capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")

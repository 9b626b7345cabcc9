"""Checkpoints keep each large tensor once: what did not change is not written again.

A finished task's prompt slot and the class statistics of learnt classes never change, so
after the first experience a checkpoint writes only the new ones (content-addressed blobs
beside checkpoint.pt); a blob nothing refers to any more is removed; a damaged or foreign
blob is refused; resuming still gives the same state (tests/test_resume_every_strategy.py
runs every strategy through these checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from clbench.results import RunFolder
from clbench.results.checkpoint import (
    BLOB_MIN_BYTES,
    BLOBS,
    CheckpointError,
    blob_path,
    load_checkpoint,
    save_checkpoint,
    tensor_digest,
)
from clbench.runner import RunRequest, execute, new_run_folder, resolve_run

BIG = BLOB_MIN_BYTES // 4  # float32 elements of a tensor that goes to a blob


def payload(state: dict[str, Any], finished: int = 1) -> dict[str, Any]:
    return {"strategy": state, "finished_experiences": finished}


def test_a_tensor_that_did_not_change_is_written_once(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    old, small = torch.randn(BIG), torch.arange(3.0)
    first = save_checkpoint(folder, payload({"slots": [old], "small": small}))
    new = torch.randn(2, BIG)
    second = save_checkpoint(folder, payload({"slots": [old, new], "small": small}, 2))
    # the second checkpoint wrote the new slot, not the old one again
    assert first.bytes_written > old.numel() * 4
    assert old.numel() * 4 * 2 - 2048 < second.bytes_written < old.numel() * 4 * 2 + 4096
    loaded = load_checkpoint(folder)["strategy"]
    assert torch.equal(loaded["slots"][0], old) and torch.equal(loaded["slots"][1], new)
    assert torch.equal(loaded["small"], small)
    assert "blobs" not in load_checkpoint(folder)
    assert sorted(p.stem for p in (tmp_path / BLOBS).iterdir()) == sorted(
        [tensor_digest(old), tensor_digest(new)]
    )


def test_a_blob_nothing_refers_to_is_removed(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    before, after = torch.zeros(BIG), torch.ones(BIG)
    save_checkpoint(folder, payload({"prompt": before}))
    save_checkpoint(folder, payload({"prompt": after}, 2))  # e.g. prompt momentum rewrote it
    assert [p.stem for p in (tmp_path / BLOBS).iterdir()] == [tensor_digest(after)]
    assert torch.equal(load_checkpoint(folder)["strategy"]["prompt"], after)


def test_a_damaged_or_missing_blob_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    tensor = torch.randn(BIG)
    save_checkpoint(folder, payload({"w": tensor}))
    path = blob_path(folder, tensor_digest(tensor))
    other = RunFolder(tmp_path / "other")
    save_checkpoint(other, payload({"w": torch.randn(BIG)}))
    path.write_bytes(next((other.path / BLOBS).iterdir()).read_bytes())  # another tensor
    with pytest.raises(CheckpointError, match="does not match its name"):
        load_checkpoint(folder)
    path.unlink()
    with pytest.raises(CheckpointError, match="not a readable clbench checkpoint"):
        load_checkpoint(folder)


def test_hide_prompt_checkpoints_grow_with_the_new_task_only(tmp_path: Path) -> None:
    # tiny ViT (width 64): a class's covariance (64 x 64 floats, 16 KiB) goes to a blob
    torch.set_num_threads(1)
    request = RunRequest(strategy="hide-prompt", scenario="digits-offline", preset="quick",
                         device="cpu", scenario_overrides={"task_sizes": "2,2,2,2,2"},
                         strategy_overrides={"samples_per_class": "8"})  # fmt: skip
    config = resolve_run(request)
    folder = execute(new_run_folder(tmp_path, config), config, echo=lambda line: None)
    written = [r.checkpoint_bytes for r in folder.records()]
    blobs = sum(p.stat().st_size for p in (folder.path / BLOBS).iterdir())
    # every experience adds the same kind of state (2 classes' statistics, one prompt
    # slot): later checkpoints write about as much as the second, not more and more
    assert max(written[1:]) < 1.3 * min(written[1:]), written
    # the last one did not rewrite the 8 old classes' query and prompted covariances
    whole_state = blobs + (folder.path / "checkpoint.pt").stat().st_size
    assert written[-1] < whole_state - 0.9 * 16 * 64 * 64 * 4, (written, whole_state)

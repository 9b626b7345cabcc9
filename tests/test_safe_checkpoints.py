"""Checkpoints load with ``weights_only=True``: every strategy's state is tensors and plain
data, and a checkpoint that would run code is refused with one line, its code never run."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import clbench
from clbench.cli import main
from clbench.registry import STRATEGIES
from clbench.results import RunFolder
from clbench.results.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)

# the settings of `clbench run --preset quick` (digits-offline on vit-tiny-random), so that
# every strategy's state holds what it holds in a real run
QUICK = {"preset": "quick", "epochs": 1, "eval_batch_size": 256}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return clbench.create_encoder("vit-tiny-random")


@pytest.fixture(scope="module")
def digits(encoder):
    return clbench.create_scenario("digits-offline", encoder, seed=0, num_experiences=5)


class WritesAMarker:
    """Unpickling this runs ``exec``: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def write_malicious_checkpoint(folder: RunFolder, marker: Path) -> None:
    payload = {"strategy": {"model": WritesAMarker(marker)}, "finished_experiences": 1}
    folder.path.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_path(folder), "wb") as stream:
        torch.save(payload, stream)  # what someone could leave in a shared run folder


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_checkpoint_loads_weights_only(name, encoder, digits, tmp_path):
    """Two experiences (so consolidation statistics, caches and label trees exist), saved
    and loaded through the run loop's functions, predict as the trained strategy does."""
    strategy = clbench.create_strategy(name, encoder=encoder, scenario=digits, **QUICK)
    for index in range(2):
        strategy.train(digits.benchmark.train_stream[index])
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    save_checkpoint(folder, {"strategy": strategy.state_dict(), "finished_experiences": 2})
    checkpoint = load_checkpoint(folder)  # weights_only=True: would raise on any object
    assert checkpoint["finished_experiences"] == 2
    restored = clbench.create_strategy(name, encoder=encoder, scenario=digits, **QUICK)
    restored.load_state_dict(checkpoint["strategy"])
    x = torch.stack([digits.benchmark.test_stream[i].dataset[0][0] for i in range(2)])
    strategy.model.eval()
    restored.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), strategy.classify(x))
    assert restored.task_classes == strategy.task_classes


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "marker"
    folder = RunFolder(tmp_path / "run")
    write_malicious_checkpoint(folder, marker)
    with pytest.raises(CheckpointError, match="refused to load") as raised:
        load_checkpoint(folder)
    message = str(raised.value)
    assert "a reference to exec" in message and "nothing in it was run" in message
    assert len(message.splitlines()) == 1
    assert not marker.exists()
    # the same bytes loaded the unsafe way would have run it: the test pickle is real
    torch.load(checkpoint_path(folder), weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"strategy": {}, "finished_experiences": 1}), "refused to load"),
        (b"", "not a readable"),
        (b"not a checkpoint at all", "refused to load"),
    ],
    ids=["plain-pickle", "empty", "text"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_foreign_or_damaged_file_is_a_one_line_error(content, message, tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    checkpoint_path(folder).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as raised:
        load_checkpoint(folder)
    assert len(str(raised.value).splitlines()) == 1


def test_a_plain_checkpoint_without_strategy_state_is_refused(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    checkpoint_path(folder).write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a clbench checkpoint"):
        load_checkpoint(folder)


@dataclass
class NotPlainData:
    value: int


def test_saving_state_that_is_not_plain_data_fails_before_writing(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    payload = {"strategy": {"extra": NotPlainData(1)}, "finished_experiences": 1}
    with pytest.raises(TypeError, match="NotPlainData"):
        save_checkpoint(folder, payload)
    assert not checkpoint_path(folder).exists()


def test_resuming_a_tampered_run_is_exit_2_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["run", "-s", "seq-ft", "--scenario", "digits-offline", "--preset", "quick"]
    arguments += ["--device", "cpu", "--set", "scenario.num_experiences=2", "--out", str(out)]
    assert main(arguments) == 0
    (config_path,) = out.glob("*/*/*/config.json")
    folder = RunFolder(config_path.parent)
    folder.set_status("interrupted", finished_experiences=1)  # as if killed half-way
    marker = tmp_path / "marker"
    write_malicious_checkpoint(folder, marker)
    capsys.readouterr()
    assert main(["run", "--resume", str(folder.path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clbench: error: ") and "refused to load" in error
    assert len(error.splitlines()) == 1
    assert not marker.exists()

"""Kill -9 in the middle of an experience, resume, and end bit for bit where an unbroken
run ends: for every registered strategy (the list comes from the registry, so a new
strategy is covered without touching this file).

Each run is a real ``clbench run`` in its own process, killed by SIGKILL: the test-only
kill switch (``CLBENCH_TEST_SIGKILL_AT``, :mod:`clbench.kill_switch`) makes the process
kill itself after a chosen number of training iterations of a chosen experience, so the
kill lands inside an experience deterministically. A run is killed twice (3 iterations
into experience 1, then, resumed, 3 iterations into experience 2), resumed to the end,
and compared with an unbroken run: the accuracy matrix, the correct counts and the whole
final strategy state (parameters, statistics, label trees, caches) must be equal bit for
bit.

Two launchers. ``fork`` (the default run) forks the test process and calls the CLI's
``main`` in the child: a separate process that SIGKILL ends for real, without paying the
~15 s of CPU that importing Avalanche, timm and transformers costs a fresh interpreter
(60 of them would be a quarter of an hour). ``exec`` (``-m slow``) starts ``python -m
clbench.cli`` for every run, exactly as a user does, with two threads, so that kernels
whose sums depend on how threads split them are covered too. A forked run uses one
thread: a forked child must not use the OpenMP threads its parent started (GNU OpenMP
hangs). Killed, resumed and unbroken runs always use the same thread count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clbench.cli import main
from clbench.kill_switch import KILL_SWITCH_VARIABLE
from clbench.registry import STRATEGIES
from clbench.results import RunFolder
from clbench.results.checkpoint import load_checkpoint

# Three tasks of 16-px digits on a narrower tiny random ViT (4 patches, width 32, the 5
# layers HiDe's prompts need), batches of 64: 1-4 s of CPU per run for every strategy,
# with everything a strategy keeps between tasks (~70 s for all of them, 4 runs each).
TINY = [
    "--scenario", "digits-offline", "--preset", "quick", "--device", "cpu", "--seed", "3",
    "--set", "scenario.task_sizes=4,3,3", "--set", "backbone.img_size=16",
    "--set", "backbone.embed_dim=32", "--set", "backbone.depth=5",
    "--set", "batch_size=64", "--set", "eval_batch_size=512",
]  # fmt: skip
# CODA-Prompt splits its components evenly over the tasks (quick's 40 do not split in 3)
PER_STRATEGY = {"coda-prompt": ["--set", "pool_size=30"]}
FIRST_KILL, SECOND_KILL = "1:3", "2:3"  # experience index : training iterations done


def run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/*/config.json"))


def launch(arguments: list[str], log: Path, launcher: str, kill_at: str | None = None) -> int:
    """Run ``clbench ARGUMENTS`` in a new process; its exit code, or -N when signal N
    ended it (as ``subprocess`` reports). Output is appended to ``log``."""
    environment = {k: v for k, v in os.environ.items() if k != KILL_SWITCH_VARIABLE}
    if kill_at is not None:
        environment[KILL_SWITCH_VARIABLE] = kill_at
    if launcher == "exec":
        environment.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
        with open(log, "a") as stream:
            done = subprocess.run(
                [sys.executable, "-m", "clbench.cli", *arguments],
                env=environment,
                stdout=stream,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
        return done.returncode
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            stream = open(log, "a", buffering=1)  # noqa: SIM115 (lives until os._exit)
            os.dup2(stream.fileno(), 1)
            os.dup2(stream.fileno(), 2)
            sys.stdout = sys.stderr = stream
            torch.set_num_threads(1)
            os.environ.clear()
            os.environ.update(environment)
            code = main(arguments)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def assert_same_state(resumed: Any, unbroken: Any, where: str = "state") -> None:
    """Equal bit for bit: tensors (dtype and values), containers and plain values; a key
    naming seconds is wall time and skipped."""
    if isinstance(unbroken, torch.Tensor):
        assert isinstance(resumed, torch.Tensor), where
        assert resumed.dtype == unbroken.dtype and resumed.shape == unbroken.shape, where
        assert torch.equal(resumed, unbroken), f"{where} differs"
    elif isinstance(unbroken, dict):
        assert isinstance(resumed, dict) and set(resumed) == set(unbroken), where
        for key, value in unbroken.items():
            if "seconds" not in str(key):
                assert_same_state(resumed[key], value, f"{where}[{key!r}]")
    elif isinstance(unbroken, list | tuple):
        assert isinstance(resumed, list | tuple) and len(resumed) == len(unbroken), where
        for i, (a, b) in enumerate(zip(resumed, unbroken)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert resumed == unbroken, where


def check_resume(name: str, tmp_path: Path, launcher: str) -> None:
    arguments = ["run", "-s", name, *TINY, *PER_STRATEGY.get(name, [])]
    log = tmp_path / "runs.log"

    def output() -> str:
        return log.read_text() if log.exists() else ""

    killed_out = tmp_path / "killed"
    code = launch([*arguments, "--out", str(killed_out)], log, launcher, FIRST_KILL)
    assert code == -signal.SIGKILL, output()
    (folder_path,) = run_dirs(killed_out)
    folder = RunFolder(folder_path)
    assert len(folder.records()) == 1, output()  # killed inside experience 1
    # as kill -9 leaves it (shown as dead where the recorded process is gone): nothing ran after
    assert folder.status()["state"] in ("running", "dead")

    code = launch(["run", "--resume", str(folder_path)], log, launcher, SECOND_KILL)
    assert code == -signal.SIGKILL, output()
    assert len(folder.records()) == 2, output()  # killed inside experience 2
    assert launch(["run", "--resume", str(folder_path)], log, launcher) == 0, output()
    text = output()
    assert "after 1 finished experiences" in text and "after 2 finished experiences" in text
    assert folder.status()["state"] == "complete"

    unbroken_out = tmp_path / "unbroken"
    assert launch([*arguments, "--out", str(unbroken_out)], log, launcher) == 0, output()
    (unbroken_path,) = run_dirs(unbroken_out)
    unbroken = RunFolder(unbroken_path)
    resumed_matrix = folder.accuracy_matrix()
    assert resumed_matrix.shape == (3, 3)
    np.testing.assert_array_equal(resumed_matrix, unbroken.accuracy_matrix())
    assert [r.correct for r in folder.records()] == [r.correct for r in unbroken.records()]
    # training continued identically: the final states are the same bits
    assert_same_state(
        load_checkpoint(folder)["strategy"], load_checkpoint(unbroken)["strategy"], name
    )


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_killed_mid_experience_resumes_bit_for_bit(name, tmp_path):
    check_resume(name, tmp_path, "fork")


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_killed_mid_experience_resumes_bit_for_bit_from_a_fresh_interpreter(name, tmp_path):
    check_resume(name, tmp_path, "exec")


def test_a_state_lost_on_resume_is_caught(tmp_path, monkeypatch):
    """The comparison can fail: a joint linear probe that loses half of its stored features
    when it is resumed trains on less data, and the test says so (forked runs inherit the
    patch)."""
    probe = STRATEGIES.get("joint-linear")
    restore = probe.load_extra_state

    def lose_half(self: Any, state: dict[str, Any]) -> None:
        halves = [(x[: len(x) // 2], y[: len(y) // 2]) for x, y in state["seen_features"]]
        restore(self, {**state, "seen_features": halves})

    monkeypatch.setattr(probe, "load_extra_state", lose_half)
    with pytest.raises(AssertionError, match="Arrays are not equal|differs"):
        check_resume("joint-linear", tmp_path, "fork")

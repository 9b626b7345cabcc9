"""Sweeps: grid expansion, validation before anything runs, run identity, --status, local
process pool (skip on rerun, a crashing run), and Ray with a worker killed mid-run."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clbench.cli import main
from clbench.errors import UsageError
from clbench.results import RunFolder, write_run_folder
from clbench.sweep.command import SweepCommand, decide_device, plan
from clbench.sweep.grid import Resources, SweepError, load_sweep, parse_sweep, sweep_from_flags
from clbench.sweep.plan import expand, run_identity
from clbench.sweep.state import LOCK_FILE, LOG_FILE, WORKER_FILE

REPO = Path(__file__).resolve().parents[1]
# tiny and fast: 2 tasks of digits, a 1-block ViT, one epoch
TINY = [
    "--preset",
    "quick",
    "--device",
    "cpu",
    "--set",
    "scenario.num_experiences=2",
    "--set",
    "backbone.depth=1",
]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# -- expansion, identity, validation ----------------------------------------------------


def test_flags_expand_to_a_grid_with_one_fixed_folder_per_point(tmp_path):
    sweep = sweep_from_flags(["l2p", "seq-ft"], ["digits-offline"], ["0", "1"], [], ["quick"])
    specs = expand(sweep, tmp_path, "cpu")
    assert len(specs) == 4
    assert [(s.config["strategy"], s.config["seed"]) for s in specs] == [
        ("l2p", 0),
        ("l2p", 1),
        ("seq-ft", 0),
        ("seq-ft", 1),
    ]
    for spec in specs:
        assert spec.config["preset"] == "quick" and spec.config["device"] == "cpu"
        relative = spec.folder.relative_to(tmp_path)
        scenario, strategy, name = relative.parts
        assert (scenario, strategy) == ("digits-offline", spec.config["strategy"])
        assert name == f"vit-tiny-random_seed{spec.config['seed']}_{spec.identity}"
    # expanding again names the same folders: that is what lets a rerun find its runs
    assert [s.folder for s in expand(sweep, tmp_path, "cpu")] == [s.folder for s in specs]
    # the device is not part of the identity; an option is
    assert [s.folder for s in expand(sweep, tmp_path, "cuda")] == [s.folder for s in specs]
    changed = expand(sweep, tmp_path, "cpu", ["lr=0.5"])
    assert {s.identity for s in changed}.isdisjoint({s.identity for s in specs})
    assert all(s.config["strategy_options"]["lr"] == 0.5 for s in changed)


def test_identity_hashes_the_resolved_options_not_how_they_were_given(tmp_path):
    by_preset = expand(
        sweep_from_flags(["seq-ft"], ["digits-offline"], ["3"], [], ["quick"]), tmp_path, "cpu"
    )
    spelled_out = expand(
        parse_sweep(
            {
                "strategy": "seq-ft",
                "scenario": "digits-offline",
                "seed": 3,
                "preset": "quick",
                "set": {"epochs": 1, "batch_size": 8, "lr": 0.01},  # seq-ft's quick
            },
            "test",
        ),
        tmp_path,
        "cpu",
    )
    assert by_preset[0].identity == spelled_out[0].identity
    config = dict(by_preset[0].config, clbench_version="99.0", device="cuda")
    assert run_identity(config) == by_preset[0].identity
    # nor do the scenario-spec keys config.json gained later: a sweep made before they
    # existed finds its folders again
    assert {"scenario_family", "scenario_protocol", "metrics"} <= set(config)
    spec_keys = ("scenario_family", "scenario_protocol", "metrics")
    legacy = {key: value for key, value in config.items() if key not in spec_keys}
    assert run_identity(legacy) == by_preset[0].identity


def test_yaml_blocks_inherit_the_top_level_and_vary_sweeps_an_option(tmp_path):
    path = write_yaml(
        tmp_path / "grid.yaml",
        """
        scenario: digits-offline
        preset: quick
        seed: [0, 1]
        set: {batch_size: 16, scenario.num_experiences: 2}
        grids:
          - strategy: seq-ft
            vary: {lr: [0.1, 0.01]}
          - strategy: l2p
            seed: 5
            set: {batch_size: 8}
    """,
    )
    specs = expand(load_sweep(path), tmp_path / "out", "cpu")
    seq = [s for s in specs if s.config["strategy"] == "seq-ft"]
    l2p = [s for s in specs if s.config["strategy"] == "l2p"]
    assert sorted((s.config["seed"], s.config["strategy_options"]["lr"]) for s in seq) == [
        (0, 0.01),
        (0, 0.1),
        (1, 0.01),
        (1, 0.1),
    ]
    assert all(s.config["strategy_options"]["batch_size"] == 16 for s in seq)
    assert [(s.config["seed"], s.config["strategy_options"]["batch_size"]) for s in l2p] == [(5, 8)]
    assert all(s.config["scenario_options"]["num_experiences"] == 2 for s in specs)
    assert len({s.folder for s in specs}) == 5


def test_a_bad_sweep_file_names_every_offending_entry_and_runs_nothing(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "bad.yaml",
        """
        scenario: [digits-offline, no-such-scenario]
        strategy: [seq-ft, no-such-strategy]
        seeds: [0]
        preset: [quick, no-such-preset]
        set: {lr: fast, no_such_option: 1}
        resources: {cpus: 2, tpus: 1}
        grids:
          - {backbone: no-such-backbone}
          - {colour: red}
    """,
    )
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"clbench: error: {path}: ") and "nothing was run" in error
    for offending in (
        "'seeds'",
        "'colour'",
        "'tpus'",
        "unknown strategy 'no-such-strategy'",
        "unknown scenario 'no-such-scenario'",
        "unknown backbone 'no-such-backbone'",
        "unknown preset 'no-such-preset' for seq-ft",
        "--set lr=fast: expected float",
        "unknown seq-ft option 'no_such_option'",
    ):
        assert offending in error, offending
    assert "valid choices: " in error and "valid keys: " in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strategy": None}, "grid: no strategy"),
        ({"seed": [0, "x"]}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"vary": {"lr": 0.1}}, "vary lr: a non-empty list"),
        ({"max_retries": -1}, "max_retries"),
        ({"grids": []}, "grids: a non-empty list"),
        ({"set": "lr=0.1"}, "set must be a mapping"),
        ({"resources": {"gpus": -1}}, "resources.gpus: a number >= 0"),
    ],
)
def test_malformed_sweeps(extra, message, tmp_path):
    data = {"strategy": "seq-ft", "scenario": "digits-offline", **extra}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(SweepError, match=message):
        expand(parse_sweep(data, "test"), tmp_path, "cpu")
    with pytest.raises(SweepError, match="a sweep file is a mapping"):
        parse_sweep(["seq-ft"], "test")


def test_command_line_mistakes(tmp_path, capsys):
    grid = write_yaml(tmp_path / "g.yaml", "strategy: seq-ft\nscenario: digits-offline\n")
    cases = [
        (["sweep", str(grid), "--strategy", "l2p"], "not both"),
        (["sweep", "--scenario", "digits-offline"], "needs a SWEEP.yaml file or --strategy"),
        (["sweep", str(tmp_path / "missing.yaml")], "does not exist"),
        (
            ["sweep", str(grid), "--backend", "slurm"],
            "unknown backend 'slurm'; valid choices: local, ray",
        ),
        (["sweep", str(grid), "--jobs", "0"], "--jobs must be at least 1"),
        (["sweep", str(grid), "--set", "nope"], "expected key=value"),
    ]
    for arguments, message in cases:
        assert main([*arguments, "--out", str(tmp_path / "out")]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    assert not (tmp_path / "out").exists()


def test_device_on_ray_follows_the_resources():
    assert decide_device("auto", "ray", Resources(cpus=4, gpus=1)) == "cuda"
    assert decide_device("auto", "ray", Resources(cpus=4, gpus=0)) == "cpu"
    with pytest.raises(UsageError, match="needs --gpus-per-run"):
        decide_device("cuda", "ray", Resources(gpus=0))
    with pytest.raises(UsageError, match="valid choices: auto, cpu, cuda"):
        decide_device("cuda:1", "ray", Resources(gpus=1))


@pytest.mark.parametrize(
    "path", sorted((REPO / "scripts" / "sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_shipped_sweep_files_are_valid(path, tmp_path):
    specs = expand(load_sweep(path), tmp_path, "cpu")
    assert len(specs) == len({s.folder for s in specs}) >= 4
    if path.name == "cre.yaml":
        assert len(specs) == 40
        assert {s.config["seed"] for s in specs} == {2021, 2121, 2221, 2321, 2421}
    if path.name == "prompt-vision.yaml":
        assert len(specs) == 36
        assert {s.config["backbone"] for s in specs} == {"vit-b16-in21k"}


# -- state of the runs: --status and skipping complete runs ----------------------------


def _grid_of_five(tmp_path: Path) -> tuple[list, list[str]]:
    arguments = [
        "sweep",
        "-s",
        "seq-ft",
        "-c",
        "digits-offline",
        "--seed",
        "0,1,2,3,4",
        "--preset",
        "quick",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    ]
    command = SweepCommand(
        strategies=["seq-ft"],
        scenarios=["digits-offline"],
        seeds=["0", "1", "2", "3", "4"],
        presets=["quick"],
        device="cpu",
        out=tmp_path / "out",
    )
    return plan(command)[2], arguments


def test_status_shows_done_running_failed_and_pending(tmp_path, capsys):
    specs, arguments = _grid_of_five(tmp_path)
    done, running, failed, stale, untouched = specs
    write_run_folder(done.folder, done.config, [[80.0, 0.0], [70.0, 60.0]], [10, 10])
    write_run_folder(failed.folder, failed.config, [[50.0, 0.0]], [10, 10], state="failed")
    RunFolder(failed.folder).set_status(
        "failed", finished_experiences=1, error="RuntimeError: out of patience"
    )
    # `running` per status.json, and its lock is held by a live process (this one)
    write_run_folder(running.folder, running.config, [[40.0, 0.0]], [10, 10], state="running")
    (running.folder / WORKER_FILE).write_text(json.dumps({"host": "h", "child_pid": 42}))
    # `running` per status.json, but nobody holds the lock: a killed run, resumable
    write_run_folder(stale.folder, stale.config, [[30.0, 0.0]], [10, 10], state="running")
    handle = os.open(running.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        capsys.readouterr()
        assert main([*arguments, "--status"]) == 0
        lines = capsys.readouterr().out.splitlines()
    finally:
        os.close(handle)
    by_label = {
        spec.label: [line.split() for line in lines if spec.label in line][0] for spec in specs
    }
    assert by_label[done.label][0] == "done" and "FAA" in by_label[done.label]
    assert by_label[running.label][0] == "running"
    assert " ".join(by_label[running.label][2:]) == "1/2 experiences on h pid 42"
    assert by_label[failed.label][0] == "failed"
    assert "RuntimeError: out of patience" in " ".join(by_label[failed.label])
    assert by_label[stale.label][0] == "pending"
    assert "resumes after 1/2 experiences" in " ".join(by_label[stale.label])
    assert by_label[untouched.label][:1] == ["pending"] and "not started" in " ".join(
        by_label[untouched.label]
    )
    assert lines[-1].strip() == "1 done, 1 running, 1 failed, 2 pending (of 5)"
    # the lock released: the same run now reads as pending, to be resumed
    assert main([*arguments, "--status"]) == 0
    last = capsys.readouterr().out.splitlines()[-1].strip()
    assert last == "1 done, 0 running, 1 failed, 3 pending (of 5)"


def test_a_rerun_of_a_complete_sweep_starts_nothing(tmp_path, capsys, monkeypatch):
    specs, arguments = _grid_of_five(tmp_path)
    for spec in specs:
        write_run_folder(spec.folder, spec.config, [[80.0, 0.0], [70.0, 60.0]], [10, 10])

    def no_process(*args, **kwargs):
        raise AssertionError("a complete run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    capsys.readouterr()
    assert main([*arguments, "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "5 complete (skipped)" in out and "0 to run" in out
    assert (
        "| digits-offline | vit-tiny-random (random weights) | seq-ft | 5 |" in out
    )  # the sweep's table


def test_a_folder_holding_another_configuration_is_refused(tmp_path, capsys):
    specs, arguments = _grid_of_five(tmp_path)
    other = dict(specs[0].config, seed=99)
    write_run_folder(specs[0].folder, other, [[80.0]], [10])
    assert main(arguments) == 2
    assert "holds a different configuration" in capsys.readouterr().err


# -- real sweeps ------------------------------------------------------------------------

BROKEN = """
from clbench.strategies.baselines import SequentialFineTuning


class Broken(SequentialFineTuning):
    name = "broken"

    def begin_task(self, *args, **kwargs):
        raise RuntimeError("broken on purpose")
"""


def _complete_runs(out: Path) -> dict[str, np.ndarray]:
    runs = {}
    for config in sorted(out.glob("*/*/*/config.json")):
        folder = RunFolder(config.parent)
        if folder.status().get("state") == "complete":
            runs["/".join(config.parent.parts[-3:])] = folder.accuracy_matrix()
    return runs


@pytest.mark.slow
def test_local_sweep_with_two_jobs_survives_a_crash_and_skips_on_rerun(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN)
    out = tmp_path / "out"
    arguments = [
        "sweep",
        "-s",
        "seq-ft",
        "-s",
        f"{broken}:Broken",
        "-c",
        "digits-offline",
        "--seed",
        "0,1",
        *TINY,
        "--out",
        str(out),
        "--jobs",
        "2",
    ]
    assert main(arguments) == 1  # two runs failed, the sweep went on
    first = capsys.readouterr().out
    assert "local: 2 job(s) at a time, 1 torch thread(s) each" in first
    assert first.count("failed  digits-offline/Broken/") == 2
    assert first.count("done    digits-offline/seq-ft/") == 2
    done = _complete_runs(out)
    assert len(done) == 2 and all(matrix.shape == (2, 2) for matrix in done.values())
    for label in done:
        environment = json.loads((out / label / "environment.json").read_text())
        assert environment["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert "attempt 1" in (out / label / LOG_FILE).read_text()

    assert main([*arguments, "--status"]) == 0
    status = capsys.readouterr().out
    assert "2 done, 0 running, 2 failed, 0 pending (of 4)" in status
    assert status.count("RuntimeError: broken on purpose") == 2

    assert main(arguments) == 1  # the failed runs are tried again, the complete ones not
    rerun = capsys.readouterr().out
    assert "2 complete (skipped)" in rerun and "2 to run" in rerun
    assert "seq-ft" not in rerun.split("to run")[1].split("##")[0]
    assert _complete_runs(out).keys() == done.keys()
    for label, matrix in _complete_runs(out).items():
        np.testing.assert_array_equal(matrix, done[label])


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_worker_with_identical_results(tmp_path):
    ray = pytest.importorskip("ray")
    grid = [
        "-s",
        "seq-ft",
        "-s",
        "l2p",
        "-c",
        "digits-offline",
        "--seed",
        "3",
        *TINY,
        "--set",
        "scenario.num_experiences=5",
    ]
    # a local cluster on this machine, owned by the test: ray.shutdown() ends it
    context = ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 2**20,
    )
    killed = None
    try:
        ray_out = tmp_path / "ray"
        sweep = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clbench.cli",
                "sweep",
                *grid,
                "--out",
                str(ray_out),
                "--backend",
                "ray",
                "--ray-address",
                context.address_info["address"],
                "--cpus-per-run",
                "1",
                "--progress-every",
                "5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 900
        while killed is None and time.time() < deadline and sweep.poll() is None:
            for config in ray_out.glob("*/*/*/config.json"):
                folder = RunFolder(config.parent)
                worker = (
                    json.loads((config.parent / WORKER_FILE).read_text())
                    if (config.parent / WORKER_FILE).is_file()
                    else {}
                )
                if worker and 1 <= len(folder.records()) <= 3:
                    os.kill(worker["pid"], signal.SIGKILL)  # the Ray worker running the task
                    killed = config.parent
                    break
            time.sleep(0.2)
        output, _ = sweep.communicate(timeout=900)
    finally:
        ray.shutdown()
    assert killed is not None, f"no run could be caught mid-way:\n{output}"
    assert sweep.returncode == 0, output
    log = (killed / LOG_FILE).read_text()
    assert "attempt 2" in log and "resuming" in log, log
    assert "2 ran, 0 were complete, 0 not done" in output

    local_out = tmp_path / "local"
    assert main(["sweep", *grid, "--out", str(local_out), "--jobs", "2"]) == 0
    ray_runs, local_runs = _complete_runs(ray_out), _complete_runs(local_out)
    assert len(ray_runs) == 2 and ray_runs.keys() == local_runs.keys()
    for label, matrix in ray_runs.items():
        assert matrix.shape == (5, 5)
        np.testing.assert_array_equal(matrix, local_runs[label])


def test_a_sweep_gives_its_runs_loggers_without_changing_their_identity(tmp_path, capsys):
    grid = write_yaml(
        tmp_path / "g.yaml", "strategy: seq-ft\nscenario: digits-offline\nloggers: csv\n"
    )
    with_file = plan(SweepCommand(file=grid, out=tmp_path / "out", device="cpu"))[2]
    with_flag = plan(
        SweepCommand(file=grid, loggers=["text,csv"], out=tmp_path / "out", device="cpu")
    )[2]
    without = plan(
        SweepCommand(strategies=["seq-ft"], scenarios=["digits-offline"], out=tmp_path / "out")
    )[2]
    assert with_file[0].config["loggers"] == ["csv"]
    assert with_flag[0].config["loggers"] == ["text", "csv"]  # the flag replaces the file's
    assert "loggers" not in without[0].config
    assert with_file[0].folder == with_flag[0].folder == without[0].folder
    bad = write_yaml(tmp_path / "bad.yaml", "strategy: seq-ft\nscenario: digits-offline\n")
    assert main(["sweep", str(bad), "--logger", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "loggers: unknown logger 'nope'; valid choices: " in capsys.readouterr().err
    with pytest.raises(SweepError, match="loggers: a logger name or a list of them"):
        expand(parse_sweep({"strategy": "seq-ft", "scenario": "digits-offline",
                            "loggers": [1]}, "test"), tmp_path, "cpu")  # fmt: skip


@pytest.mark.slow
def test_a_sweep_run_writes_its_loggers(tmp_path):
    out = tmp_path / "out"
    arguments = ["sweep", "-s", "seq-ft", "-c", "digits-offline", *TINY, "--out", str(out)]
    assert main([*arguments, "--logger", "csv"]) == 0
    (config,) = out.glob("*/*/*/config.json")
    assert json.loads(config.read_text())["loggers"] == ["csv"]
    assert list((config.parent / "logs" / "csv").glob("*.csv"))

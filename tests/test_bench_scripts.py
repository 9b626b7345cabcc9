"""The benchmark scripts: Avalanche's peer venv, the whole-run benchmark, the GPU check.

The peer venv is tested as CI meets it: made from the interpreter running the tests (a
venv, as the README installs into), offline from a wheel folder holding a stand-in timm
0.6.13 (the real one comes from the package index in the slow tests).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _gpu_check  # noqa: E402  (the scripts folder is not a package)
import _peer_venv  # noqa: E402
from _peer_venv import AVALANCHE_TIMM, ensure_peer_venv, peer_environment  # noqa: E402
from _whole_run_worker import accuracy_row, digits_stream  # noqa: E402
from bench_whole_run import (  # noqa: E402
    BenchDigitsOptions,
    Configuration,
    bench_digits,
    configurations,
    option_text,
    parse_arguments,
    strategy_overrides,
    whole_run_table,
)

from clbench.config import apply_overrides  # noqa: E402
from clbench.registry import STRATEGIES  # noqa: E402
from clbench.scenario import seeded_class_order, split_into_tasks  # noqa: E402


def stand_in_timm_wheel(folder: Path) -> Path:
    """A wheel named timm 0.6.13 holding one line: enough to test how the peer venv is
    layered without the package index."""
    name = f"timm-{AVALANCHE_TIMM}"
    files = {
        "timm/__init__.py": f'__version__ = "{AVALANCHE_TIMM}"\n',
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: timm\nVersion: {AVALANCHE_TIMM}\n",
        f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}.dist-info/RECORD,,")
    files[f"{name}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    stand_in_timm_wheel(folder)
    return folder


# -- Avalanche's peer venv ----------------------------------------------------------------------


def test_the_peer_venv_has_its_own_timm_first_and_this_environment_after_it(
    tmp_path, wheels, monkeypatch
):
    extra = tmp_path / "on_pythonpath"
    extra.mkdir()
    (extra / "clbench_probe_module.py").write_text("FOUND = True\n")
    monkeypatch.setenv("PYTHONPATH", str(extra))
    said: list[str] = []
    python = ensure_peer_venv(tmp_path / "peer", wheels=wheels, say=said.append)
    assert any("installing timm" in line for line in said)
    code = (
        "import json, sys, timm, torch, clbench_probe_module; print(json.dumps({'timm': "
        "timm.__version__, 'timm_file': timm.__file__, 'torch_file': torch.__file__, "
        "'path': sys.path}))"
    )
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=peer_environment()
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    peer = str((tmp_path / "peer").resolve())
    assert found["timm"] == AVALANCHE_TIMM and found["timm_file"].startswith(peer)
    # torch is this environment's: nothing but timm was installed into the peer
    assert Path(found["torch_file"]).resolve() == Path(torch.__file__).resolve()
    path = [str(Path(p).resolve()) for p in found["path"] if p]
    own = next(i for i, p in enumerate(path) if p.startswith(peer))
    assert own < path.index(str(extra.resolve()))
    assert all(own < path.index(p) for p in _peer_venv.active_package_dirs())
    # a second start reuses it as it is
    said.clear()
    assert ensure_peer_venv(tmp_path / "peer", wheels=wheels, say=said.append) == python
    assert said == []


def test_a_peer_that_does_not_see_torch_and_avalanche_is_refused_with_the_reason(
    tmp_path, wheels, monkeypatch
):
    # the old layout's failure: the peer saw the base interpreter's packages, not torch
    monkeypatch.setattr(_peer_venv, "active_package_dirs", lambda: [])
    with pytest.raises(SystemExit, match="cannot run Avalanche's L2P.*rm -r"):
        ensure_peer_venv(tmp_path / "peer", wheels=wheels, say=lambda line: None)


def test_a_peer_venv_of_another_python_is_refused(tmp_path):
    venv = tmp_path / "old"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "pyvenv.cfg").write_text("home = /nowhere\nversion = 3.2.1\n")
    with pytest.raises(SystemExit, match="made by Python 3.2"):
        ensure_peer_venv(venv, say=lambda line: None)


# -- the whole-run benchmark --------------------------------------------------------------------


def test_both_sides_build_the_same_digits_stream_and_clbench_knows_its_tasks():
    order = seeded_class_order(10, 3)

    def build():
        return digits_stream(
            train_per_class=3, test_per_class=2, class_order=order, num_experiences=5
        )

    first, second = build(), build()
    for stream in ("train_stream", "test_stream"):
        for one, other in zip(getattr(first, stream), getattr(second, stream)):
            assert len(one.dataset) == len(other.dataset)
            for index in range(len(one.dataset)):
                x, y, task = one.dataset[index]
                assert x.shape == (3, 224, 224) and task == 0
                assert torch.equal(x, other.dataset[index][0]) and y == other.dataset[index][1]
    expected = split_into_tasks(order, 5)
    for index, experience in enumerate(first.train_stream):
        assert sorted(experience.classes_in_this_experience) == sorted(expected[index])
        assert len(experience.dataset) == 6 and len(first.test_stream[index].dataset) == 4
    scenario = bench_digits(BenchDigitsOptions(3, 2, 5), None, seed=3)
    assert scenario.classes_per_experience == [sorted(c) for c in expected]
    assert scenario.num_classes == 10


def test_avalanche_accuracy_rows_read_its_metric_names_with_or_without_task_labels():
    metrics = {
        "Top1_Acc_Exp/eval_phase/test_stream/Exp000": 0.5,
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001": 0.25,
        "Loss_Exp/eval_phase/test_stream/Exp000": 3.0,
    }
    assert accuracy_row(metrics, [0, 1], 3) == [50.0, 25.0, None]


def test_the_runs_use_real_options_and_avalanche_s_l2p_settings():
    args = parse_arguments(["--epochs", "2", "--batch-size", "4", "--depth", "3"])
    for name in ("l2p", "hide-prompt", "norga"):
        config_class = STRATEGIES.get(name).Config
        known = set(config_class.__dataclass_fields__)
        for caches in ("on", "off"):
            args.run_one, args.caches = name, caches
            overrides = strategy_overrides(args, "prompted_cache" in known)
            # every key is an option of the strategy and parses as --set parses it
            config = apply_overrides(
                config_class(), {k: option_text(v) for k, v in overrides.items()}, what=name
            )
            assert config.epochs == 2 and config.batch_size == 4
            assert config.cache_queries is (caches == "on")
            if "prompted_cache" in known:
                assert config.prompted_cache is (caches == "on")
            if name == "l2p":
                assert (config.lr, config.pull_weight, config.head_input) == (
                    0.03,
                    0.1,
                    "prompt_mean",
                )
            else:
                assert config.prompt_layers == [0, 1, 2]  # a 3-block ViT


def test_configurations_are_interleaved_and_compared_with_avalanche_at_their_precision():
    args = parse_arguments(
        ["--precisions", "fp32", "bf16", "--sides", "avalanche", "l2p", "norga"]
        + ["--avalanche-evaluate", "all", "seen"]
    )
    planned = configurations(args)
    assert [c.label for c in planned[:5]] == [
        "avalanche l2p fp32, eval all",
        "avalanche l2p fp32, eval seen",
        "clbench l2p fp32",
        "clbench norga fp32, caches on",
        "clbench norga fp32, caches off",
    ]
    assert len(planned) == 10

    def result(run_s):
        return {
            "run_s": run_s,
            "process_s": run_s + 10,
            "train_items": 100,
            "evaluated_items": 30,
            "peak_mib": 500.0,
            "accuracy": [[50.0, None], [40.0, 60.0]],
        }

    runs = {
        Configuration("avalanche", "fp32"): [result(100.0)],
        Configuration("avalanche", "fp32", evaluate="seen"): [result(80.0)],
        Configuration("l2p", "fp32"): [result(60.0), result(40.0), result(50.0)],
        Configuration("l2p", "bf16"): [result(30.0)],  # no Avalanche bf16 row: no ratio
    }
    lines = {line.split("  ")[0]: line for line in whole_run_table(runs).splitlines()}
    assert " 50.0 " in lines["clbench l2p fp32"] and " 2.00x " in lines["clbench l2p fp32"]
    assert " 1.25x " in lines["avalanche l2p fp32, eval seen"]
    assert " - " in lines["clbench l2p bf16"]
    assert lines["clbench l2p fp32"].rstrip().endswith("50.0")  # FAA of the last row


def test_the_floor_is_a_configuration_and_its_ratio_bounds_every_exact_run():
    args = parse_arguments(["--sides", "avalanche", "l2p", "l2p-floor"])
    labels = [c.label for c in configurations(args)]
    assert labels[-1] == "floor: l2p's unavoidable passes, fp32"
    runs = {
        Configuration("avalanche", "fp32"): [{"run_s": 30.0, "accuracy": [[50.0]]}],
        Configuration("l2p-floor", "fp32"): [{"run_s": 20.0, "accuracy": None}],
    }
    for results in runs.values():
        results[0] |= {"process_s": 40.0, "train_items": 100, "evaluated_items": 30}
        results[0] |= {"peak_mib": 500.0}
    line = whole_run_table(runs).splitlines()[-1]
    assert " 1.50x " in line and line.rstrip().endswith("-")  # no accuracy: it trains nothing


# -- the GPU check ------------------------------------------------------------------------------


def test_the_gpu_wheels_are_what_the_machine_lacks():
    wanted = _gpu_check.requirement_closure(["avalanche-lib", "pot"], "3.12")
    assert {"avalanche-lib", "pot", "wandb", "gputil", "pytorchcv", "qpsolvers"} <= set(wanted)
    assert not {"torch", "numpy", "timm", "scikit-learn"} & set(wanted)  # the image has them
    assert wanted["pot"] == "0.9.5"  # a small wheel (0.9.7's bundles 33 MB)


def test_only_missing_wheels_are_installed_and_timm_only_when_older(tmp_path, monkeypatch):
    for name in (
        "timm-0.6.13-py3-none-any.whl",
        "timm-1.0.31-py3-none-any.whl",
        "avalanche_lib-0.6.0-py3-none-any.whl",
        "clbench_absent_package-1.0-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    chosen = [w.name for w in _gpu_check.wheels_to_install(tmp_path)]
    assert chosen == ["clbench_absent_package-1.0-py3-none-any.whl"]
    monkeypatch.setattr(_gpu_check, "installed_version", lambda name: "0.9.16")
    chosen = [w.name for w in _gpu_check.wheels_to_install(tmp_path)]
    assert chosen == ["timm-1.0.31-py3-none-any.whl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_the_gpu_check_fails_fast_without_cuda(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "run", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "site")},
        timeout=300,
    )
    assert done.returncode == 3
    assert "CUDA is not available" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "site").exists() and not (tmp_path / "out").exists()
    usage = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# -- end to end, as a user runs them ------------------------------------------------------------


def real_timm_wheels() -> list[str]:
    """``--wheels`` for the real timm 0.6.13: the GPU check's folder where it has it,
    else nothing (the package index)."""
    folder = REPO / ".gpu_wheels"
    return ["--wheels", str(folder)] if any(folder.glob("timm-0.6.13-*.whl")) else []


@pytest.mark.slow
def test_the_whole_run_benchmark_runs_both_sides_end_to_end(tmp_path):
    command = [sys.executable, str(SCRIPTS / "bench_whole_run.py"), "--depth", "2"]
    command += ["--train-per-class", "2", "--test-per-class", "1", "--batch-size", "4"]
    command += ["--eval-batch-size", "4", "--threads", "1", "--repeats", "1"]
    command += ["--sides", "avalanche", "l2p", "hide-prompt", "--venv", str(tmp_path / "peer")]
    command += [*real_timm_wheels(), "--json", str(tmp_path / "runs.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout + done.stderr
    for label in (
        "avalanche l2p fp32, eval all",
        "clbench l2p fp32",
        "clbench hide-prompt fp32, caches on",
        "clbench hide-prompt fp32, caches off",
    ):
        assert label in done.stdout
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    results = {run["configuration"]["label"]: run["results"][0] for run in runs}
    avalanche, clbench = results["avalanche l2p fp32, eval all"], results["clbench l2p fp32"]
    assert avalanche["evaluated_items"] == 5 * 10  # the whole test stream after each task
    assert clbench["evaluated_items"] == 2 * (1 + 2 + 3 + 4 + 5)  # the seen experiences
    assert len(avalanche["accuracy"]) == len(clbench["accuracy"]) == 5
    # the same weights on both sides: the same query features
    gap = (torch.tensor(avalanche["probe"]) - torch.tensor(clbench["probe"])).abs().max()
    assert gap < 1e-4
    assert "same weights on every side" in done.stdout


@pytest.mark.slow
def test_the_gpu_check_dry_run_goes_through_every_step(tmp_path):
    wheels = tmp_path / "wheels"
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d"]
    subprocess.run([*download, str(wheels), f"timm=={AVALANCHE_TIMM}"], check=True)
    out = tmp_path / "out"
    environment = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_WHEELS": str(wheels),
        "GPU_CHECK_SITE": str(tmp_path / "site"),
    }
    command = ["bash", str(SCRIPTS / "gpu_check.sh"), "run", "--dry-run", "--out", str(out)]
    command += ["--venv", str(tmp_path / "peer"), "--budget-s", "2400"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=3000)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    names = {(r["name"], r["precision"]) for r in summary["bench"]["2"]}
    assert names == {
        (side, p) for side in ("avalanche l2p", "clbench l2p") for p in ("bf16", "fp32")
    }
    assert summary["agreement"]["argmax_agreement"] >= 0.5
    assert summary["bf16_tests_exit_code"] == 0
    assert (tmp_path / "site" / "clbench").is_dir()  # clbench itself went into the target


def test_the_readout_benchmark_times_every_readout(tiny_vit, capsys):
    import argparse

    import bench_readout

    args = argparse.Namespace(batch_size=2, prompt_tokens=3, rounds=1, repeats=1)
    bench_readout.measure("tiny", tiny_vit, torch.randn(1, 3, 32, 32), args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("tiny: batch 2") and len(lines) == 4
    for line in lines[2:]:
        assert all(f"{readout} " in line for readout in ("tokens", "prompt", "pooled"))
        assert "tokens " in line and "(1.000x)" in line


def test_the_eval_cost_counter_passes_the_forward_s_keywords_through(tiny_vit):
    from bench_eval_cost import ForwardCounter

    from clbench.encoders import Prompt

    counter = ForwardCounter(tiny_vit)
    try:
        x = torch.randn(3, 3, 32, 32)
        tiny_vit(x)  # an un-prompted pass is not counted
        prompt = Prompt(tokens=torch.zeros(1, 2, tiny_vit.embed_dim))
        assert tiny_vit(x, prompt, readout="pooled").readout == "pooled"
        assert counter.rows == 3
    finally:
        counter.remove()

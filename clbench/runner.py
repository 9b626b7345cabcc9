"""The run loop: train each experience, evaluate the test experiences, checkpoint, record.

After experience t it evaluates the test experiences 0..t (``evaluate="seen"``, the
default): the unseen ones' classes are masked, so their accuracy is 0 by construction and
evaluating them was ~45% of all evaluation passes for 10 tasks. Their entries are
recorded as not evaluated (None). ``evaluate="all"`` evaluates every test experience, as
runs before did, for forward-transfer studies.

``resolve_run`` turns names and ``--set`` overrides into a validated configuration before
anything is written; ``execute`` runs it into a run folder and can resume one.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from avalanche.core import SupervisedPlugin

from clbench import __version__
from clbench.config import apply_overrides, authors_quirks
from clbench.errors import UsageError
from clbench.kill_switch import kill_switch_plugins
from clbench.progress import close_all, progress
from clbench.registry import BACKBONES, SCENARIOS, load_strategy_class, options_class
from clbench.resolution import (
    AUTHORS_PRESET,
    SCENARIO_PRESET_PREFIX,
    authors_preset_name,
    check_device_name,
    choose_backbone,
    resolve_preset,
    split_preset,
)
from clbench.results import ExperienceRecord, RunFolder
from clbench.results.checkpoint import load_checkpoint, save_checkpoint
from clbench.results.folder import EVALUATE_CHOICES, evaluation_mode
from clbench.results.run_log import ConsoleLog, saved_console
from clbench.run_loggers import RunLoggers, parse_logger_kinds, run_evaluator
from clbench.scenario import Scenario, ScenarioSpec
from clbench.strategy import CLStrategy, EpochProgress
from clbench.training import EvalProgress

# the preset steps live in clbench.resolution (torch-free, for the CLI's checks); their
# names stay importable from here
__all__ = [
    "AUTHORS_PRESET",
    "SCENARIO_PRESET_PREFIX",
    "RunRequest",
    "authors_preset_name",
    "execute",
    "new_run_folder",
    "options_class",
    "resolve_preset",
    "resolve_run",
    "split_preset",
]

PROTOCOL_VERSION = 1
# options that name a file or folder, recorded absolute in config.json
PATH_OPTIONS = {"scenario": ("data_file",), "backbone": ("checkpoint", "path")}
log = logging.getLogger(__name__)


@dataclass
class RunRequest:
    strategy: str
    scenario: str
    backbone: str | None = None
    seed: int = 0
    preset: str = "auto"
    strategy_overrides: dict[str, str] = field(default_factory=dict)
    scenario_overrides: dict[str, str] = field(default_factory=dict)
    backbone_overrides: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    # which test experiences are evaluated after each experience: "seen" (0..t) or "all"
    evaluate: Literal["seen", "all"] = "seen"
    # --logger values (names or comma lists): Avalanche loggers in RUN_DIR/logs/<kind>
    loggers: list[str] = field(default_factory=list)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_run(request: RunRequest) -> dict[str, Any]:
    """A full, validated configuration (a JSON-able dict); raises UsageError on bad input."""
    strategy_class = load_strategy_class(request.strategy)
    scenario_factory = SCENARIOS.get(request.scenario)
    spec: ScenarioSpec = SCENARIOS.spec(request.scenario)
    preset, preset_values = resolve_preset(
        strategy_class, request.preset, request.scenario, spec.protocol
    )
    backbone = choose_backbone(request.backbone, preset_values, spec.default_backbone)
    backbone_factory = BACKBONES.get(backbone)
    scenario_defaults = options_class(scenario_factory)()
    preset_strategy, preset_scenario = split_preset(
        preset_values, {f.name for f in fields(scenario_defaults)}
    )
    # what the scenario itself says a preset of this name needs (its smoke settings)
    preset_scenario = {**spec.preset_options.get(preset, {}), **preset_scenario}
    strategy_config = apply_overrides(
        strategy_class.Config(), preset_strategy, what=f"{strategy_class.name} preset"
    )
    strategy_config = apply_overrides(
        strategy_config, request.strategy_overrides, what=strategy_class.name or "strategy"
    )
    # the preset's scenario options first, so the user's --set scenario.X wins
    scenario_options = apply_overrides(
        scenario_defaults, preset_scenario, what=f"{strategy_class.name} preset {preset}"
    )
    scenario_options = apply_overrides(
        scenario_options, request.scenario_overrides, what=f"scenario {request.scenario}"
    )
    backbone_options = apply_overrides(
        options_class(backbone_factory)(), request.backbone_overrides, what=f"backbone {backbone}"
    )
    # checks that need no data (task counts, class orders) refuse before a folder exists
    _check_at_least_one(strategy_config, ("epochs", "batch_size", "eval_batch_size"))
    if spec.check_options is not None:
        spec.check_options(scenario_options)
    if request.evaluate not in EVALUATE_CHOICES:
        raise UsageError(
            f"unknown evaluate {request.evaluate!r}; valid choices: {', '.join(EVALUATE_CHOICES)}"
        )
    loggers = parse_logger_kinds(request.loggers)
    return {
        "clbench_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "strategy": absolute_strategy_file(request.strategy),
        "scenario": request.scenario,
        "backbone": backbone,
        # from the backbone's registration: its numbers are chance level (tables say so)
        "backbone_random_weights": _random_weights(backbone, backbone_options),
        "seed": request.seed,
        "preset": preset,
        "device": resolve_device(request.device),
        "strategy_options": strategy_config.to_dict(),
        "scenario_options": _absolute_paths(scenario_options.to_dict(), PATH_OPTIONS["scenario"]),
        "backbone_options": _absolute_paths(backbone_options.to_dict(), PATH_OPTIONS["backbone"]),
        # what the tables need to know about the scenario, so they never special-case names
        "scenario_family": spec.family,
        "scenario_protocol": spec.protocol or request.scenario,
        "metrics": list(spec.metrics),
        "evaluate": request.evaluate,
        # only when asked for: other configurations (and sweep identities) stay as they were
        **({"loggers": loggers} if loggers else {}),
        # options that reproduce the authors' code rather than their paper (tables mark them)
        "authors_quirks": [
            *authors_quirks(strategy_config),
            *authors_quirks(scenario_options, "scenario."),
            *authors_quirks(backbone_options, "backbone."),
        ],
    }


def absolute_strategy_file(strategy: str) -> str:
    """``file.py:Class`` with the file made absolute, so that ``--resume`` from another
    folder imports the same file; a registered name or ``module:Class`` as given."""
    module_part, colon, class_name = strategy.rpartition(":")
    if colon and (module_part.endswith(".py") or "/" in module_part):
        return f"{os.path.abspath(os.path.expanduser(module_part))}:{class_name}"
    return strategy


def _absolute_paths(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The file options among ``options`` made absolute (``--resume`` from any folder)."""
    return {
        key: os.path.abspath(os.path.expanduser(value))
        if key in names and isinstance(value, str) and value
        else value
        for key, value in options.items()
    }


def _random_weights(backbone: str, options: Any) -> bool:
    # imported here: at module level it would register the backbones before anything
    # asked for them (the catalog is trusted only while nothing is registered)
    from clbench.encoders.zoo import RandomInit

    spec = BACKBONES.spec(backbone)
    return isinstance(spec, RandomInit) and spec.random_weights(options)


def _check_at_least_one(options: Any, names: tuple[str, ...]) -> None:
    """Zero epochs would make a "complete" run that trained nothing; a zero batch size a
    torch traceback deep in the data loader."""
    for name in names:
        value = getattr(options, name, None)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"{name}={value}: must be at least 1")


def new_run_folder(out: Path, config: dict[str, Any]) -> RunFolder:
    strategy_name = config["strategy"].rpartition(":")[2] or config["strategy"]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(out) / config["scenario"] / strategy_name.replace("/", "_")
    name = f"{config['backbone']}_seed{config['seed']}_{stamp}"
    path, suffix = base / name, 1
    while path.exists():
        suffix += 1
        path = base / f"{name}-{suffix}"
    return RunFolder(path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class AccuracyCollector(SupervisedPlugin):
    """Correct predictions and item counts per evaluated experience, kept on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.correct: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def after_eval_iteration(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        index = int(strategy.experience.current_experience)
        hits = (strategy.mb_output.argmax(dim=1) == strategy.mb_y).sum()
        self.correct[index] = self.correct.get(index, 0) + hits
        self.counts[index] = self.counts.get(index, 0) + int(strategy.mb_y.shape[0])

    def rows(
        self, experiences: int
    ) -> tuple[list[float | None], list[int | None], list[int | None]]:
        """Accuracy (%), correct and counted items per test experience; None for the
        experiences not evaluated."""
        accuracy: list[float | None] = [None] * experiences
        correct: list[int | None] = [None] * experiences
        counts: list[int | None] = [None] * experiences
        for i, n in self.counts.items():
            hits = int(self.correct[i])
            accuracy[i], correct[i], counts[i] = 100.0 * hits / n, hits, n
        return accuracy, correct, counts


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_components(config: dict[str, Any]) -> tuple[CLStrategy, Scenario]:
    """Encoder, scenario and strategy of a resolved configuration (seeded)."""
    seed_everything(config["seed"])
    backbone_factory = BACKBONES.get(config["backbone"])
    encoder = backbone_factory(options_class(backbone_factory)(**config["backbone_options"]))
    scenario_factory = SCENARIOS.get(config["scenario"])
    with progress(None, f"preparing scenario {config['scenario']}"):
        scenario = scenario_factory(
            options_class(scenario_factory)(**config["scenario_options"]), encoder, config["seed"]
        )
    strategy_class = load_strategy_class(config["strategy"])
    strategy = strategy_class(
        encoder=encoder,
        num_classes=scenario.num_classes,
        config=strategy_class.Config(**config["strategy_options"]),
        device=config["device"],
        # progress lines for training and evaluation; the kill switch: tests only
        plugins=[EpochProgress(), EvalProgress(), *kill_switch_plugins()],
        evaluator=run_evaluator(config),
        class_names=scenario.class_names,
        num_tasks=scenario.num_experiences,
    )
    return strategy, scenario


def _epoch_history(strategy: CLStrategy) -> list[dict[str, float]]:
    """What the run's EpochProgress measured over the experience just trained."""
    for plugin in strategy.plugins:
        if isinstance(plugin, EpochProgress):
            return list(plugin.epochs)
    return []


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def execute(
    folder: RunFolder,
    config: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
) -> RunFolder:
    """Run (or resume) the configuration into ``folder``; returns the folder.

    A new run builds its encoder, scenario and strategy *before* the folder is created, so
    bad input that only shows while building (a missing data set, options a strategy's
    ``setup`` refuses) raises with nothing written. ``echo`` receives the progress lines
    (default: the ``clbench.runner`` logger). Everything printed meanwhile is also kept
    in the folder's run.log (:mod:`clbench.results.run_log`; appended on resume), with the
    traceback of a run that fails.
    """
    say = echo if echo is not None else log.info
    if resume:
        if not folder.exists():
            raise UsageError(f"{folder.path} is not a clbench run folder (no config.json)")
        config = folder.config()
        if folder.status().get("state") == "complete":
            say(f"{folder.path}: already complete")
            return folder
    assert config is not None
    # the console goes into RUN_DIR/run.log too, from the first line of building on
    with saved_console() as console:
        try:
            return _execute(folder, config, resume, say, console)
        except KeyboardInterrupt:
            raise  # the run loop said how to resume
        except BaseException:
            console.note(traceback.format_exc())
            raise


def _execute(
    folder: RunFolder,
    config: dict[str, Any],
    resume: bool,
    say: Callable[[str], None],
    console: ConsoleLog,
) -> RunFolder:
    components = build_components(config)
    if not resume:
        folder.path.mkdir(parents=True, exist_ok=False)
        folder.write_config(config)
    console.keep_in(folder.path, _log_header(resume))
    folder.write_environment(config["device"])
    previous_handler = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    run_loggers = RunLoggers(folder, config, components[0])
    try:
        return _run_experiences(folder, config, components, resume, say, run_loggers)
    except KeyboardInterrupt:
        finished = len(folder.records())
        folder.set_status("interrupted", finished_experiences=finished)
        say(
            f"interrupted after {finished} finished experiences; "
            f"resume with: clbench run --resume {folder.path}"
        )
        raise
    except BaseException as error:
        folder.set_status(
            "failed",
            finished_experiences=len(folder.records()),
            error=f"{type(error).__name__}: {error}",
        )
        raise
    finally:
        close_all()  # no progress bar or heartbeat outlives a run that raised mid-phase
        run_loggers.close()
        signal.signal(signal.SIGTERM, previous_handler)


def _log_header(resume: bool) -> str:
    """The line before each process's part of run.log (a resumed run appends its own)."""
    what = "resumed" if resume else "started"
    return (
        f"=== clbench {__version__} run {what} on {socket.gethostname()}, pid {os.getpid()}, "
        f"{datetime.now().isoformat(timespec='seconds')} ==="
    )


def _run_experiences(
    folder: RunFolder,
    config: dict[str, Any],
    components: tuple[CLStrategy, Scenario],
    resume: bool,
    echo: Callable[[str], None],
    run_loggers: RunLoggers,
) -> RunFolder:
    strategy, scenario = components
    train_stream = scenario.benchmark.train_stream
    test_stream = scenario.benchmark.test_stream
    start = 0
    if resume and (folder.path / "checkpoint.pt").is_file():
        checkpoint = load_checkpoint(folder)
        strategy.load_state_dict(checkpoint["strategy"])
        start = checkpoint["finished_experiences"]
        if len(folder.records()) < start:  # killed between checkpoint and progress record
            folder.append_record(ExperienceRecord(**checkpoint["record"]))
        echo(f"resuming {folder.path} after {start} finished experiences")
    folder.set_status("running", finished_experiences=start)
    run_loggers.open(start, resumed=resume)
    echo(
        f"run {folder.path}\n{scenario.summary()}\nstrategy {config['strategy']} "
        f"(preset {config['preset']}), backbone {config['backbone']}, device {config['device']}, "
        f"seed {config['seed']}"
    )
    device = config["device"]
    # read back from config.json on resume: a run keeps the mode it started with
    evaluate_seen = evaluation_mode(config) == "seen"
    for index in range(start, scenario.num_experiences):
        seed_everything(config["seed"] * 1000 + index)  # resumable: no RNG state carried over
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        strategy.train(train_stream[index])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - began

        began = time.perf_counter()
        collector = AccuracyCollector()
        strategy.plugins.append(collector)
        try:
            strategy.eval(test_stream[: index + 1] if evaluate_seen else test_stream)
        finally:
            strategy.plugins.remove(collector)
        accuracy, correct, counts = collector.rows(scenario.num_experiences)
        eval_seconds = time.perf_counter() - began
        record = ExperienceRecord(
            experience=index,
            accuracy=accuracy,
            correct=correct,
            counts=counts,
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            peak_memory_mb=_peak_memory_mb(device),
            extra=strategy.evaluation_summary(),
            epochs=_epoch_history(strategy),
            trained_parameters=getattr(strategy, "trained_parameter_count", None),
        )
        written = save_checkpoint(
            folder,
            {
                "strategy": strategy.state_dict(include_query_cache=False),
                "finished_experiences": index + 1,
                "record": vars(record),
            },
            query_cache=strategy.query_cache,  # written incrementally, beside the state
        )
        record.checkpoint_bytes, record.checkpoint_seconds = written.bytes_written, written.seconds
        folder.append_record(record)
        run_loggers.after_experience()
        folder.set_status("running", finished_experiences=index + 1)
        summary = folder.metrics()
        seen_row = " ".join(f"{a:5.1f}" for a in record.accuracy[: index + 1])
        echo(
            f"experience {index}: train {train_seconds:.1f}s, eval {eval_seconds:.1f}s | "
            f"accuracy on seen tasks [{seen_row}] | FAA {summary['faa']:.2f} "
            f"seen-class acc {summary['seen_accuracy'][-1]:.2f}"
        )
        sys.stdout.flush()
    folder.set_status("complete", finished_experiences=scenario.num_experiences)
    summary = folder.metrics()
    echo(
        f"done: FAA {summary['faa']:.2f}  CAA {summary['caa']:.2f}  FFM {summary['ffm']:.2f}  "
        f"({summary['train_seconds'] + summary['eval_seconds']:.0f}s) -> {folder.path}"
    )
    return folder

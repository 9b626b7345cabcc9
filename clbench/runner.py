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
import random
import resource
import signal
import sys
import time
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
from clbench.registry import BACKBONES, SCENARIOS, load_strategy_class, options_class
from clbench.results import ExperienceRecord, RunFolder
from clbench.results.checkpoint import load_checkpoint, save_checkpoint
from clbench.results.folder import EVALUATE_CHOICES, evaluation_mode
from clbench.scenario import Scenario, ScenarioSpec
from clbench.strategy import CLStrategy, EpochProgress

__all__ = ["RunRequest", "execute", "new_run_folder", "options_class", "resolve_run"]

PROTOCOL_VERSION = 1
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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; valid choices: auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return device


# a preset key "scenario.<option>" sets a scenario option (the quick presets shrink the data)
SCENARIO_PRESET_PREFIX = "scenario."


def resolve_preset(
    strategy_class: type[CLStrategy], preset: str, scenario: str, protocol: str = ""
) -> tuple[str, dict[str, Any]]:
    """``auto`` = the strategy's preset named after the scenario if it has one, else defaults.

    ``authors`` = the authors' official code's settings for this scenario: the preset
    ``authors:<scenario>``, else ``authors:<protocol>`` (the paper protocol the scenario
    follows, so fewrel-offline takes the fewrel one); the name recorded is the one found.

    The values keep their keys: strategy hyper-parameters bare, scenario options as
    ``scenario.<option>`` (see :func:`split_preset`).
    """
    presets = strategy_class.presets
    if preset == "auto":
        preset = scenario if scenario in presets else "default"
    if preset == "default":
        return preset, {}
    if preset == AUTHORS_PRESET:
        return _authors_preset(strategy_class, scenario, protocol)
    if preset not in presets:
        valid = ", ".join(["auto", "default", *sorted(presets)])
        raise UsageError(
            f"unknown preset {preset!r} for {strategy_class.name}; valid choices: {valid}"
        )
    return preset, dict(presets[preset])


AUTHORS_PRESET = "authors"


def authors_preset_name(scenario: str) -> str:
    return f"{AUTHORS_PRESET}:{scenario}"


def _authors_preset(
    strategy_class: type[CLStrategy], scenario: str, protocol: str
) -> tuple[str, dict[str, Any]]:
    presets = strategy_class.presets
    for name in (authors_preset_name(scenario), authors_preset_name(protocol)):
        if name in presets:
            return name, dict(presets[name])
    prefix = authors_preset_name("")
    known = sorted(p.removeprefix(prefix) for p in presets if p.startswith(prefix))
    where = ", ".join(known) if known else "none"
    raise UsageError(
        f"{strategy_class.name} has no authors preset for scenario {scenario!r}; "
        f"scenarios with one: {where}"
    )


def split_preset(
    values: dict[str, Any], scenario_fields: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preset's strategy values and the scenario options among ``scenario_fields``.

    One preset (``quick``) serves every scenario, so a ``scenario.<option>`` key applies
    to the scenarios that have that option (``scenario.n_train`` shrinks fewrel-offline
    and leaves digits-offline, which has no such option, as it is).
    """
    strategy_values: dict[str, Any] = {}
    scenario_values: dict[str, Any] = {}
    for key, value in values.items():
        if not key.startswith(SCENARIO_PRESET_PREFIX):
            strategy_values[key] = value
        elif (option := key.removeprefix(SCENARIO_PRESET_PREFIX)) in scenario_fields:
            scenario_values[option] = value
    return strategy_values, scenario_values


def resolve_run(request: RunRequest) -> dict[str, Any]:
    """A full, validated configuration (a JSON-able dict); raises UsageError on bad input."""
    strategy_class = load_strategy_class(request.strategy)
    scenario_factory = SCENARIOS.get(request.scenario)
    spec: ScenarioSpec = SCENARIOS.spec(request.scenario)
    backbone = request.backbone or spec.default_backbone
    backbone_factory = BACKBONES.get(backbone)
    preset, preset_values = resolve_preset(
        strategy_class, request.preset, request.scenario, spec.protocol
    )
    scenario_defaults = options_class(scenario_factory)()
    preset_strategy, preset_scenario = split_preset(
        preset_values, {f.name for f in fields(scenario_defaults)}
    )
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
    return {
        "clbench_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "strategy": request.strategy,
        "scenario": request.scenario,
        "backbone": backbone,
        "seed": request.seed,
        "preset": preset,
        "device": resolve_device(request.device),
        "strategy_options": strategy_config.to_dict(),
        "scenario_options": scenario_options.to_dict(),
        "backbone_options": backbone_options.to_dict(),
        # what the tables need to know about the scenario, so they never special-case names
        "scenario_family": spec.family,
        "scenario_protocol": spec.protocol or request.scenario,
        "metrics": list(spec.metrics),
        "evaluate": request.evaluate,
        # options that reproduce the authors' code rather than their paper (tables mark them)
        "authors_quirks": [
            *authors_quirks(strategy_config),
            *authors_quirks(scenario_options, "scenario."),
            *authors_quirks(backbone_options, "backbone."),
        ],
    }


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
    scenario = scenario_factory(
        options_class(scenario_factory)(**config["scenario_options"]), encoder, config["seed"]
    )
    strategy_class = load_strategy_class(config["strategy"])
    strategy = strategy_class(
        encoder=encoder,
        num_classes=scenario.num_classes,
        config=strategy_class.Config(**config["strategy_options"]),
        device=config["device"],
        plugins=[EpochProgress()],
        class_names=scenario.class_names,
        num_tasks=scenario.num_experiences,
    )
    return strategy, scenario


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
    (default: the ``clbench.runner`` logger).
    """
    say = echo if echo is not None else log.info
    if resume:
        if not folder.exists():
            raise UsageError(f"{folder.path} is not a clbench run folder (no config.json)")
        config = folder.config()
        if folder.status().get("state") == "complete":
            say(f"{folder.path}: already complete")
            return folder
        components = build_components(config)
    else:
        assert config is not None
        components = build_components(config)
        folder.path.mkdir(parents=True, exist_ok=False)
        folder.write_config(config)
    folder.write_environment(config["device"])
    previous_handler = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return _run_experiences(folder, config, components, resume, say)
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
        signal.signal(signal.SIGTERM, previous_handler)


def _run_experiences(
    folder: RunFolder,
    config: dict[str, Any],
    components: tuple[CLStrategy, Scenario],
    resume: bool,
    echo: Callable[[str], None],
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
        )
        save_checkpoint(
            folder,
            {
                "strategy": strategy.state_dict(),
                "finished_experiences": index + 1,
                "record": vars(record),
            },
        )
        folder.append_record(record)
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

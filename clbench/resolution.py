"""The steps of resolving a run that need no torch: presets and device names.

:func:`clbench.runner.resolve_run` runs them on the registered classes; the command line
runs the same functions on the catalog's copy of the presets (:mod:`clbench.cli.preflight`)
to refuse bad input before it imports torch, so both give the same message.
"""

from __future__ import annotations

from typing import Any, Protocol

from clbench.errors import UsageError

# a preset key "scenario.<option>" sets a scenario option (the quick presets shrink the data)
SCENARIO_PRESET_PREFIX = "scenario."
# a preset key "backbone" names the backbone the run takes unless --backbone names one (the
# authors presets: the weights the authors' code loads)
BACKBONE_PRESET_KEY = "backbone"
AUTHORS_PRESET = "authors"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class PresetOwner(Protocol):
    """What the preset steps read of a strategy: a registered class, or the catalog's copy."""

    name: str
    presets: dict[str, dict[str, Any]]


def check_device_name(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether CUDA is there is torch's to say."""
    if device not in DEVICE_CHOICES and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; valid choices: {', '.join(DEVICE_CHOICES)}")


def resolve_preset(
    strategy_class: PresetOwner, preset: str, scenario: str, protocol: str = ""
) -> tuple[str, dict[str, Any]]:
    """``auto`` = the strategy's preset named after the scenario if it has one, else defaults.

    A named preset P takes ``P:<scenario>`` (else ``P:<protocol>``) over it where the
    strategy has one (``quick:digits-offline``).

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
    # ``<preset>:<scenario>`` (else ``:<protocol>``) refines the preset on that scenario:
    # one quick preset whose digits-offline steps differ from its fewrel-offline ones
    for refined in (f"{preset}:{scenario}", f"{preset}:{protocol}"):
        if refined in presets and ":" not in preset:
            return preset, {**presets[preset], **presets[refined]}
    return preset, dict(presets[preset])


def authors_preset_name(scenario: str) -> str:
    return f"{AUTHORS_PRESET}:{scenario}"


def _authors_preset(
    strategy_class: PresetOwner, scenario: str, protocol: str
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
        if key == BACKBONE_PRESET_KEY:
            continue  # the run's backbone: see choose_backbone
        if not key.startswith(SCENARIO_PRESET_PREFIX):
            strategy_values[key] = value
        elif (option := key.removeprefix(SCENARIO_PRESET_PREFIX)) in scenario_fields:
            scenario_values[option] = value
    return strategy_values, scenario_values


def choose_backbone(
    requested: str | None, preset_values: dict[str, Any], scenario_default: str
) -> str:
    """``--backbone`` if given, else the preset's ``backbone``, else the scenario's default."""
    named = preset_values.get(BACKBONE_PRESET_KEY)
    if named is not None and not isinstance(named, str):
        raise UsageError(f"a preset's backbone is a backbone name, got {named!r}")
    return requested or named or scenario_default

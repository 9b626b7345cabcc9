"""Bad input refused before torch is imported, with the run loop's own messages.

:func:`clbench.runner.resolve_run` checks a request in this order: the strategy and
scenario names, the preset, the backbone's name (``--backbone``, else the preset's, else
the scenario's default), the preset's and the user's ``--set`` values (strategy,
then scenario, then backbone), the counts that must be at least 1, the scenario's own
checks, ``--logger``, the device. :func:`check_run` makes the same checks with the same
functions (:mod:`clbench.resolution`, :func:`clbench.config.apply_overrides`) on the
catalog's copy of the registries (:mod:`clbench.catalog`), up to the scenario's own
checks, which are its code and need its module; then the logger kinds and the device
name. A request it passes is checked again, in full, by ``resolve_run``: the catalog can
only refuse early what the run loop would refuse, never accept in its place.

It runs only where the catalog file stands in for the registries (see
:func:`clbench.catalog.from_file`), and not for a user's ``module:Class`` strategy, whose
import may register anything.
"""

from __future__ import annotations

import types
from dataclasses import fields
from typing import Any

from clbench.catalog import Catalog
from clbench.config import apply_overrides, parse_set_arguments
from clbench.resolution import (
    check_device_name,
    choose_backbone,
    resolve_preset,
    split_preset,
)


def check_run(
    catalog: Catalog,
    *,
    strategy: str,
    scenario: str,
    backbone: str | None,
    preset: str,
    overrides: dict[str, dict[str, str]],
    loggers: list[str],
    device: str,
) -> None:
    """Raise the UsageError :func:`clbench.runner.resolve_run` would raise first (as far
    as the catalog can tell), or return."""
    strategy_entry = catalog.entry("strategy", strategy)
    scenario_entry = catalog.entry("scenario", scenario)
    owner = types.SimpleNamespace(name=strategy, presets=strategy_entry["presets"])
    preset, preset_values = resolve_preset(owner, preset, scenario, scenario_entry["protocol"])
    backbone = choose_backbone(backbone, preset_values, scenario_entry["default_backbone"])
    catalog.entry("backbone", backbone)
    scenario_options = catalog.options_type("scenario", scenario)()
    preset_strategy, preset_scenario = split_preset(
        preset_values, {f.name for f in fields(scenario_options)}
    )
    strategy_options = apply_overrides(
        catalog.options_type("strategy", strategy)(), preset_strategy, what=f"{strategy} preset"
    )
    apply_overrides(strategy_options, overrides["strategy"], what=strategy)
    scenario_options = apply_overrides(
        scenario_options, preset_scenario, what=f"{strategy} preset {preset}"
    )
    apply_overrides(scenario_options, overrides["scenario"], what=f"scenario {scenario}")
    apply_overrides(
        catalog.options_type("backbone", backbone)(),
        overrides["backbone"],
        what=f"backbone {backbone}",
    )
    if loggers:
        from clbench.run_loggers import parse_logger_kinds

        parse_logger_kinds(loggers)
    check_device_name(device)


def check_download(catalog: Catalog, name: str, pairs: list[str]) -> bool:
    """``clbench download NAME --set ...``'s checks, in its order; False when the
    scenario has nothing to fetch (its ``--set`` values are then never read)."""
    entry = catalog.entry("scenario", name)
    if not entry["downloads"]:
        return False
    grouped = parse_set_arguments(pairs)
    values: dict[str, Any] = {**grouped["strategy"], **grouped["scenario"]}
    apply_overrides(catalog.options_type("scenario", name)(), values, what=f"scenario {name}")
    return True

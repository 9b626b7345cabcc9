"""Every strategy's ``quick`` preset resolves on both offline scenarios, with its data subset.

``quick`` is the README's first run and the tests' real run: a few minutes on 2 CPU cores.
On fewrel-offline it carries scenario options (``scenario.n_train`` ...) that cut the
data; digits-offline has none of them and runs whole. Only ``resolve_run``: nothing runs.
"""

from __future__ import annotations

import pytest

from clbench.errors import UsageError
from clbench.registry import SCENARIOS, STRATEGIES, load_strategy_class, options_class
from clbench.runner import SCENARIO_PRESET_PREFIX, RunRequest, resolve_run, split_preset
from clbench.strategies.quick import QUICK_DATA

SCENARIO_NAMES = ["fewrel-offline", "digits-offline"]
STRATEGY_NAMES = STRATEGIES.names()


def quick(strategy: str, scenario: str, **overrides: str) -> dict:
    return resolve_run(
        RunRequest(strategy=strategy, scenario=scenario, preset="quick", device="cpu",
                   scenario_overrides=overrides)
    )  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_quick_preset_resolves(strategy: str, scenario: str) -> None:
    assert "quick" in load_strategy_class(strategy).presets
    config = quick(strategy, scenario)
    assert config["preset"] == "quick" and config["strategy_options"]["epochs"] == 1
    # scenario keys never leak into the strategy's options
    assert not any(key.startswith(SCENARIO_PRESET_PREFIX) for key in config["strategy_options"])
    options = config["scenario_options"]
    if scenario == "fewrel-offline":
        assert {k: options[k] for k in ("n_train", "n_val", "n_test", "max_length")} == {
            "n_train": 16, "n_val": 0, "n_test": 8, "max_length": 48
        }  # fmt: skip
    else:  # digits-offline has no such options: its defaults, whole
        default = options_class(SCENARIOS.get(scenario))().to_dict()
        assert options == default


def test_quick_data_names_real_options() -> None:
    """A misspelled key would be skipped everywhere: each one is some scenario's option."""
    fields = set().union(
        *(set(options_class(SCENARIOS.get(s))().to_dict()) for s in SCENARIO_NAMES)
    )
    for key in QUICK_DATA:
        assert (
            key.startswith(SCENARIO_PRESET_PREFIX)
            and key.removeprefix(SCENARIO_PRESET_PREFIX) in fields
        )


@pytest.mark.parametrize("strategy", ["l2p", "hide-prompt"])
def test_user_set_overrides_the_presets_scenario_option(strategy: str) -> None:
    options = quick(strategy, "fewrel-offline", n_train="30", max_length="64")["scenario_options"]
    assert options["n_train"] == 30 and options["max_length"] == 64
    assert options["n_test"] == 8  # the preset's other values stay


def test_other_presets_keep_the_full_data() -> None:
    config = resolve_run(RunRequest(strategy="l2p", scenario="fewrel-offline", device="cpu"))
    assert config["preset"] == "fewrel-offline"
    assert config["scenario_options"]["n_train"] == 420


def test_split_preset() -> None:
    values = {"epochs": 1, "scenario.n_train": 16, "scenario.image_size": 8}
    assert split_preset(values, {"n_train"}) == ({"epochs": 1}, {"n_train": 16})


def test_bad_preset_scenario_value_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    l2p = load_strategy_class("l2p")
    monkeypatch.setitem(l2p.presets, "broken", {"scenario.n_train": "many"})
    with pytest.raises(UsageError, match="n_train"):
        resolve_run(RunRequest(strategy="l2p", scenario="fewrel-offline", preset="broken"))

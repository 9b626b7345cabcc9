"""Start-up: the light commands answer from the catalog without torch, and say what the
live registries would say.

``clbench/catalog.json`` (:mod:`clbench.catalog`) stands in for the registries in a
fresh process: ``clbench --help``, ``list``, ``show``, ``table`` and the refusal of bad
input must not import torch (a test of what is imported, not of the clock). The file
must be what the registries give today, and whatever it refuses or prints must be what
the live path refuses or prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import pytest
from run_folders import write_run

from clbench import catalog, catalog_sources
from clbench.catalog_types import decode_type, encode_type
from clbench.cli import main
from clbench.cli.preflight import check_run
from clbench.errors import UsageError
from clbench.registry import SCENARIOS, STRATEGIES, Registry, options_class
from clbench.runner import RunRequest, resolve_run
from clbench.sweep.grid import SweepError, parse_sweep
from clbench.sweep.plan import check_before_importing, expand

HEAVY = ("torch", "avalanche", "timm", "transformers", "torchvision")
STALE = f"clbench/catalog.json is out of date with the code: run {catalog.REGENERATE}"


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """The catalog of the live registries, as ``--write`` would write it."""
    return catalog.build()


@pytest.fixture(scope="module")
def from_the_file(built) -> catalog.Catalog:
    """Today's catalog, read the way a fresh process reads the file (probes imported
    from their modules, options as stand-in dataclasses)."""
    return catalog.Catalog(json.loads(catalog.render(built)), live=False)


def test_the_catalog_file_is_what_the_registries_give(built):
    written = json.loads(catalog.CATALOG_FILE.read_text(encoding="utf-8"))
    assert catalog.differences(built, written) == [], STALE
    assert catalog.CATALOG_FILE.read_text(encoding="utf-8") == catalog.render(built), STALE
    assert catalog.read_current() is not None, STALE


def test_a_changed_or_new_source_file_makes_the_catalog_stale(built, tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(catalog.render(built))
    assert catalog.read_current(path) is not None

    changed = json.loads(catalog.render(built))
    key = "clbench.strategies:l2p.py"
    assert key in changed["fingerprint"]["files"]  # a built-in module is fingerprinted
    changed["fingerprint"]["files"][key] = "0" * 16
    path.write_text(catalog.render(changed))
    assert catalog.read_current(path) is None

    added = json.loads(catalog.render(built))
    added["fingerprint"]["modules"]["clbench.strategies"].remove("l2p")  # l2p.py is "new"
    path.write_text(catalog.render(added))
    assert catalog.read_current(path) is None

    other_format = {**json.loads(catalog.render(built)), "format": catalog.FORMAT + 1}
    path.write_text(catalog.render(other_format))
    assert catalog.read_current(path) is None
    path.write_text("{not json")
    assert catalog.read_current(path) is None


def test_the_fingerprint_covers_what_the_options_are_made_of(built):
    files = built["fingerprint"]["files"]
    for key in (
        "clbench:strategy.py",  # StrategyConfig, the base of every strategy's options
        "clbench:data/splits.py",  # TaskSplitOptions
        "clbench:data/vision.py",  # normalize_option and its Literal
        "clbench:encoders/zoo.py",
        "clbench:config.py",
        "clbench:catalog.py",
    ):
        assert key in files
    # the run loop and the command line do not shape the catalog
    assert not [k for k in files if k.startswith(("clbench:runner", "clbench:cli/"))]


def test_a_process_that_registered_anything_does_not_read_the_file():
    STRATEGIES.names()  # this process has the live registries: they answer
    assert catalog.from_file() is None


def test_an_entry_records_the_module_that_registered_it(built):
    toys: Registry[Any] = Registry("toy")
    toys.register("one", "a toy")(object)
    assert toys.entry("one").module == __name__  # not built in: never in the catalog
    for name, entry in built["strategies"].items():
        assert STRATEGIES.entry(name).module == entry["module"]
        assert entry["module"].startswith("clbench.strategies.")


# ------------------------------------------------------------------ what is imported


def _light_commands(run_folder: Path, results: Path) -> list[tuple[list[str], int, str]]:
    """(argv, exit code, text the output must hold)."""
    bad_run = ["run", "-s", "l2p", "-c", "fewrel-offline"]
    return [
        (["--help"], 0, "COMMAND"),
        (["list"], 0, "l2p"),
        (["list", "strategies", "--options"], 0, "(M) prompts in the pool"),
        (["list", "scenarios"], 0, "[data: built in]"),
        (["list", "backbones", "--options"], 0, "vit-tiny-random"),
        (["show", str(run_folder)], 0, "accuracy matrix"),
        (["table", str(results)], 0, "l2p"),
        (["run", "-s", "l2pp", "-c", "fewrel-offline"], 2, "unknown strategy 'l2pp'"),
        (["run", "-s", "l2p", "-c", "nope"], 2, "unknown scenario 'nope'; valid choices: "),
        ([*bad_run, "-b", "nope"], 2, "unknown backbone 'nope'; valid choices: "),
        ([*bad_run, "--preset", "nope"], 2, "unknown preset 'nope' for l2p; valid choices: "),
        ([*bad_run, "--set", "nope=1"], 2, "unknown l2p option 'nope'; valid options: "),
        ([*bad_run, "--set", "lr=abc"], 2, "--set lr=abc: expected float"),
        ([*bad_run, "--set", "lr"], 2, "--set 'lr': expected key=value"),
        ([*bad_run, "--set", "scenario.n_train=x"], 2, "--set n_train=x: expected int"),
        ([*bad_run, "--set", "backbone.nope=1"], 2, "unknown backbone minilm-l6 option 'nope'"),
        ([*bad_run, "--device", "tpu"], 2, "unknown device 'tpu'"),
        (["sweep", "-s", "l2pp", "-c", "fewrel-offline"], 2, "unknown strategy 'l2pp'"),
        (["sweep", "-s", "l2p", "-c", "fewrel-offline", "--set", "lr=abc"], 2, "expected float"),
        (["download", "nope"], 2, "unknown scenario 'nope'"),
        (["download", "digits-offline"], 0, "nothing to download"),
    ]


def test_the_light_commands_import_no_torch(tmp_path):
    assert catalog.read_current() is not None, STALE
    results = tmp_path / "results"
    config = {
        "clbench_version": "0.1.0",
        "protocol_version": 1,
        "strategy": "l2p",
        "scenario": "digits-offline",
        "backbone": "vit-tiny-random",
        "seed": 0,
        "preset": "quick",
        "device": "cpu",
        "strategy_options": {},
        "scenario_options": {},
        "backbone_options": {},
    }
    run_folder = write_run(
        results / "digits-offline" / "l2p" / "run", config, [[90.0, 0.0], [80.0, 70.0]], [10, 10]
    )
    commands = _light_commands(run_folder, results)
    script = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        from clbench.cli import main
        heavy = {HEAVY!r}
        report = []
        for argv in {[argv for argv, _, _ in commands]!r}:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as stop:
                    code = stop.code
            imported = [name for name in heavy if name in sys.modules]
            report.append([argv, code, out.getvalue() + err.getvalue(), imported])
        print(json.dumps(report))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    report = json.loads(done.stdout.splitlines()[-1])
    for (argv, code, output, imported), (_, expected_code, expected_text) in zip(report, commands):
        assert imported == [], f"clbench {' '.join(argv)} imported {imported}"
        assert code == expected_code, (argv, output)
        assert expected_text in output, (argv, output)


# ----------------------------------------------------- the same answers as the registries


def _listing_from_the_registries() -> str:
    """``clbench list --options`` as it was printed straight from the registries (the
    built-in entries: other tests may have registered their own)."""
    from clbench.cli.run import RANDOM_BACKBONE_NOTE
    from clbench.config import describe
    from clbench.data.download import data_marker
    from clbench.encoders.zoo import RandomInit
    from clbench.registry import BACKBONES, is_builtin_module

    lines = []
    groups = (("strategies", STRATEGIES), ("scenarios", SCENARIOS), ("backbones", BACKBONES))
    for title, registry in groups:
        lines.append(f"{title}:")
        for entry in registry:
            if not is_builtin_module(entry.module):
                continue
            note = ""
            if title == "scenarios":
                spec, options_type = entry.spec, options_class(entry.target)
                if spec.describe is not None:
                    note += f" [protocol: {spec.describe(options_type())}]"
                note += f" [default backbone: {spec.default_backbone}]"
                note += data_marker(entry.name, spec, options_type)
            if title == "strategies" and entry.target.presets:
                note = f" [presets: {', '.join(sorted(entry.target.presets))}]"
            if title == "backbones" and isinstance(entry.spec, RandomInit):
                note = RANDOM_BACKBONE_NOTE
            lines.append(f"  {entry.name:<20} {entry.description}{note}")
            options = entry.target.Config if title == "strategies" else options_class(entry.target)
            for name, type_name, default, help_text in describe(options):
                lines.append(f"      {name} ({type_name}, default {default!r}): {help_text}")
    return "\n".join(lines) + "\n"


def test_the_catalog_lists_what_the_registries_list(from_the_file, capsys, monkeypatch):
    monkeypatch.setattr(catalog, "current", lambda **_: from_the_file)
    assert main(["list", "--options"]) == 0
    assert capsys.readouterr().out == _listing_from_the_registries()


def _data_here(root: Path) -> None:
    """FewRel, TACRED and an extracted CIFAR-100 in the data root."""
    (root / "fewrel").mkdir(parents=True)
    for name in ("train_wiki.json", "val_wiki.json"):
        (root / "fewrel" / name).write_text("{}")
    (root / "tacred").mkdir()
    for name in ("train.json", "dev.json", "test.json"):
        (root / "tacred" / name).write_text("[]")
    marker = root / "cifar100" / "cifar-100-python" / ".clbench-complete"
    marker.parent.mkdir(parents=True)
    md5 = options_class(SCENARIOS.get("split-cifar100"))().md5
    marker.write_text(json.dumps({"source": "x", "md5": md5}))


@pytest.mark.parametrize("data", ["none", "some"])
def test_data_markers_from_the_catalog_are_the_registries(
    from_the_file, data, tmp_path, monkeypatch
):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path))
    if data == "some":
        _data_here(tmp_path)
    live = catalog.Catalog(from_the_file.data, live=True)
    markers = {name: from_the_file.data_marker(name) for name in from_the_file.names("scenario")}
    assert markers == {name: live.data_marker(name) for name in markers}
    assert from_the_file.probes_are_light()
    if data == "some":
        assert f"present in {tmp_path / 'fewrel'}" in markers["fewrel"]
        assert f"present in {tmp_path / 'tacred'}" in markers["tacred"]
        assert "present in" in markers["split-cifar100"]
    assert "missing" in markers["imagenet-r"]


def _refusal(check: Any) -> str | None:
    try:
        check()
    except UsageError as error:
        return str(error)
    return None


def _both(from_the_file: catalog.Catalog, **request: Any) -> tuple[str | None, str | None]:
    """The message of the catalog's check and of resolve_run (None: accepted)."""
    overrides = {
        "strategy": request.pop("strategy_overrides", {}),
        "scenario": request.pop("scenario_overrides", {}),
        "backbone": request.pop("backbone_overrides", {}),
    }
    early = _refusal(
        lambda: check_run(
            from_the_file,
            strategy=request["strategy"],
            scenario=request["scenario"],
            backbone=request.get("backbone"),
            preset=request.get("preset", "auto"),
            overrides=overrides,
            loggers=[],
            device=request.get("device", "cpu"),
        )
    )
    live = _refusal(
        lambda: resolve_run(
            RunRequest(
                **request,
                strategy_overrides=overrides["strategy"],
                scenario_overrides=overrides["scenario"],
                backbone_overrides=overrides["backbone"],
            )
        )
    )
    return early, live


def _requests(from_the_file: catalog.Catalog) -> list[dict[str, Any]]:
    """Every strategy with every scenario (presets auto and authors, which depend on the
    scenario), every named preset on a scenario with and one without the options of the
    quick data subset, every backbone; unknown names of each kind."""
    strategies, scenarios = from_the_file.names("strategy"), from_the_file.names("scenario")
    requests = [
        dict(strategy=strategy, scenario=scenario, preset=preset)
        for strategy in [*strategies, "nope"]
        for scenario in [*scenarios, "nope"]
        for preset in ("auto", "authors")
    ]
    for strategy in strategies:
        named = from_the_file.entry("strategy", strategy)["presets"]
        for preset in ["default", "nope", *named]:
            for scenario in ("fewrel-offline", "digits-offline"):
                requests.append(dict(strategy=strategy, scenario=scenario, preset=preset))
    for backbone in [*from_the_file.names("backbone"), "nope"]:
        requests.append(dict(strategy="l2p", scenario="digits-offline", backbone=backbone))
    return requests


def test_every_name_and_preset_is_judged_as_the_run_loop_judges_it(from_the_file):
    for request in _requests(from_the_file):
        early, live = _both(from_the_file, **request)
        # refused early: refused alike; passed: the run loop may still refuse (a
        # scenario's own checks), but what it accepts is never refused early
        assert early is None or early == live, request
        if live is None:
            assert early is None, request


def _request_setting(kind: str, entry_name: str, key: str, value: str) -> dict[str, Any]:
    """A run request that sets one option of one entry (seq-ft on digits-offline else)."""
    return dict(
        strategy=entry_name if kind == "strategy" else "seq-ft",
        scenario=entry_name if kind == "scenario" else "digits-offline",
        backbone=entry_name if kind == "backbone" else None,
        preset="default",
        **{f"{kind}_overrides": {key: value}},
    )


def test_every_option_is_parsed_as_the_run_loop_parses_it(from_the_file):
    """Each option of each entry set to a malformed value, and an unknown key: what the
    catalog refuses, the run loop refuses alike; what it lets pass, the run loop does not
    refuse as a bad key or value."""
    for kind in ("strategy", "scenario", "backbone"):
        for name, entry in from_the_file.entries(kind):
            for key in [option["name"] for option in entry["options"]] + ["nope"]:
                request = _request_setting(kind, name, key, "not-a-value")
                early, live = _both(from_the_file, **request)
                if early is not None:
                    assert early == live, request
                else:
                    assert live is None or not live.startswith(("--set ", "unknown")), request
                if key == "nope":
                    assert early is not None, request


def test_the_cli_refuses_early_with_the_run_loops_messages(
    from_the_file, tmp_path, capsys, monkeypatch
):
    """The CLI's own path (as a fresh process takes it) for the bad input of
    test_cli_runs: one line, exit 2, nothing written; a user's file.py:Class is left to
    the run loop, which imports it."""
    monkeypatch.setattr(catalog, "from_file", lambda: from_the_file)
    for arguments, message in [
        (["-s", "nope", "-c", "digits-offline"], "unknown strategy 'nope'; valid choices: "),
        (["-s", "l2p", "-c", "digits-offline", "--preset", "nope"], "unknown preset 'nope'"),
        (["-s", "l2p", "-c", "digits-offline", "--set", "scenario.num_experiences=x"], "int"),
        (["-s", "missing_file.py:Thing", "-c", "nope"], "missing_file.py does not exist"),
    ]:
        code = main(["run", *arguments, "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and error[-1].startswith("clbench: error: ") and message in error[-1]
        assert not (tmp_path / "out").exists()


SWEEP_MISTAKES: list[dict[str, Any]] = [
    {  # tests/test_sweep.py's bad file: every kind of problem at once, in two grid blocks
        "scenario": ["digits-offline", "no-such-scenario"],
        "strategy": ["seq-ft", "no-such-strategy"],
        "seeds": [0],
        "preset": ["quick", "no-such-preset"],
        "set": {"lr": "fast", "no_such_option": 1},
        "resources": {"cpus": 2, "tpus": 1},
        "grids": [{"backbone": "no-such-backbone"}, {"colour": "red"}],
    },
    {"strategy": ["l2p", "dualprompt"], "scenario": "fewrel-offline", "set": {"nope": 1}},
    {"strategy": "l2p", "scenario": "digits-offline", "preset": ["nope", "quick"]},
    {"strategy": "l2p", "scenario": "digits-offline", "vary": {"lr": [0.1, "x"]}},
    {"strategy": "l2p", "scenario": "digits-offline", "set": {"scenario.n_train": 3}},
    {"strategy": "l2p", "scenario": "fewrel-offline", "set": {"scenario.n_train": "x"}},
    {"strategy": "l2p", "scenario": "digits-offline", "backbone": ["vit-tiny-random", "nope"]},
    {"strategy": "hide-prompt", "scenario": "fewrel-offline", "preset": "authors"},
    {"strategy": "l2p", "scenario": "digits-offline", "loggers": ["csv,nope"], "set": {"x": 1}},
    {  # each bad value is judged under the point's preset, whose backbone it names
        "strategy": "l2p",
        "scenario": "split-cifar100",
        "preset": "authors",
        "set": {"backbone.nope": 1, "lr": "x"},
    },
]


def test_a_sweep_is_refused_before_the_imports_as_expand_refuses_it(
    from_the_file, monkeypatch, tmp_path
):
    monkeypatch.setattr(catalog, "from_file", lambda: from_the_file)
    for data in SWEEP_MISTAKES:
        with pytest.raises(SweepError) as early:
            check_before_importing(parse_sweep(data, "test.yaml"))
        with pytest.raises(SweepError) as live:
            expand(parse_sweep(data, "test.yaml"), tmp_path, "cpu")
        assert str(early.value) == str(live.value), data
        if data["scenario"] == "split-cifar100":  # the authors' backbone, not the default
            assert "unknown backbone vit-b16-orig-in21k option 'nope'" in str(early.value)
    # a user's file.py:Class may register what the catalog does not know: expand decides
    plugin = {"strategy": ["l2p", "my_file.py:Mine"], "scenario": "registered-by-my-file"}
    check_before_importing(parse_sweep(plugin, "test.yaml"))
    good = {"strategy": ["l2p", "seq-ft"], "scenario": "digits-offline", "preset": "quick"}
    check_before_importing(parse_sweep(good, "test.yaml"), ["lr=0.1", "scenario.train_per_class=8"])
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- types


def test_option_types_survive_json():
    for tp in (
        int,
        float,
        bool,
        str,
        Literal["a", "b"],
        int | None,
        typing.Optional[str],  # noqa: UP045  (the old spelling is still a type)
        list[int],
        tuple[int, ...],
        Literal["x"] | None,
    ):
        assert decode_type(json.loads(json.dumps(encode_type(tp)))) == tp
    for not_settable in (dict[str, int], tuple[int, int], Path, int | str, Any):
        assert encode_type(not_settable) is None


def test_every_registered_option_type_is_settable_through_the_catalog():
    for entry in STRATEGIES:
        for option in fields(entry.target.Config):
            tp = typing.get_type_hints(entry.target.Config)[option.name]
            assert decode_type(encode_type(tp)) == tp, (entry.name, option.name)
    for entry in SCENARIOS:
        options_type = options_class(entry.target)
        for name, tp in typing.get_type_hints(options_type).items():
            if name in {f.name for f in fields(options_type)}:
                assert decode_type(encode_type(tp)) == tp, (entry.name, name)


def test_the_sources_closure_follows_imports_not_the_run_loop():
    keys = catalog_sources.closure()
    assert "clbench.strategies:quick.py" in keys  # imported by every strategy's presets
    assert "clbench:data/fewrel_files.py" in keys  # a scenario's data probe
    assert "clbench:runner.py" not in keys  # only clbench.api's lazy import names it

"""``--preset authors`` and quirk options: how a run reproducing the authors' code is
resolved per scenario, recorded, and marked in ``clbench show`` and ``clbench table``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from run_folders import write_run

from clbench.config import Options, authors_quirks, describe, option
from clbench.errors import UsageError
from clbench.registry import STRATEGIES, load_strategy_class
from clbench.reporting.display import TableRequest, build_tables
from clbench.runner import RunRequest, resolve_preset, resolve_run


@dataclass
class Toy(Options):
    lr: float = option(0.1, "learning rate")
    layout: str = option("per-sample", "prefix layout", quirk="their_code.py line 7: mixes")
    vote: bool = option(False, "batch-wise vote", quirk="engine.py line 3")


class ToyStrategy:
    name = "toy"
    presets = {
        "authors:split-cifar100": {"lr": 0.03, "vote": True},
        "authors:fewrel": {"layout": "authors"},
        "fewrel-offline": {"lr": 0.5},
    }


def test_quirks_are_the_quirk_options_off_their_default() -> None:
    assert authors_quirks(Toy()) == []
    assert authors_quirks(Toy(lr=9.0)) == []  # not a quirk option
    assert authors_quirks(Toy(vote=True, layout="authors"), "x.") == ["x.layout", "x.vote"]


def test_list_options_names_the_quirk_and_where_the_code_does_it() -> None:
    rows = {name: help_text for name, _, _, help_text in describe(Toy)}
    assert rows["layout"].endswith("[authors' quirk: their_code.py line 7: mixes]")
    assert "quirk" not in rows["lr"]


def test_authors_preset_is_resolved_per_scenario_then_per_protocol() -> None:
    strategy = ToyStrategy  # resolve_preset reads .name and .presets only
    name, values = resolve_preset(strategy, "authors", "split-cifar100", "split-cifar100")  # type: ignore[arg-type]
    assert (name, values) == ("authors:split-cifar100", {"lr": 0.03, "vote": True})
    # fewrel-offline follows the fewrel protocol: the authors' fewrel settings
    name, values = resolve_preset(strategy, "authors", "fewrel-offline", "fewrel")  # type: ignore[arg-type]
    assert (name, values) == ("authors:fewrel", {"layout": "authors"})
    with pytest.raises(UsageError, match="no authors preset for scenario 'imagenet-r'.*"
                       "fewrel, split-cifar100"):  # fmt: skip
        resolve_preset(strategy, "authors", "imagenet-r", "imagenet-r")  # type: ignore[arg-type]


def test_a_run_records_its_quirks(monkeypatch: pytest.MonkeyPatch) -> None:
    l2p = load_strategy_class("l2p")
    quirky = next(
        (f.name for f in l2p.Config.__dataclass_fields__.values() if f.metadata.get("quirk")),
        None,
    )
    config = resolve_run(RunRequest(strategy="l2p", scenario="digits-offline", device="cpu"))
    assert config["authors_quirks"] == []
    if quirky is None:
        pytest.skip("l2p has no quirk option yet")
    field = l2p.Config.__dataclass_fields__[quirky]
    flipped = "true" if field.default is False else "authors"
    config = resolve_run(
        RunRequest(strategy="l2p", scenario="digits-offline", device="cpu",
                   strategy_overrides={quirky: flipped})
    )  # fmt: skip
    assert config["authors_quirks"] == [quirky]


def _run(root: Path, seed: int, quirks: list[str]) -> Path:
    config = {
        "clbench_version": "0.1.0", "protocol_version": 1, "strategy": "hide-prompt",
        "scenario": "fewrel-offline", "backbone": "minilm-l6", "seed": seed,
        "preset": "authors:fewrel" if quirks else "default", "device": "cpu",
        "strategy_options": {"lr": 0.01, "layout": "authors" if quirks else "per-sample"},
        "scenario_options": {"num_experiences": 2}, "backbone_options": {},
        "authors_quirks": quirks,
    }  # fmt: skip
    kind = "authors" if quirks else "ours"
    folder = root / "fewrel-offline" / "hide-prompt" / f"minilm-l6_seed{seed}_{kind}"
    return write_run(folder, config, [[80.0, 0.0], [60.0, 70.0]], [100, 100])


def test_table_marks_runs_with_quirks_in_their_own_row(tmp_path: Path) -> None:
    for seed in (1, 2):
        _run(tmp_path, seed, [])
        _run(tmp_path, seed, ["layout"])
    request = TableRequest(paths=[tmp_path])
    tables = build_tables(request)
    summary = next(t for t in tables if t.name == "summary")
    strategies = list(summary.data["strategy"])
    assert sorted(strategies) == ["hide-prompt", "hide-prompt (authors' code)"]
    assert any("authors' official code" in note for note in summary.notes)


def test_show_names_the_quirks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clbench.cli import main

    folder = _run(tmp_path, 1, ["layout"])
    assert main(["show", str(folder)]) == 0
    assert "authors' code quirks: layout" in capsys.readouterr().out
    assert json.loads((folder / "config.json").read_text())["authors_quirks"] == ["layout"]


def test_every_registered_strategy_resolves_preset_authors_or_says_where_it_has_one() -> None:
    for name in STRATEGIES.names():
        try:
            config = resolve_run(
                RunRequest(strategy=name, scenario="digits-offline", preset="authors")
            )
        except UsageError as error:
            assert "scenarios with one:" in str(error)
        else:
            assert config["preset"].startswith("authors:")


# the weights each method's authors' code loads (shared/research/fidelity-prompt-family.md
# H27, L11, C9; the LoRA methods' presets say where)
AUTHORS_BACKBONES = {
    "l2p": "vit-b16-orig-in21k",
    "dualprompt": "vit-b16-orig-in21k",
    "hide-prompt": "vit-b16-orig-in21k",
    "norga": "vit-b16-orig-in21k",
    "hier-ot": "vit-b16-orig-in21k",
    "coda-prompt": "vit-b16-augreg-in21k-ft-in1k",
    "sd-lora": "vit-b16-augreg2-in21k-ft-in1k",
    "inflora": "vit-b16-in21k",
}


def test_an_image_authors_preset_takes_the_authors_backbone_unless_one_is_named() -> None:
    from clbench.registry import BACKBONES

    for name, backbone in AUTHORS_BACKBONES.items():
        request = RunRequest(strategy=name, scenario="split-cifar100", preset="authors")
        assert resolve_run(request)["backbone"] == backbone, name
        named = RunRequest(**{**vars(request), "backbone": "vit-tiny-random"})
        assert resolve_run(named)["backbone"] == "vit-tiny-random", name
    # a preset without one keeps the scenario's default, and every named one exists
    assert resolve_run(RunRequest(strategy="l2p", scenario="split-cifar100"))["backbone"] == (
        "vit-b16-in21k"
    )
    text = RunRequest(strategy="hier-ot", scenario="fewrel-offline", preset="authors")
    assert resolve_run(text)["backbone"] == "minilm-l6"
    for name in STRATEGIES.names():
        for preset, values in load_strategy_class(name).presets.items():
            if "backbone" in values:
                BACKBONES.get(values["backbone"])  # raises for an unknown name
                assert preset.startswith("authors"), (name, preset)


def test_create_strategy_says_it_keeps_the_encoder_passed_in(tiny_vit, caplog) -> None:
    import logging

    import clbench

    with caplog.at_level(logging.INFO, logger="clbench.api"):
        strategy = clbench.create_strategy(
            "l2p", encoder=tiny_vit, num_classes=10, preset="authors:split-cifar100"
        )
    assert strategy.encoder is tiny_vit
    assert "runs on backbone vit-b16-orig-in21k; this strategy uses the encoder" in caplog.text

"""``--preset authors`` on split-cub200 and 5-datasets for the prompt family: each preset
resolves to the authors' scripts' values (checked against the numbers written in their
scripts, not against our constants), and the run's config records the quirks. Resolution
only: no data is downloaded and no model built."""

from __future__ import annotations

from typing import Any

import pytest

from clbench.errors import UsageError
from clbench.runner import RunRequest, resolve_run

# the quirks of HiDe-Prompt's authors' code that every one of their presets switches on
HIDE_QUIRKS = {"momentum_while_training", "prefix_layout", "tii_on_augmented"}
HIER_OT_QUIRKS = {"prefix_layout", "supcon_form", "group_average", "energy_form"}


def resolved(strategy: str, scenario: str) -> dict[str, Any]:
    return resolve_run(
        RunRequest(strategy=strategy, scenario=scenario, preset="authors", seed=42, device="cpu")
    )


def check(config: dict[str, Any], expected: dict[str, Any]) -> None:
    options = {**config["strategy_options"]}
    options.update({f"scenario.{k}": v for k, v in config["scenario_options"].items()})
    wrong = {
        key: (options.get(key), value)
        for key, value in expected.items()
        if options.get(key) != pytest.approx(value)
    }
    assert not wrong, f"(resolved, expected): {wrong}"


# MoE_PromptCL scripts/cub_Sup21k_{HiDe,NoRGa}.sh and configs/cub_*.py, by hand
HIDE_CUB = {
    "batch_size": 128,
    "epochs": 50,
    "lr": 0.03 * 128 / 256,
    "lr_schedule": "step",
    "lr_step_epoch": 30,
    "head_lr_scale": 1.0,  # no --larger_prompt_lr
    "prompt_length": 20,
    "contrastive_weight": 0.01,
    "prompt_momentum": 0.01,
    "tii_lr": 0.005,
    "tii_epochs": 20,
    "tii_align_epochs": 30,
    "prefix_layout": "authors_batch_mix",
    "scenario.normalize": "none",
    "scenario.class_order": "seed",
}


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("hide-prompt", {**HIDE_CUB, "tii_align_lr": 0.0025, "tap_lr": 0.005, "tap_epochs": 30}),
        (
            "norga",
            {
                **HIDE_CUB,
                "tii_align_lr": 0.025,
                "tap_lr": 0.05,
                "tap_epochs": 80,
                "gate_activation": "sigmoid",
            },
        ),
    ],
)
def test_hide_family_on_cub(strategy: str, expected: dict[str, Any]) -> None:
    config = resolved(strategy, "split-cub200")
    assert config["preset"] == "authors:split-cub200"
    check(config, expected)
    assert HIDE_QUIRKS <= set(config["authors_quirks"])
    assert "scenario.normalize" in config["authors_quirks"]


# MoE_PromptCL scripts/5datasets_Sup21k_{HiDe,NoRGa}.sh; seed 42's shuffle of their list
HIDE_5D = {
    "epochs": 20,
    "lr": 0.015,
    "lr_schedule": "constant",
    "grad_clip": 2.0,
    "head_lr_scale": 0.1,
    "prompt_length": 40,
    "contrastive_weight": 0.1,
    "tii_lr": 0.0005,
    "tii_align_lr": 0.0025,
    "tap_lr": 0.005,
    "tap_epochs": 30,
    "scenario.normalize": "none",
    "scenario.datasets": ["notmnist", "mnist", "cifar10", "fashion-mnist", "svhn"],
}


@pytest.mark.parametrize(
    "strategy, gate", [("hide-prompt", None), ("norga", "tanh")]
)  # fmt: skip
def test_hide_family_on_5_datasets(strategy: str, gate: str | None) -> None:
    config = resolved(strategy, "5-datasets")
    assert config["preset"] == "authors:5-datasets"
    check(config, HIDE_5D if gate is None else {**HIDE_5D, "gate_activation": gate})
    assert HIDE_QUIRKS <= set(config["authors_quirks"])


def test_the_5_datasets_order_is_random_shuffle_of_their_list_with_seed_42() -> None:
    import random

    theirs = ["SVHN", "MNIST", "CIFAR10", "NotMNIST", "FashionMNIST"]  # datasets.py line 52
    random.Random(42).shuffle(theirs)
    ours = {"SVHN": "svhn", "MNIST": "mnist", "CIFAR10": "cifar10", "NotMNIST": "notmnist"}
    ours["FashionMNIST"] = "fashion-mnist"
    assert [ours[name] for name in theirs] == HIDE_5D["scenario.datasets"]


@pytest.mark.parametrize(
    "scenario, expected",
    [
        (
            "split-cub200",
            {"batch_size": 24, "lr": 0.03 * 24 / 256, "epochs": 50, "lr_schedule": "step",
             "prompt_length": 20, "contrastive_weight": 0.08, "reg_sub": 0.25,
             "reg_glob": 0.02, "energy_delta": 50.0, "head_lr_scale": 1.0,
             "tap_lr": 0.05, "statistics": "centroids", "taxonomy": "authors-split-cub200",
             "taxonomy_check": "lenient", "scenario.class_order": "natural", "scenario.normalize": "none"},
        ),
        (
            "5-datasets",
            {"batch_size": 32, "eval_batch_size": 32, "lr": 0.03 * 32 / 256, "epochs": 20,
             "lr_schedule": "constant", "grad_clip": 2.0, "prompt_length": 40,
             "contrastive_weight": 0.1, "reg_sub": 0.25, "reg_glob": 0.015,
             "energy_delta": 15.0, "head_lr_scale": 0.1, "samples_per_class": 160,
             "ot_samples": 1600,
             "scenario.datasets": ["svhn", "mnist", "cifar10", "notmnist", "fashion-mnist"]},
        ),
    ],
)  # fmt: skip
def test_hier_ot_authors(scenario: str, expected: dict[str, Any]) -> None:
    config = resolved("hier-ot", scenario)
    assert config["preset"] == f"authors:{scenario}"
    check(config, expected)
    assert HIER_OT_QUIRKS <= set(config["authors_quirks"])
    shipped = resolve_run(
        RunRequest(strategy="hier-ot", scenario=scenario, preset=f"authors-as-shipped:{scenario}",
                   device="cpu")
    )  # fmt: skip
    assert shipped["strategy_options"]["ot_weighting"] is False
    assert shipped["strategy_options"]["reg_sub"] == expected["reg_sub"]


def test_the_authors_cub_trees_load_lenient_and_fail_strict() -> None:
    import json

    from clbench.taxonomy import TREES_FOLDER, TaskTrees, load_taxonomy_file

    path = TREES_FOLDER / "hierc-split-cub200.json"
    tasks = json.loads(path.read_text())["tasks"]
    names = sorted({name for group in tasks[-1].values() for name in group})
    assert len(names) == 200  # T10 lists every class (one of them twice)
    # as the authors wrote them: Bobolink in no group of T2..T7, a Pewee in two from T6
    for task, tree in enumerate(tasks, start=1):
        listed = [name for group in tree.values() for name in group]
        assert ("Bobolink" in listed) == (task == 1 or task >= 8)
        assert listed.count("Western_Wood_Pewee") == (2 if task >= 6 else 0)
    with pytest.raises(UsageError, match="Western_Wood_Pewee"):
        load_taxonomy_file(path, names)
    trees = load_taxonomy_file(path, names, lenient=True)
    assert isinstance(trees, TaskTrees) and len(trees.trees) == 10

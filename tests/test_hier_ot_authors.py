"""hier-ot's authors'-code options: SupCon form, group average, OT self-distances, the
test-time step, per-task label trees (strict and lenient), the shipped trees, the presets.

The reference functions below restate the authors' code (tranquyenbk173/HierC) loop by
loop, so each vectorised option is checked against what their code computes."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from small_configs import HIER_SMALL

from clbench.config import authors_quirks
from clbench.errors import UsageError
from clbench.ot_distance import ClassDistances, exact_emd, squared_euclidean_costs
from clbench.registry import STRATEGIES
from clbench.resolution import resolve_preset, split_preset
from clbench.scenario import seeded_class_order
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.strategies.hierarchical_ot import (
    AUTHORS_CIFAR,
    AUTHORS_CODE,
    AUTHORS_IMAGENET_R,
    supcon,
)
from clbench.taxonomy import (
    CIFAR100_SUPERCLASSES,
    TaskTrees,
    authors_tree,
    load_taxonomy_file,
    taxonomy_from_names,
)

SMALL = HIER_SMALL
DIGITS = [str(d) for d in range(10)]
CIFAR_NAMES = sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names)


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


def make(encoder, scenario, **options):
    strategy_class = STRATEGIES.get("hier-ot")
    config = strategy_class.Config(**{**SMALL, **options})
    return strategy_class(
        encoder=encoder,
        num_classes=scenario.num_classes,
        config=config,
        class_names=scenario.class_names,
        num_tasks=5,
    )


# ------------------------------------------------------------- the authors' code, restated
def their_supcon(features, labels, gamma=None, temperature=0.1):
    """supervised_contrastive_loss (engine 763-806): self in the softmax, mean over pairs."""
    features = F.normalize(features, p=2, dim=1)
    n = len(features)
    weights = torch.ones(n, n) if gamma is None else gamma[labels][:, labels]
    similarity = features @ features.T / temperature * weights
    positive = (labels[:, None] == labels[None, :]) & ~torch.eye(n, dtype=torch.bool)
    if positive.sum() == 0:
        return 0.0
    log_prob = F.log_softmax(similarity - similarity.max(1, keepdim=True)[0], dim=1)
    return -log_prob[positive].sum() / positive.sum()


def their_group_loss(features, labels, leaf_groups, gamma):
    """subsup_loss (808-828): each leaf group's loss, summed, / the number of groups."""
    total = 0.0
    for group in leaf_groups:
        inside = torch.isin(labels, torch.tensor(group))
        if inside.sum() > 1:
            total = total + their_supcon(features[inside], labels[inside], gamma)
    return total / len(leaf_groups)


def their_energy(logits, distance, leaf_groups, gamma, eta0, eta):
    """process_MHD (902-934): logits x E_g / sum E_g, weighted sum, no group -> -inf."""
    out = torch.zeros_like(logits)
    grouped = {c for group in leaf_groups for c in group}
    for i in range(len(logits)):
        logit = logits[i].clone()
        total = 0.0
        for group in leaf_groups:
            index = torch.tensor(group)
            best, position = logit[index].max(0)
            nearest = group[int(position)]
            d = (gamma[nearest][index] * distance[i][index]).sum()
            energy = torch.exp(eta0 * best - eta * d)
            total = total + energy
            logit[index] = logit[index] * energy
        logit = logit / total
        logit[[c for c in range(len(logit)) if c not in grouped]] = float("-inf")
        out[i] = logit
    return out


# ------------------------------------------------------------------------------- SupCon
def test_authors_supcon_form_by_hand():
    # labels [0, 0, 1], logits s01 = 2, s02 = 0, s12 = 1, self 9: the self term is in the sum
    s = torch.tensor([[9.0, 2.0, 0.0], [2.0, 9.0, 1.0], [0.0, 1.0, 9.0]])
    labels = torch.tensor([0, 0, 1])
    e = math.exp
    expected = (-math.log(e(2) / (e(9) + e(2) + e(0))) - math.log(e(2) / (e(2) + e(9) + e(1)))) / 2
    assert supcon(s, labels, form="authors").item() == pytest.approx(expected, rel=1e-6)
    # one class in a group: ours is log(|P|) at best (inert), theirs pulls the class together
    one_class = torch.tensor([[10.0, 3.0], [3.0, 10.0]])
    same = torch.tensor([0, 0])
    assert supcon(one_class, same).item() == pytest.approx(0.0, abs=1e-6)
    assert supcon(one_class, same, form="authors").item() == pytest.approx(
        math.log(1 + e(7)), rel=1e-6
    )


def test_authors_form_is_the_mean_over_pairs_not_over_anchors():
    torch.manual_seed(0)
    s = torch.randn(5, 5)
    labels = torch.tensor([0, 0, 0, 1, 1])  # anchors of class 0 have 2 positives, of 1 one
    log_prob = s - s.logsumexp(1, keepdim=True)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j and labels[i] == labels[j]]
    expected = -sum(log_prob[i, j] for i, j in pairs) / len(pairs)
    assert supcon(s, labels, form="authors").item() == pytest.approx(expected.item(), rel=1e-6)


def test_all_groups_average_divides_by_every_leaf_group():
    torch.manual_seed(1)
    s = torch.randn(6, 6)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    per_group = [
        supcon(s[:3, :3], labels[:3], form="authors").item(),
        supcon(s[3:, 3:], labels[3:], form="authors").item(),
    ]
    present = supcon(s, labels, groups, form="authors").item()
    assert present == pytest.approx(sum(per_group) / 2, rel=1e-6)
    # a tree of 5 leaf groups, 2 of them in the batch: the sum / 5
    spread = supcon(s, labels, groups, form="authors", num_groups=5).item()
    assert spread == pytest.approx(sum(per_group) / 5, rel=1e-6)


@pytest.fixture()
def overlapping(tiny_vit, digits, caplog):
    """A strategy whose (lenient) tree has '3' in two groups and '9' in none."""
    tree = {"round": ["0", "6", "8", "3"], "straight": ["1", "4", "7"], "mixed": ["2", "5", "3"]}
    with caplog.at_level(logging.WARNING):
        taxonomy = taxonomy_from_names(tree, DIGITS, source="test", lenient=True)
    assert "listed twice" in caplog.text and "missing from the tree: ['9']" in caplog.text
    strategy = make(tiny_vit, digits, supcon_form="authors", group_average="all_groups")
    strategy.taxonomy = taxonomy
    strategy.group_members = taxonomy.membership(10)
    torch.manual_seed(2)
    weights = torch.rand(10, 10) * 0.5 + 0.3
    strategy.gamma = (weights + weights.T) / 2
    return strategy, taxonomy


def test_group_loss_equals_the_authors_loop_with_a_class_in_two_groups(overlapping):
    strategy, taxonomy = overlapping
    strategy.config.reg_glob, strategy.config.reg_sub = 0.3, 0.7
    torch.manual_seed(3)
    labels = torch.tensor([0, 0, 3, 3, 3, 5, 5, 2, 9, 9, 1, 1, 6])
    features = torch.randn(len(labels), 12)
    ours = strategy.hierarchy_loss(features, labels)
    groups = taxonomy.leaf_groups()
    expected = 0.3 * their_supcon(features, labels) + 0.7 * their_group_loss(
        features, labels, groups, strategy.gamma
    )
    assert ours.item() == pytest.approx(float(expected), rel=1e-5)
    # a class in no group ('9') has no group loss: its features get only the global gradient
    strategy.config.reg_glob = 0.0
    leaf = features.clone().requires_grad_(True)
    strategy.hierarchy_loss(leaf, labels).backward()
    assert leaf.grad[labels == 9].abs().max() == 0
    assert leaf.grad[labels == 3].abs().max() > 0


# ------------------------------------------------------------------- OT self-distances
def test_an_empirical_self_distance_is_the_emd_of_two_sample_sets():
    torch.manual_seed(4)
    first = {c: torch.randn(30, 5) + c for c in range(3)}
    second = {c: torch.randn(30, 5) + c for c in range(3)}
    distances = ClassDistances()
    assert distances.update(first, second) == 3 + 3
    for c in range(3):
        expected = exact_emd(squared_euclidean_costs(first[c], second[c][None])).item()
        assert distances.matrix[c, c].item() == pytest.approx(expected, rel=1e-9)
        assert expected > 1.0  # about 2 x the variance summed over 5 dimensions
    plain = ClassDistances()
    plain.update(first)
    torch.testing.assert_close(
        plain.matrix, distances.matrix - torch.diag(distances.matrix.diagonal())
    )
    with pytest.raises(ValueError, match="second sample sets"):
        ClassDistances().update(first, {0: second[0]})


# ----------------------------------------------------------------------- test-time step
def test_authors_energy_form_equals_their_loop(tiny_vit, digits):
    strategy = make(
        tiny_vit, digits, eval_rescale=True, energy_form="authors", energy_eta=0.3, energy_eta0=0.7
    )
    tree = taxonomy_from_names(
        {"a": ["0", "1", "2"], "b": ["3", "4"], "c": ["5", "6", "7", "8"]},
        DIGITS,
        source="test",
        lenient=True,  # '9' is in no group
    )
    strategy.task_classes = [list(range(10))]
    strategy.taxonomy = tree
    strategy.group_members = tree.membership(10)
    torch.manual_seed(5)
    gamma = torch.rand(10, 10)
    gamma = (gamma + gamma.T) / 2
    gamma.fill_diagonal_(1.0)
    strategy.eval_gamma = gamma
    distance = torch.rand(4, 10) * 3
    strategy.mahalanobis = lambda features, classes: distance[:, classes]
    logits = torch.randn(4, 10) * 2
    ours = strategy.rescale_by_energy(logits, torch.zeros(4, 1))
    expected = their_energy(logits, distance, tree.leaf_groups(), gamma, 0.7, 0.3)
    torch.testing.assert_close(ours[:, :9], expected[:, :9], rtol=1e-5, atol=1e-6)
    assert (ours[:, 9] < -1e30).all()
    # ours keeps '9' as a group of its own and returns log-probabilities
    strategy.config.energy_form = "ours"
    mine = strategy.rescale_by_energy(logits, torch.zeros(4, 1))
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine.logsumexp(1), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def authors_trained(tiny_vit, digits):
    """hier-ot with every authors' code behaviour after two digits tasks."""
    torch.manual_seed(0)
    strategy = make(tiny_vit, digits, **{**AUTHORS_CODE, "reg_glob": 0.05, "reg_sub": 0.1})
    for index in range(2):
        strategy.train(digits.benchmark.train_stream[index])
    return strategy


def test_authors_options_after_training(authors_trained, digits):
    strategy = authors_trained
    seen = strategy.seen_class_list
    assert strategy.pseudo_pool is None  # their code never adds old-class samples
    # empirical self-distances: Gamma_ii < 1 for training ...
    assert (strategy.distances.matrix.diagonal() > 0).all()
    assert (strategy.gamma[seen, seen] < 1).all()
    # ... and the test-time Gamma from OT on the prompted statistics, diagonal zeroed
    assert sorted(strategy.eval_distances.classes) == sorted(seen)
    assert strategy.eval_distances.pairs_computed == 1 + (2 * 2 + 1)
    assert (strategy.eval_gamma[seen, seen] == 1).all()
    assert not torch.allclose(strategy.eval_distances.matrix, strategy.distances.matrix)
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(8)])
    strategy.model.eval()
    with torch.no_grad():
        scores = strategy.classify(x)
    assert torch.isfinite(scores[:, seen]).all()
    restored = make(strategy.encoder, digits, **{**AUTHORS_CODE, "reg_glob": 0.05, "reg_sub": 0.1})
    restored.load_state_dict(strategy.state_dict())
    restored.model.eval()
    torch.testing.assert_close(restored.eval_gamma, strategy.eval_gamma)
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), scores)


# ----------------------------------------------------------------------- per-task trees
def write_task_trees(path, trees):
    path.write_text(json.dumps({"note": "test", "tasks": trees}))
    return path


def test_per_task_trees_are_used_as_written_and_checked_per_task(tmp_path, tiny_vit, digits):
    first, second = digits.classes_per_experience[:2]
    names = digits.class_names
    trees = [
        {"g": [names[c] for c in first]},
        {"g": [names[first[0]], names[second[0]]], "h": [names[first[1]], names[second[1]]]},
    ] + [{"all": names}] * 3
    path = write_task_trees(tmp_path / "trees.json", trees)
    strategy = make(tiny_vit, digits, taxonomy=str(path), ot_weighting=False)
    assert isinstance(strategy.full_taxonomy, TaskTrees)
    strategy.task_classes = [first]
    strategy.build_tree()
    assert strategy.taxonomy.leaf_groups() == [list(first)]
    strategy.task_classes = [first, second]
    strategy.build_tree()  # task 2's own tree, not task 1's grown
    assert strategy.taxonomy.leaf_groups() == [[first[0], second[0]], [first[1], second[1]]]
    # too few trees for the scenario's 5 tasks
    short = write_task_trees(tmp_path / "short.json", trees[:2])
    with pytest.raises(UsageError, match="trees for 2 tasks; the scenario has 5"):
        make(tiny_vit, digits, taxonomy=str(short))


def test_a_per_task_tree_of_another_class_order_fails_strict_and_warns_lenient(
    tmp_path, tiny_vit, digits, caplog
):
    first = digits.classes_per_experience[0]
    others = [c for c in range(10) if c not in first][:2]
    names = digits.class_names
    trees = [{"g": [names[c] for c in others]}] + [{"all": names}] * 4
    path = write_task_trees(tmp_path / "trees.yaml", trees)  # JSON is valid YAML
    strategy = make(tiny_vit, digits, taxonomy=str(path), ot_weighting=False)
    strategy.task_classes = [first]
    with pytest.raises(UsageError, match="not seen by then") as error:
        strategy.build_tree()
    assert "missing from its tree" in str(error.value) and "lenient" in str(error.value)
    lenient = make(
        tiny_vit, digits, taxonomy=str(path), ot_weighting=False, taxonomy_check="lenient"
    )
    lenient.task_classes = [first]
    with caplog.at_level(logging.WARNING):
        lenient.build_tree()
    assert "missing from its tree" in caplog.text
    assert lenient.taxonomy.leaf_groups() == [] and not lenient.group_members.any()


def test_a_bad_file_of_trees_per_task(tmp_path, tiny_vit, digits):
    path = tmp_path / "trees.json"
    path.write_text(json.dumps({"tasks": {"a": ["0"]}}))
    with pytest.raises(UsageError, match="one tree per task"):
        make(tiny_vit, digits, taxonomy=str(path))
    path.write_text(json.dumps({"tasks": [{"a": ["0", "0"]}] * 5}))
    with pytest.raises(UsageError, match="listed twice"):
        make(tiny_vit, digits, taxonomy=str(path))


# ------------------------------------------------------------------- the shipped trees
def test_the_authors_cifar_trees_fit_the_seed_42_order():
    trees = load_taxonomy_file(authors_tree("split-cifar100"), CIFAR_NAMES)
    assert isinstance(trees, TaskTrees) and len(trees.trees) == 10
    order = seeded_class_order(100, 42)
    assert order[:10] == [42, 41, 91, 9, 65, 50, 1, 70, 15, 78]  # their mapID.py task 1
    last = trees.trees[-1]
    for task in range(10):
        seen = order[: 10 * (task + 1)]
        tree = trees.for_task(task, seen, CIFAR_NAMES)  # strict: no problem in any task
        # each task's groups are the last tree's restricted (the audit's finding)
        assert sorted(tree.leaf_groups()) == sorted(last.restricted(seen).leaf_groups())
    assert len(last.leaf_groups()) == 22
    with pytest.raises(UsageError, match="not seen by then"):
        trees.for_task(0, seeded_class_order(100, 0)[:10], CIFAR_NAMES)


def test_the_authors_imagenet_r_trees_need_the_lenient_check(caplog):
    path = authors_tree("imagenet-r")
    trees = json.loads(path.read_text())["tasks"]
    leaves = []

    def collect(node):
        for value in node.values():
            collect(value) if isinstance(value, dict) else leaves.append(value)

    collect(trees[-1])
    class_names = sorted({n for leaf in leaves for n in leaf} | {"cheetah", "guinea_pig"})
    assert len(class_names) == 200
    with pytest.raises(UsageError, match="'lipstick' is listed twice"):
        load_taxonomy_file(path, class_names)
    with caplog.at_level(logging.WARNING):
        loaded = load_taxonomy_file(path, class_names, lenient=True)
    assert "'lipstick' is listed twice" in caplog.text
    lipstick = class_names.index("lipstick")
    assert loaded.trees[-1].membership(200)[lipstick].sum() == 2
    assert loaded.trees[6].leaf_groups() == loaded.trees[5].leaf_groups()  # T7 is T6
    with pytest.raises(UsageError, match="no authors' label trees"):
        authors_tree("fewrel")


# --------------------------------------------------------------------------- the presets
def test_authors_presets_resolve_per_scenario_and_mark_the_quirks():
    strategy_class = STRATEGIES.get("hier-ot")
    name, values = resolve_preset(strategy_class, "authors", "split-cifar100", "cifar")
    assert name == "authors:split-cifar100" and values == AUTHORS_CIFAR
    assert values["taxonomy"] == "authors-split-cifar100" and values["pseudo_features"] == 0
    assert values["scenario.class_order_seed"] == 42  # their trees' order, for any --seed
    name, values = resolve_preset(strategy_class, "authors", "imagenet-r", "imagenet-r")
    assert values == AUTHORS_IMAGENET_R and values["taxonomy_check"] == "lenient"
    assert values["scenario.class_order_seed"] == 42
    name, values = resolve_preset(strategy_class, "authors", "fewrel-offline", "fewrel")
    assert name == "authors:fewrel" and values["supcon_form"] == "authors"
    shipped = strategy_class.presets["authors-as-shipped:split-cifar100"]
    assert shipped["ot_weighting"] is False and shipped["eval_rescale"] is False
    strategy_values, _ = split_preset(AUTHORS_IMAGENET_R, set())
    config = strategy_class.Config(**strategy_values)
    assert set(authors_quirks(config)) >= {
        "supcon_form",
        "group_average",
        "ot_self_distance",
        "eval_gamma_source",
        "energy_form",
        "taxonomy_check",
    }
    assert authors_quirks(strategy_class.Config()) == []

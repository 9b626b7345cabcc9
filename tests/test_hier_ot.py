"""hier-ot: OT class distances, label trees, SupCon terms, pseudo-features, bad taxonomies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from small_configs import HIER_SMALL

from clbench.errors import UsageError
from clbench.ot_distance import ClassDistances, exact_emd, squared_euclidean_costs
from clbench.registry import STRATEGIES
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline
from clbench.strategies.hierarchical_ot import supcon
from clbench.taxonomy import (
    CIFAR100_SUPERCLASSES,
    cifar100_superclasses,
    cluster_taxonomy,
    load_taxonomy_file,
    taxonomy_from_names,
)

SMALL = HIER_SMALL
DIGIT_NAMES = [str(d) for d in range(10)]


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
    )


@pytest.fixture(scope="module")
def trained_and_labels(tiny_vit, digits):
    """hier-ot after two digits tasks (energy rescaling on), and the labels of the
    contrastive batch of every training step of each task."""
    torch.manual_seed(0)
    strategy = make(tiny_vit, digits, eval_rescale=True, reg_glob=0.05, reg_sub=0.1)
    labels_per_task: list[list[set[int]]] = []
    original = strategy.hierarchy_loss

    def recording(features, labels):
        labels_per_task[-1].append(set(labels.tolist()))
        return original(features, labels)

    strategy.hierarchy_loss = recording
    for index in range(2):
        labels_per_task.append([])
        strategy.train(digits.benchmark.train_stream[index])
    del strategy.hierarchy_loss  # the method again
    return strategy, labels_per_task


@pytest.fixture(scope="module")
def trained(trained_and_labels):
    return trained_and_labels[0]


# ----------------------------------------------------------------------------- OT distances
def test_emd_of_a_hand_example_and_of_a_class_to_itself():
    # 1-D points {0, 1} -> {0, 3}: the monotone matching costs (0^2 + 2^2) / 2 = 2
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[[3.0], [0.0]]])
    assert exact_emd(squared_euclidean_costs(x, y)).item() == pytest.approx(2.0)
    torch.manual_seed(0)
    samples = torch.randn(64, 16)
    assert exact_emd(squared_euclidean_costs(samples, samples[None])).item() == pytest.approx(
        0, abs=1e-9
    )


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_class_distances_are_symmetric_and_zero_between_identical_samples(solver):
    torch.manual_seed(0)
    base = torch.randn(40, 8)
    samples = {0: base, 1: base.clone(), 2: base + 3.0, 3: torch.randn(40, 8) * 2}
    distances = ClassDistances(solver, sinkhorn_regularisation=0.01)
    assert distances.update(samples) == 6
    matrix = distances.matrix
    torch.testing.assert_close(matrix, matrix.T)
    assert torch.all(matrix.diagonal() == 0)
    assert distances.submatrix([0, 1]).max() < 0.05 * matrix.max()  # same samples: ~0
    # a shift by 3 in each of 8 dimensions costs 8 * 3^2 = 72 (exact for EMD)
    assert distances.submatrix([0, 2])[0, 1].item() == pytest.approx(
        72.0, rel=1e-6 if solver == "emd" else 0.05
    )
    assert distances.submatrix([0, 3])[0, 1] > 0


def test_incremental_update_computes_only_new_pairs_and_equals_a_full_recompute():
    torch.manual_seed(1)
    samples = {c: torch.randn(32, 6) + c for c in range(5)}
    incremental = ClassDistances()
    assert incremental.update({c: samples[c] for c in (0, 1, 2)}) == 3
    before = incremental.matrix.clone()
    assert incremental.update(samples) == 2 * 3 + 1  # new x old, then new x new
    assert incremental.update(samples) == 0  # nothing new: nothing computed
    full = ClassDistances()
    full.update(samples)
    torch.testing.assert_close(
        incremental.submatrix(list(range(5))), full.submatrix(list(range(5)))
    )
    torch.testing.assert_close(incremental.submatrix([0, 1, 2]), before)
    dense = incremental.dense(7)
    assert dense[4, 2] == full.submatrix([4, 2])[0, 1] and math.isinf(dense[5, 0])
    with pytest.raises(ValueError, match="partners"):
        incremental.update({9: torch.zeros(32, 6)})


# ------------------------------------------------------------------------------ label trees
def test_tree_from_a_yaml_file_restricts_to_seen_classes_and_round_trips(tmp_path):
    names = ["bear", "fox", "trout", "shark", "rose", "oak"]
    path = tmp_path / "tree.yaml"
    path.write_text(
        "animals:\n  mammals: [bear, fox]\n  fish: [trout, shark]\nplants:\n  - [rose]\n  - [oak]\n"
    )
    tree = load_taxonomy_file(path, names)
    assert tree.leaf_groups() == [[0, 1], [2, 3], [4], [5]]
    seen = tree.restricted([0, 2, 3, 5])  # the tree grows with the classes seen
    assert seen.leaf_groups() == [[0], [2, 3], [5]]
    assert seen.group_index(6).tolist() == [0, -1, 1, 1, -1, 2]
    text = seen.render(names)
    assert "mammals: bear" in text and "fish: trout, shark" in text and "fox" not in text
    again = taxonomy_from_names(tree.to_names(names), names, source="round trip")
    assert again.leaf_groups() == tree.leaf_groups()
    json_path = tmp_path / "tree.json"
    json_path.write_text(json.dumps(tree.to_names(names)))
    assert load_taxonomy_file(json_path, names).leaf_groups() == tree.leaf_groups()


def test_cifar100_superclasses():
    names = sorted(n for group in CIFAR100_SUPERCLASSES.values() for n in group)  # CIFAR's order
    tree = cifar100_superclasses(names)
    groups = tree.leaf_groups()
    assert len(groups) == 20 and all(len(g) == 5 for g in groups)
    assert sorted(c for g in groups for c in g) == list(range(100))
    by_name = {names[c]: {names[k] for k in g} for g in groups for c in g}
    assert by_name["maple_tree"] == {
        "maple_tree",
        "oak_tree",
        "palm_tree",
        "pine_tree",
        "willow_tree",
    }
    assert by_name["mushroom"] == {"apple", "mushroom", "orange", "pear", "sweet_pepper"}
    with pytest.raises(UsageError, match="split-cifar100"):
        cifar100_superclasses(DIGIT_NAMES)


def test_clustering_of_ot_distances_finds_the_groups():
    torch.manual_seed(2)
    centres = {0: 0.0, 1: 0.3, 2: 10.0, 3: 10.4, 4: 20.0, 5: 20.2}
    distances = ClassDistances()
    distances.update({c: torch.randn(30, 4) * 0.5 + shift for c, shift in centres.items()})
    tree = cluster_taxonomy(distances.submatrix(list(range(6))), list(range(6)), num_groups=3)
    assert sorted(tree.leaf_groups()) == [[0, 1], [2, 3], [4, 5]]
    assert not tree.root.is_leaf and "merged at" in tree.root.name
    # classes given in another order keep their own ids
    order = [5, 3, 1, 0, 2, 4]
    shuffled = cluster_taxonomy(distances.submatrix(order), order, num_groups=3)
    assert sorted(shuffled.leaf_groups()) == [[0, 1], [2, 3], [4, 5]]
    assert cluster_taxonomy(torch.zeros(1, 1), [7], 3).leaf_groups() == [[7]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"a": ["0", "1", "2", "3", "4"], "b": ["5", "6", "7", "8", "cat"]}',
            "unknown class names ['cat']",
        ),
        (
            '{"a": ["0", "1", "2", "3", "4"], "b": ["5", "6", "7"]}',
            "missing from the tree: ['8', '9']",
        ),
        (
            '{"a": ["0", "1", "2", "3", "4"], "b": ["5", "6", "7", "8", "9", "0"]}',
            "'0' is listed twice",
        ),
        (
            '{"a": ["0", "1", ["2", "3"]], "b": ["4", "5", "6", "7", "8", "9"]}',
            "mixes class names and subgroups",
        ),
        ('{"a": [], "b": ["0"]}', "group root/a is empty"),
        ('{"a": 3}', "root/a is a int"),
        ('{"a": ["0", "1"', "is not valid JSON"),
        ('"just a string"', "must be a mapping of groups or a list"),
    ],
)
def test_bad_taxonomy_files_are_clear_errors_before_training(
    tmp_path, tiny_vit, digits, content, message
):
    path = tmp_path / "tree.json"
    path.write_text(content)
    with pytest.raises(UsageError, match="taxonomy") as error:
        make(tiny_vit, digits, taxonomy=str(path))  # refused when the strategy is built
    assert message in str(error.value)


def test_a_missing_taxonomy_file_or_unknown_source(tmp_path, tiny_vit, digits):
    with pytest.raises(UsageError, match="does not exist"):
        make(tiny_vit, digits, taxonomy=str(tmp_path / "nope.yaml"))
    with pytest.raises(UsageError, match="auto, cifar100-superclasses"):
        make(tiny_vit, digits, taxonomy="llm")


# ------------------------------------------------------------------------------ SupCon terms
def test_supcon_against_a_hand_computed_example():
    # labels [0, 0, 1]; similarity logits s01 = 2, s02 = 0, s12 = 1
    similarity = torch.tensor([[9.0, 2.0, 0.0], [2.0, 9.0, 1.0], [0.0, 1.0, 9.0]])
    labels = torch.tensor([0, 0, 1])
    # anchor 0: -log(e^2 / (e^2 + e^0)); anchor 1: -log(e^2 / (e^2 + e^1)); anchor 2: no positive
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert supcon(similarity, labels).item() == pytest.approx(expected, rel=1e-6)
    # leaf groups {class 0} and {class 1}: anchors 0 and 1 only see each other -> loss 0
    assert supcon(similarity, labels, groups=torch.tensor([0, 0, 1])).item() == pytest.approx(
        0, abs=1e-6
    )


def test_grouped_supcon_is_the_mean_over_groups_of_the_in_group_loss():
    # labels [0, 0, 1, 2, 2, 3]; groups {0, 1} -> A, {2, 3} -> B
    s = torch.tensor(
        [
            [0.0, 1.0, 0.5, 3.0, 3.0, 3.0],
            [1.0, 0.0, 2.0, 3.0, 3.0, 3.0],
            [0.5, 2.0, 0.0, 3.0, 3.0, 3.0],
            [3.0, 3.0, 3.0, 0.0, 1.5, 0.2],
            [3.0, 3.0, 3.0, 1.5, 0.0, -1.0],
            [3.0, 3.0, 3.0, 0.2, -1.0, 0.0],
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    e = math.exp
    group_a = (-math.log(e(1.0) / (e(1.0) + e(0.5))) - math.log(e(1.0) / (e(1.0) + e(2.0)))) / 2
    group_b = (-math.log(e(1.5) / (e(1.5) + e(0.2))) - math.log(e(1.5) / (e(1.5) + e(-1.0)))) / 2
    assert supcon(s, labels, groups).item() == pytest.approx((group_a + group_b) / 2, rel=1e-6)
    # OT weighting: the logits are multiplied by Gamma[y_i, y_j] (1 within a class)
    gamma = torch.tensor(
        [[1.0, 0.5, 0.1, 0.1], [0.5, 1.0, 0.1, 0.1], [0.1, 0.1, 1.0, 0.25], [0.1, 0.1, 0.25, 1.0]]
    )
    weighted = s * gamma[labels][:, labels]
    group_a = (-math.log(e(1.0) / (e(1.0) + e(0.25))) - math.log(e(1.0) / (e(1.0) + e(1.0)))) / 2
    group_b = (-math.log(e(1.5) / (e(1.5) + e(0.05))) - math.log(e(1.5) / (e(1.5) + e(-0.25)))) / 2
    assert supcon(weighted, labels, groups).item() == pytest.approx(
        (group_a + group_b) / 2, rel=1e-6
    )


def test_supcon_has_finite_gradients_for_an_anchor_alone_in_its_group():
    features = torch.randn(5, 4, requires_grad=True)
    similarity = features @ features.T
    loss = supcon(similarity, torch.tensor([0, 0, 1, 2, 3]), torch.tensor([0, 0, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(features.grad).all()


# ------------------------------------------------------------------------- the strategy
def test_old_class_pseudo_features_reach_the_loss(trained, digits):
    old = digits.classes_per_experience[0]
    new = digits.classes_per_experience[1]
    pool, pool_labels = trained.pseudo_pool
    assert (
        set(pool_labels.tolist()) == set(old) and len(pool) == len(old) * SMALL["pseudo_features"]
    )
    torch.manual_seed(0)
    features = torch.randn(8, trained.encoder.feature_dim, requires_grad=True)
    labels = torch.tensor(new * 4)
    batch, batch_labels = trained.contrastive_batch(features, labels)
    assert len(batch) == 8 + SMALL["pseudo_features"] and set(batch_labels[8:].tolist()) <= set(old)
    with_old = trained.hierarchy_loss(batch, batch_labels)
    (gradient_with,) = torch.autograd.grad(with_old, features)
    without = trained.hierarchy_loss(features, labels)
    (gradient_without,) = torch.autograd.grad(without, features)
    assert with_old.item() != pytest.approx(without.item())
    assert not torch.allclose(gradient_with, gradient_without)


def test_training_sees_pseudo_features_and_the_tree_grows(trained_and_labels, digits):
    strategy, labels_per_task = trained_and_labels
    first = set(digits.classes_per_experience[0])
    assert labels_per_task[0] and all(labels <= first for labels in labels_per_task[0])
    assert labels_per_task[1] and all(labels & first for labels in labels_per_task[1])  # old ones
    assert strategy.taxonomy.classes == sorted(strategy.seen_class_list)
    assert len(strategy.taxonomy.leaf_groups()) == 2  # 4 classes, group_size 2
    assert strategy.distances.pairs_computed == 1 + (2 * 2 + 1)  # only new pairs, per task


def test_energy_rescaling_gives_log_probabilities_over_seen_classes(trained, digits):
    x = torch.stack(
        [digits.benchmark.test_stream[i].dataset[j][0] for i in range(2) for j in range(8)]
    )
    trained.model.eval()
    with torch.no_grad():
        rescaled = trained.classify(x)
        trained.config.eval_rescale = False
        plain = trained.classify(x)
        features = trained.predict(x).features
        trained.config.eval_rescale = True
    seen = trained.seen_class_list
    unseen = [c for c in range(10) if c not in seen]
    torch.testing.assert_close(
        rescaled[:, seen].logsumexp(1), torch.zeros(len(x)), atol=1e-4, rtol=0
    )
    assert (rescaled[:, unseen] < -1e30).all()
    # without the distance term the group of the top class gets the largest weight: the
    # prediction is the plain one
    eta0, eta = trained.config.energy_eta0, trained.config.energy_eta
    trained.config.energy_eta0, trained.config.energy_eta = 1.0, 0.0
    try:
        with torch.no_grad():
            sharp = trained.rescale_by_energy(plain, features)
        assert torch.equal(sharp.argmax(1), plain.argmax(1))
    finally:
        trained.config.energy_eta0, trained.config.energy_eta = eta0, eta


def test_mahalanobis_distance_matches_the_definition(trained):
    classes = trained.seen_class_list[:2]
    features = torch.randn(3, trained.encoder.feature_dim)
    distance = trained.mahalanobis(features, classes)
    statistics = trained.consolidation.prompted_statistics
    for column, label in enumerate(classes):
        factor = statistics.scales[label].double()
        covariance = factor @ factor.T
        offset = features.double() - statistics.means[label].double()
        expected = (offset @ torch.linalg.inv(covariance) * offset).sum(1).sqrt()
        torch.testing.assert_close(distance[:, column].double(), expected, rtol=1e-3, atol=1e-3)


def test_checkpoint_round_trip_keeps_tree_distances_and_predictions(trained, tiny_vit, digits):
    state = trained.state_dict()
    restored = make(tiny_vit, digits, eval_rescale=True, reg_glob=0.05, reg_sub=0.1)
    restored.load_state_dict(state)
    assert restored.taxonomy.to_state() == trained.taxonomy.to_state()
    torch.testing.assert_close(restored.distances.matrix, trained.distances.matrix)
    torch.testing.assert_close(restored.gamma, trained.gamma)
    x = torch.stack([digits.benchmark.test_stream[1].dataset[i][0] for i in range(16)])
    trained.model.eval()
    restored.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), trained.classify(x))
    summary = restored.evaluation_summary()
    assert summary["taxonomy"]["text"] == trained.taxonomy.render(digits.class_names)
    assert summary["class_distances"]["classes"] == trained.distances.classes


def test_a_taxonomy_file_drives_the_groups(tmp_path, tiny_vit, digits):
    path = tmp_path / "digits.yaml"
    path.write_text("round: [0, 6, 8, 9, 3]\nstraight: [1, 4, 7]\nmixed: [2, 5]\n")
    strategy = make(tiny_vit, digits, taxonomy=str(path), ot_weighting=False)
    assert not strategy.uses_distances  # a given tree, no weighting: no OT needed
    first = digits.classes_per_experience[0]
    strategy.task_classes = [first]  # as when the first task begins
    strategy.build_tree()
    assert strategy.taxonomy.source == f"file {path}"
    file_groups = [[0, 6, 8, 9, 3], [1, 4, 7], [2, 5]]
    expected = [g for g in ([c for c in group if c in first] for group in file_groups) if g]
    assert strategy.taxonomy.leaf_groups() == expected
    assert strategy.distances.classes == []


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_digits_run_records_the_tree_and_the_distances(tmp_path, capsys):
    from clbench.cli import main
    from clbench.results import RunFolder

    out = tmp_path / "out"
    code = main(
        [
            "run",
            "-s",
            "hier-ot",
            "-c",
            "digits-offline",
            "--preset",
            "quick",
            "--device",
            "cpu",
            "--set",
            "scenario.num_experiences=2",
            "--set",
            "eval_rescale=true",
            "--set",
            "ot_samples=64",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    (config_path,) = out.glob("*/*/*/config.json")
    folder = RunFolder(config_path.parent)
    assert folder.status()["state"] == "complete"
    last = folder.records()[-1].extra
    assert len(last["class_distances"]["matrix"]) == 10
    assert "10 classes" in last["taxonomy"]["text"]
    assert last["ot_pairs"] == 5 * 4 // 2 + 5 * 5 + 5 * 4 // 2 and last["ot_seconds"] > 0
    capsys.readouterr()
    assert main(["tree", str(folder.path), "--distances"]) == 0
    printed = capsys.readouterr().out
    assert "label tree" in printed and "OT class distances (emd)" in printed
    assert f"OT: {last['ot_pairs']} class pairs" in printed


def test_tree_printout_reports_the_ot_share_of_the_run_time(tmp_path, capsys):
    from clbench.cli import main as cli_main

    def print_tree(argv):  # `clbench tree` (its code moved from clbench.taxonomy to the CLI)
        return cli_main(["tree", *argv])

    def record(experience, ot_seconds, pairs):  # a progress.json record as the run loop writes it
        return {
            "experience": experience,
            "accuracy": [],
            "correct": [],
            "counts": [],
            "train_seconds": 30.0,
            "eval_seconds": 10.0,
            "peak_memory_mb": 0.0,
            "extra": {
                "taxonomy": {"text": f"label tree after {experience}"},
                "ot_seconds": ot_seconds,
                "ot_pairs": pairs,
            },
        }

    (tmp_path / "config.json").write_text("{}")  # what makes the folder a run folder
    (tmp_path / "progress.json").write_text(json.dumps([record(0, 1.0, 6), record(1, 2.0, 28)]))
    assert print_tree([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    # cumulative OT time over the cumulative train + eval time: 2 s of 80 s
    assert "label tree after 1" in printed
    assert "OT: 28 class pairs, 2.0 s of the run's 80 s train + eval (2.5%)" in printed
    assert print_tree([str(tmp_path), "--experience", "0"]) == 0
    assert "1.0 s of the run's 40 s train + eval (2.5%)" in capsys.readouterr().out


def test_a_bad_taxonomy_stops_a_cli_run_with_one_line(tmp_path, capsys):
    from clbench.cli import main

    path = tmp_path / "tree.json"
    path.write_text('{"a": ["0", "1", "seven"]}')
    code = main(
        [
            "run",
            "-s",
            "hier-ot",
            "-c",
            "digits-offline",
            "--preset",
            "quick",
            "--device",
            "cpu",
            "--set",
            f"taxonomy={path}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("clbench: error: bad taxonomy")
    assert "unknown class names ['seven']" in error and "missing from the tree" in error

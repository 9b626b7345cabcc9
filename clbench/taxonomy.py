"""Label trees over the classes seen so far: leaf groups are classes that are easily confused.

The hierarchical-OT method (arXiv 2410.04327) regularises features within each leaf group of
a label taxonomy. A tree comes from one of four places:

- a file the user writes (JSON or YAML): nested groups of class names, e.g.
  ``{"animals": {"mammals": ["bear", "fox"], "fish": ["trout", "shark"]}, "plants": [...]}``;
  a mapping names its groups, a list of names is a leaf group, a list of groups is a group
  of unnamed subgroups. It must name every class of the scenario and nothing else; the
  tree used at a task is the file's tree restricted to the classes seen so far, so it grows
  task by task.
- a file of trees per task, as the authors wrote theirs (one LLM-written tree per task,
  ``taxanomy/<data set>/order1/taxanomy.py`` in tranquyenbk173/HierC):
  ``{"tasks": [<tree of task 1>, <tree of task 2>, ...]}``, each tree in the format above
  and over exactly the classes seen by its task (:class:`TaskTrees`). The authors' trees
  of Split CIFAR-100 and ImageNet-R ship in ``clbench/data/trees/`` (:func:`authors_tree`).
- a data set's own hierarchy: CIFAR-100's 20 superclasses (:func:`cifar100_superclasses`).
- automatic: agglomerative clustering (scipy) of the seen classes with their OT distances
  as the metric (:func:`cluster_taxonomy`); the dendrogram cut into leaf groups.

A file is checked strictly: a class listed twice or a class missing is an error. The
authors' trees have both (ImageNet-R: four classes in two groups, two classes in no group,
task 7's tree equal to task 6's), so ``lenient=True`` logs those problems as warnings and
keeps the tree as written: a class listed twice belongs to both leaf groups, a class in no
group takes no part in the group loss. Unknown class names stay errors in both modes.

``clbench tree RUN_DIR`` prints the tree a hier-ot run used (:mod:`clbench.cli.run`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clbench.errors import UsageError

logger = logging.getLogger(__name__)

# the authors' trees, converted from tranquyenbk173/HierC (each file's "note" says from where)
TREES_FOLDER = Path(__file__).parent / "data" / "trees"
AUTHORS_TREES = {
    "split-cifar100": "hierc-split-cifar100.json",
    "imagenet-r": "hierc-imagenet-r.json",
    "split-cub200": "hierc-split-cub200.json",
}
# the key of a file with one tree per task; "note" may say where the trees come from
TASKS_KEY = "tasks"
NOTE_KEY = "note"

# CIFAR-100's 20 coarse labels and their fine labels, as the data set ships them
# (the `coarse_label_names` of cifar-100-python/meta, fine names as in `fine_label_names`).
CIFAR100_SUPERCLASSES: dict[str, list[str]] = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


@dataclass
class TaxonomyNode:
    """A group: internal (``children``) or a leaf group (``classes``, class ids)."""

    name: str
    children: list[TaxonomyNode] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def leaves(self) -> list[TaxonomyNode]:
        if self.is_leaf:
            return [self]
        return [leaf for child in self.children for leaf in child.leaves()]

    def restricted(self, keep: set[int]) -> TaxonomyNode | None:
        """This subtree with only the classes in ``keep``; None when nothing is left."""
        if self.is_leaf:
            classes = [c for c in self.classes if c in keep]
            return TaxonomyNode(self.name, classes=classes) if classes else None
        children = [c for c in (child.restricted(keep) for child in self.children) if c is not None]
        return TaxonomyNode(self.name, children=children) if children else None

    def to_state(self) -> dict[str, Any]:
        if self.is_leaf:
            return {"name": self.name, "classes": list(self.classes)}
        return {"name": self.name, "children": [child.to_state() for child in self.children]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TaxonomyNode:
        children = [cls.from_state(child) for child in state.get("children", [])]
        return cls(state["name"], children=children, classes=list(state.get("classes", [])))


@dataclass
class Taxonomy:
    """A label tree; ``source`` says where it came from (file path, superclasses, clustering)."""

    root: TaxonomyNode
    source: str

    def leaf_groups(self) -> list[list[int]]:
        return [list(leaf.classes) for leaf in self.root.leaves() if leaf.classes]

    @property
    def classes(self) -> list[int]:
        """Every class in the tree once (a leniently read tree may list one twice)."""
        return sorted({c for group in self.leaf_groups() for c in group})

    def membership(self, num_classes: int) -> Tensor:
        """[num_classes, groups] bool: class c is in leaf group g. A class of no group has
        an empty row; one listed twice (a leniently read tree) has two entries."""
        groups = self.leaf_groups()
        members = torch.zeros(num_classes, len(groups), dtype=torch.bool)
        for group, classes in enumerate(groups):
            members[classes, group] = True
        return members

    def group_index(self, num_classes: int) -> Tensor:
        """[num_classes] leaf-group index of every class; -1 for classes not in the tree."""
        index = torch.full((num_classes,), -1, dtype=torch.long)
        for group, classes in enumerate(self.leaf_groups()):
            index[classes] = group
        return index

    def restricted(self, classes: Sequence[int], *, lenient: bool = False) -> Taxonomy:
        """The tree over ``classes`` only (empty groups dropped), e.g. the classes seen so far.

        A class of ``classes`` that the tree lacks is a KeyError, or with ``lenient`` a
        class in no group.
        """
        keep = set(classes)
        missing = sorted(keep - set(self.classes))
        if missing and not lenient:
            raise KeyError(f"classes {missing} are not in the taxonomy")
        root = self.root.restricted(keep)
        return Taxonomy(root if root is not None else TaxonomyNode("root"), self.source)

    def render(self, class_names: Sequence[str]) -> str:
        """The tree as indented text, one group per line, leaf groups with their classes."""
        groups = self.leaf_groups()
        lines = [
            f"label tree ({self.source}): {sum(map(len, groups))} classes in "
            f"{len(groups)} leaf groups"
        ]

        def visit(node: TaxonomyNode, prefix: str, last: bool, top: bool) -> None:
            branch = "" if top else ("└─ " if last else "├─ ")
            if node.is_leaf:
                names = ", ".join(class_names[c] for c in node.classes)
                lines.append(f"{prefix}{branch}{node.name}: {names}")
                return
            lines.append(f"{prefix}{branch}{node.name}")
            inner = prefix if top else prefix + ("   " if last else "│  ")
            for i, child in enumerate(node.children):
                visit(child, inner, i == len(node.children) - 1, False)

        visit(self.root, "", True, True)
        return "\n".join(lines)

    def to_names(self, class_names: Sequence[str]) -> Any:
        """The tree in the file format (nested groups of class names): it loads back."""

        def convert(node: TaxonomyNode) -> Any:
            if node.is_leaf:
                return [class_names[c] for c in node.classes]
            return {child.name: convert(child) for child in node.children}

        return convert(self.root) if not self.root.is_leaf else {self.root.name: convert(self.root)}

    def to_state(self) -> dict[str, Any]:
        return {"source": self.source, "root": self.root.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Taxonomy:
        return cls(TaxonomyNode.from_state(state["root"]), state["source"])


# ---------------------------------------------------------------------------- from a file
@dataclass
class TaskTrees:
    """One tree per task, as the authors' code reads them: task t uses ``trees[t]`` as
    written (not a restriction of a later tree), over the classes seen by task t."""

    trees: list[Taxonomy]
    source: str
    lenient: bool = False

    def check_task_count(self, num_tasks: int) -> None:
        if len(self.trees) < num_tasks or (len(self.trees) > num_tasks and not self.lenient):
            raise UsageError(
                f"taxonomy ({self.source}) has trees for {len(self.trees)} tasks; the "
                f"scenario has {num_tasks} tasks (one tree per task)"
            )

    def for_task(self, task: int, seen: Sequence[int], class_names: Sequence[str]) -> Taxonomy:
        """Task ``task``'s tree, checked against the classes seen by then (``seen``).

        A seen class missing from the tree, or a tree class not seen yet (the trees follow
        a class order: the scenario's must be the same), is an error, or with ``lenient`` a
        warning; the tree is then restricted to the seen classes.
        """
        if task >= len(self.trees):
            self.check_task_count(task + 1)
        tree = self.trees[task]
        lacking = sorted(set(seen) - set(tree.classes))
        unseen = sorted(set(tree.classes) - set(seen))
        problems = []
        if lacking:
            problems.append(
                f"classes seen by task {task + 1} missing from its tree: "
                f"{[class_names[c] for c in lacking]}"
            )
        if unseen:
            problems.append(
                f"classes of task {task + 1}'s tree not seen by then: "
                f"{[class_names[c] for c in unseen]} (the trees follow one class order; "
                f"the scenario's differs, e.g. another seed)"
            )
        _report(problems, self.lenient, self.source)
        return tree.restricted(seen, lenient=True)


def authors_tree(scenario: str) -> Path:
    """The shipped per-task trees of the authors for ``scenario`` (see AUTHORS_TREES)."""
    if scenario not in AUTHORS_TREES:
        raise UsageError(
            f"no authors' label trees for {scenario!r}; shipped: {', '.join(AUTHORS_TREES)}"
        )
    return TREES_FOLDER / AUTHORS_TREES[scenario]


def load_taxonomy_file(
    path: str | Path, class_names: Sequence[str], *, lenient: bool = False
) -> Taxonomy | TaskTrees:
    """A taxonomy file (JSON, or YAML) over the classes named ``class_names``: one tree, or
    ``{"tasks": [...]}`` with one tree per task (:class:`TaskTrees`).

    Raises a UsageError naming what is wrong: the file is missing or unreadable, a group is
    malformed or empty, names are unknown, and (unless ``lenient``: then a warning) a class
    is listed twice or classes are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"taxonomy file {path} does not exist (valid taxonomy values: auto, "
            f"cifar100-superclasses, the authors' trees "
            f"{', '.join('authors-' + name for name in AUTHORS_TREES)}, or the path of a "
            f"JSON / YAML file)"
        )
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            content = json.loads(text)
        else:
            import yaml

            content = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError: say which file
        raise UsageError(
            f"taxonomy file {path} is not valid "
            f"{'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {error}"
        ) from None
    source = f"file {path}"
    if not (isinstance(content, dict) and TASKS_KEY in content):
        return taxonomy_from_names(content, class_names, source=source, lenient=lenient)
    extra = sorted(set(content) - {TASKS_KEY, NOTE_KEY})
    trees = content[TASKS_KEY]
    if extra or not isinstance(trees, list) or not trees:
        raise UsageError(
            f"taxonomy ({source}): a file of trees per task holds {TASKS_KEY!r} (a non-empty "
            f"list, one tree per task) and optionally {NOTE_KEY!r}; got keys {sorted(content)}"
        )
    return TaskTrees(
        [
            taxonomy_from_names(
                tree,
                class_names,
                source=f"{source}, task {task + 1}",
                lenient=lenient,
                complete=False,  # a task's tree covers the classes seen by then: for_task
            )
            for task, tree in enumerate(trees)
        ],
        source,
        lenient,
    )


def taxonomy_from_names(
    content: Any,
    class_names: Sequence[str],
    *,
    source: str,
    lenient: bool = False,
    complete: bool = True,
) -> Taxonomy:
    """Parse nested groups of class names (see the module docstring) and check them.

    ``complete``: the tree must name every class. ``lenient``: a class listed twice (it
    then belongs to both groups) and missing classes are logged as warnings, not errors.
    """
    ids = {name: index for index, name in enumerate(class_names)}
    problems: list[str] = []
    repeats: list[str] = []  # errors, or warnings when lenient
    seen_at: dict[str, str] = {}
    unknown: list[str] = []

    def parse(node: Any, name: str, where: str) -> TaxonomyNode | None:
        if isinstance(node, dict):
            if not node:
                problems.append(f"group {where} is empty")
                return None
            children = [parse(child, str(key), f"{where}/{key}") for key, child in node.items()]
            return TaxonomyNode(name, children=[c for c in children if c is not None])
        if isinstance(node, list):
            if not node:
                problems.append(f"group {where} is empty")
                return None
            scalars = [
                item for item in node if isinstance(item, (str, int)) and not isinstance(item, bool)
            ]
            if len(scalars) == len(node):
                classes = []
                for item in scalars:
                    label = str(item)
                    if label in seen_at:
                        repeats.append(
                            f"class {label!r} is listed twice ({seen_at[label]} and {where})"
                        )
                    seen_at[label] = where
                    if label not in ids:
                        unknown.append(label)
                    elif ids[label] not in classes:
                        classes.append(ids[label])
                return TaxonomyNode(name, classes=classes)
            if scalars:
                problems.append(
                    f"group {where} mixes class names and subgroups; put the "
                    f"names {scalars} in a subgroup of their own"
                )
                return None
            children = [
                parse(child, f"{name}.{i + 1}", f"{where}[{i}]") for i, child in enumerate(node)
            ]
            return TaxonomyNode(name, children=[c for c in children if c is not None])
        problems.append(
            f"{where} is a {type(node).__name__} ({node!r}); expected a mapping of "
            f"groups or a list of class names"
        )
        return None

    if not isinstance(content, (dict, list)):
        raise UsageError(
            f"taxonomy ({source}) must be a mapping of groups or a list; got "
            f"{type(content).__name__}"
        )
    root = parse(content, "root", "root")
    if unknown:
        problems.append(f"unknown class names {unknown} (valid names: {_preview(class_names)})")
    if complete:
        missing = [name for name in class_names if name not in seen_at]
        if missing:
            repeats.append(f"classes of the scenario missing from the tree: {missing}")
    if problems:
        raise UsageError(f"bad taxonomy ({source}): " + "; ".join(problems + repeats))
    _report(repeats, lenient, source)
    assert root is not None
    return Taxonomy(root, source)


def _report(problems: list[str], lenient: bool, source: str) -> None:
    """Problems a lenient check lets pass: a warning each, else one UsageError."""
    if not problems:
        return
    if not lenient:
        raise UsageError(
            f"bad taxonomy ({source}): " + "; ".join(problems) + " (taxonomy_check=lenient "
            "accepts duplicated and missing classes, as the authors' trees have them)"
        )
    for problem in problems:
        logger.warning("taxonomy (%s): %s", source, problem)


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------- a data set's own
def cifar100_superclasses(class_names: Sequence[str]) -> Taxonomy:
    """CIFAR-100's 20 superclasses over the scenario's class ids (matched by fine name)."""
    fine = [name for names in CIFAR100_SUPERCLASSES.values() for name in names]
    if sorted(class_names) != sorted(fine):
        lacking = sorted(set(fine) - set(class_names))[:10]
        raise UsageError(
            "taxonomy=cifar100-superclasses needs the CIFAR-100 classes (scenario "
            f"split-cifar100); this scenario's classes lack e.g. {lacking}"
        )
    return taxonomy_from_names(CIFAR100_SUPERCLASSES, class_names, source="CIFAR-100 superclasses")


# ------------------------------------------------------------------------------ automatic
def cluster_taxonomy(
    distances: Tensor, classes: Sequence[int], num_groups: int, linkage: str = "average"
) -> Taxonomy:
    """Agglomerative clustering of ``classes`` under the distance matrix ``distances``.

    The full dendrogram is the tree; it is cut into at most ``num_groups`` leaf groups
    (scipy's ``fcluster(maxclust)``), each a subtree whose classes are never split. Internal
    nodes are named by the height of their merge.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    valid = ("average", "complete", "single", "weighted")
    if linkage not in valid:
        raise UsageError(f"unknown linkage {linkage!r}; valid choices: {', '.join(valid)}")
    classes = list(classes)
    source = f"{linkage}-linkage clustering of OT distances"
    if len(classes) <= 1 or num_groups <= 1:
        return Taxonomy(TaxonomyNode("group 1", classes=sorted(classes)), source)
    matrix = distances.double().cpu().numpy().copy()
    matrix = (matrix + matrix.T) / 2
    matrix[range(len(classes)), range(len(classes))] = 0.0
    merges = hierarchy.linkage(squareform(matrix, checks=False), method=linkage)
    flat = hierarchy.fcluster(merges, t=min(num_groups, len(classes)), criterion="maxclust")
    counter = iter(range(1, len(classes) + 1))

    def build(node: Any) -> TaxonomyNode:
        members = node.pre_order()
        if len({int(flat[m]) for m in members}) == 1:
            return TaxonomyNode(
                f"group {next(counter)}", classes=sorted(classes[m] for m in members)
            )
        children = [build(node.get_left()), build(node.get_right())]
        return TaxonomyNode(f"merged at {node.dist:.4g}", children=children)

    return Taxonomy(build(hierarchy.to_tree(merges)), source)


def number_of_groups(num_classes: int, group_size: float) -> int:
    """Leaf groups for the automatic tree: about ``group_size`` classes each."""
    return max(1, math.ceil(num_classes / max(group_size, 1e-9)))

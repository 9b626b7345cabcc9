"""Relation extraction in the FewRel JSON format: what every such scenario shares.

FewRel JSON: ``{relation_id: [{"tokens": [...], "h": [name, wikidata_id, [[idx, ...]]],
"t": [...]}, ...]}``; an entity may have several mentions, we mark the first. Here: the
format checks, relation names, the RP-CRE / CRL per-relation split, the per-relation
minimum, the options every relation scenario starts with, and the scenario builder (which encodes
through :mod:`clbench.data.relation_tokens`). The FewRel scenarios are in
``scenarios/relation_extraction.py``, TACRED's in ``scenarios/tacred.py``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clbench.config import Options, option
from clbench.data.fewrel_files import FEWREL_HOW_TO_GET
from clbench.data.files import read_json
from clbench.data.relation_tokens import encode_relation_examples_cached
from clbench.data.splits import (
    TaskSplit,
    TaskSplitOptions,
    increment_option,
    initial_classes_option,
    split_details,
    task_sizes_option,
)
from clbench.errors import DataNotFoundError, UsageError
from clbench.scenario import (
    Scenario,
    TensorClassificationDataset,
    class_incremental,
    seeded_class_order,
)

MAX_LENGTH_HELP = "tokens per sentence, [CLS]/[SEP]/markers included"


@dataclass
class RelationOptions(TaskSplitOptions, Options):
    """The options every relation-extraction scenario starts with, in this order (the
    order of their config.json keys): the data, the task count, the sequence length, the
    other ways to split (:mod:`clbench.data.splits`; recorded only when used). A
    scenario's options subclass this and redeclare a field for its own default or help.
    """

    data_file: str | None = option(None, "a FewRel-format JSON file")
    num_experiences: int | None = option(None, "number of tasks (the relations split equally)")
    max_length: int = option(256, MAX_LENGTH_HELP)
    task_sizes: list[int] = task_sizes_option()
    initial_classes: int = initial_classes_option()
    increment: int = increment_option()


# ---------------------------------------------------------------------------- loading


def load_fewrel_json(path: Path) -> dict[str, list[dict]]:
    """Read and check a FewRel-format file; a missing file is a DataNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"FewRel data file {path} not found (looked in: {path}); {FEWREL_HOW_TO_GET}"
        )
    data = read_json(path)
    check_fewrel_structure(data, path)
    return data


def check_fewrel_structure(data: Any, path: Path) -> None:
    """Fail on the first malformed example, naming it (and ``path``), rather than deep
    inside encoding."""
    if not isinstance(data, dict) or not data:
        raise UsageError(
            f"{path}: expected a non-empty JSON object {{relation_id: [examples]}}, "
            f"got {type(data).__name__}"
        )
    for relation, examples in data.items():
        if not isinstance(examples, list) or not examples:
            raise UsageError(f"{path}: relation {relation!r} must map to a non-empty list")
        for index, example in enumerate(examples):
            where = f"{path}: relation {relation!r} example {index}"
            if not isinstance(example, dict):
                raise UsageError(f"{where}: expected an object, got {type(example).__name__}")
            tokens = example.get("tokens")
            if (
                not isinstance(tokens, list)
                or not tokens
                or not all(isinstance(t, str) for t in tokens)
            ):
                raise UsageError(f"{where}: 'tokens' must be a non-empty list of strings")
            for key in ("h", "t"):
                _check_entity(example.get(key), len(tokens), f"{where}: '{key}'")


def _check_entity(entity: Any, num_tokens: int, where: str) -> None:
    if not isinstance(entity, list) or len(entity) < 3 or not isinstance(entity[2], list):
        raise UsageError(f"{where} must be [name, id, [[token index, ...], ...]]")
    spans = entity[2]
    if not spans or not isinstance(spans[0], list) or not spans[0]:
        raise UsageError(f"{where} has no token span")
    span = spans[0]
    if not all(isinstance(i, int) and 0 <= i < num_tokens for i in span):
        raise UsageError(f"{where}: span {span} is not a list of token indices < {num_tokens}")


def load_relation_names(path: Path) -> dict[str, str]:
    """``pid2name.json`` ({"P177": ["crosses", "description"]}) -> {"P177": "crosses"}.

    Optional: without the file, callers name relations by id (naming only, no data lost).
    """
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected an object {{relation_id: [name, description]}}")
    names = {}
    for relation, value in raw.items():
        if isinstance(value, list) and value and isinstance(value[0], str):
            names[relation] = value[0]
        elif isinstance(value, str):
            names[relation] = value
        else:
            raise UsageError(f"{path}: entry {relation!r} is not [name, description]")
    return names


def merge_relation_files(paths: Sequence[Path]) -> dict[str, list[dict]]:
    """The relations of several FewRel-format files; a relation in two files is an error."""
    merged: dict[str, list[dict]] = {}
    for path in paths:
        data = load_fewrel_json(path)
        repeated = sorted(set(data) & set(merged))
        if repeated:
            raise UsageError(f"{path} repeats relations of another file: {', '.join(repeated)}")
        merged.update(data)
    return merged


# ------------------------------------------------------------------------------ split


@dataclass(frozen=True)
class RelationSplits:
    """Per split, relation id -> indices into ``data[relation_id]`` (in shuffled order)."""

    train: dict[str, list[int]]
    val: dict[str, list[int]]
    test: dict[str, list[int]]

    def counts(self) -> dict[str, int]:
        return {
            name: sum(len(v) for v in getattr(self, name).values())
            for name in ("train", "val", "test")
        }


def split_relation_examples(
    data: Mapping[str, Sequence[dict]],
    seed: int,
    n_train: int = 420,
    n_val: int = 140,
    n_test: int = 140,
) -> RelationSplits:
    """The RP-CRE / CRL split: per relation, shuffle and cut n_train / n_val / n_test.

    One ``random.Random(seed)`` walks the relations in sorted id order, so the split
    depends on the file's content, never on its key order (RP-CRE / CRL re-seed before
    each relation instead: ``scenario.split=crl``). Examples beyond the three counts are
    left out.
    """
    if n_train < 1 or n_test < 1 or n_val < 0:
        raise UsageError(
            f"split sizes must be n_train >= 1, n_val >= 0, n_test >= 1 "
            f"(got {n_train}/{n_val}/{n_test})"
        )
    needed = n_train + n_val + n_test
    rng = random.Random(seed)
    splits: dict[str, dict[str, list[int]]] = {"train": {}, "val": {}, "test": {}}
    for relation in sorted(data):
        available = len(data[relation])
        if available < needed:
            raise UsageError(
                f"relation {relation!r} has {available} examples, fewer than "
                f"n_train + n_val + n_test = {n_train} + {n_val} + {n_test} = {needed}"
            )
        order = list(range(available))
        rng.shuffle(order)
        splits["train"][relation] = order[:n_train]
        splits["val"][relation] = order[n_train : n_train + n_val]
        splits["test"][relation] = order[n_train + n_val : needed]
    return RelationSplits(**splits)


def check_relation_sizes(
    data: Mapping[str, Sequence[dict]], minimum: int, scenario: str, path: str
) -> None:
    """Every relation needs ``minimum`` sentences (train, validation and test of it);
    the error lists the relations below it, smallest first."""
    small = sorted((len(examples), relation) for relation, examples in data.items())
    small = [(n, relation) for n, relation in small if n < minimum]
    if small:
        listed = ", ".join(f"{relation} ({n})" for n, relation in small[:10])
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        raise UsageError(
            f"scenario {scenario}: {len(small)} relation(s) of {path} have fewer than "
            f"{minimum} sentences, too few to train and test on: {listed}{more}. Leave them "
            "out (scenario.exclude_relations=...) or lower scenario.min_per_relation"
        )


# --------------------------------------------------------------------------- scenario


def require_text_encoder(encoder: Any, scenario: str) -> None:
    if getattr(encoder, "modality", None) != "text" or not hasattr(encoder, "marker_ids"):
        raise UsageError(
            f"scenario {scenario} needs a text backbone with entity markers, e.g. minilm-l6 "
            f"(got a {getattr(encoder, 'modality', None) or type(encoder).__name__} backbone)"
        )


def build_relation_scenario(
    name: str,
    data: Mapping[str, Sequence[dict]],
    encoder: Any,
    seed: int,
    *,
    tasks: TaskSplit,
    max_length: int,
    n_train: int,
    n_val: int,
    n_test: int,
    source_digest: str,
    relation_names: Mapping[str, str] | None = None,
    details: Mapping[str, Any] | None = None,
    splits: RelationSplits | None = None,
    class_order: Sequence[int] | None = None,
) -> Scenario:
    """A class-incremental relation-extraction scenario from FewRel-format data.

    Class id = index of the relation in sorted id order; the stream visits relations in
    ``seeded_class_order(num_relations, seed)``, cut into ``tasks`` (a split resolved
    before anything is encoded). The validation split is kept aside in
    ``details["validation"]``. ``splits`` replaces the RP-CRE / CRL cut for protocols
    that split otherwise (TACRED); ``n_train`` / ``n_val`` / ``n_test`` then only describe
    it (as the largest per-relation counts). ``class_order`` (class ids) replaces the
    seeded order for protocols that derive it otherwise (CRL's, ``scenario.split=crl``).
    """
    require_text_encoder(encoder, name)
    relations = sorted(data)
    if tasks.num_classes != len(relations):
        raise UsageError(f"{name}: a split of {tasks.num_classes} relations for {len(relations)}")
    if splits is None:
        splits = split_relation_examples(data, seed, n_train, n_val, n_test)
    # Encode the whole file in a fixed order (independent of the seed) so one cache
    # serves every seed; the split then only picks rows.
    offsets: dict[str, int] = {}
    examples: list[dict] = []
    for relation in relations:
        offsets[relation] = len(examples)
        examples.extend(data[relation])
    encoded = encode_relation_examples_cached(examples, encoder, max_length, source_digest)

    def dataset(split: dict[str, list[int]]) -> TensorClassificationDataset:
        rows: list[int] = []
        labels: list[int] = []
        for class_id, relation in enumerate(relations):
            rows.extend(offsets[relation] + i for i in split[relation])
            labels.extend([class_id] * len(split[relation]))
        return TensorClassificationDataset(
            encoded.inputs[torch.tensor(rows, dtype=torch.long)],
            torch.tensor(labels, dtype=torch.long),
        )

    train, val, test = dataset(splits.train), dataset(splits.val), dataset(splits.test)
    if class_order is None:
        class_order = seeded_class_order(len(relations), seed)
    class_order = list(class_order)
    benchmark, classes = class_incremental(train, test, class_order, tasks)
    names = relation_names or {}
    return Scenario(
        name=name,
        benchmark=benchmark,
        classes_per_experience=classes,
        class_names=[names.get(r, r) for r in relations],
        modality="text",
        details={
            **(details or {}),
            **split_details(tasks),
            "relation_ids": relations,
            "class_order": class_order,
            "seed": seed,
            "per_relation": {"train": n_train, "val": n_val, "test": n_test},
            "counts": splits.counts(),
            "max_length": max_length,
            "truncated": encoded.stats,
            "token_cache": str(encoded.cache_file),
            "validation": val,
        },
    )

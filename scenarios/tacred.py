"""TACRED in the continual relation-extraction protocol of RP-CRE / CRL.

TACRED is licensed by the Linguistic Data Consortium and may not be redistributed, so the
user supplies the files; nothing is downloaded. Protocol (REFERENCE.md): the 42 labels
minus ``no_relation`` and ``per:country_of_death`` leave 40 relations, 10 tasks x 4; per
relation, after a seeded shuffle, the first min(n // 5, 41) sentences are the test set
and up to 320 of the rest the training set (as CRL's sampler does); no validation set.

Accepted input: the LDC release's JSON (a list of records with ``token``, ``relation``,
``subj_start`` / ``subj_end`` / ``obj_start`` / ``obj_end``; train.json, dev.json and
test.json are merged, as the protocol re-splits the whole set), or one file already in
FewRel format (relation -> examples), as some continual-RE repositories convert it.
Encoding (entity markers, truncation around the entities, the token cache) is the one of
every FewRel-format scenario (:mod:`clbench.data.relations`), and so are the authors'
``template`` and ``split`` options (``scenarios/relation_extraction.py``). With
``split=crl`` the shuffles are CRL's, but of this file's sentence order: CRL's own
pre-converted TACRED file orders them otherwise, so its exact splits are out of reach.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.config import option
from clbench.data.download import ProgressCallback, file_digest
from clbench.data.files import read_json
from clbench.data.relations import (
    RelationOptions,
    RelationSplits,
    build_relation_scenario,
    check_fewrel_structure,
    require_text_encoder,
)
from clbench.data.splits import announce, protocol_line
from clbench.data.tacred_files import (  # torch-free: `clbench list` probes with them
    find_tacred_files,
    tacred_data_status,
)
from clbench.errors import UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import Scenario, ScenarioSpec, default_data_root
from clbench.scenarios.relation_extraction import (
    RelationTemplate,
    SplitRule,
    protocol_arguments,
    split_option,
    template_option,
)

EXCLUDED_RELATIONS = ("no_relation", "per:country_of_death")
TACRED_RELATIONS = 40
# CRL's datasets/id2rel_tacred.json (thuiar/CRL 7316cba): the relation order their task
# assignment indexes (scenario.split=crl).
CRL_TACRED_ID2REL = (
    "org:founded_by per:employee_of org:alternate_names per:cities_of_residence per:children "
    "per:title per:siblings per:religion per:age org:website per:stateorprovinces_of_residence "
    "org:member_of org:top_members/employees per:countries_of_residence "
    "org:city_of_headquarters org:members org:country_of_headquarters per:spouse "
    "org:stateorprovince_of_headquarters org:number_of_employees/members org:parents "
    "org:subsidiaries per:origin org:political/religious_affiliation per:other_family "
    "per:stateorprovince_of_birth org:dissolved per:date_of_death org:shareholders "
    "per:alternate_names per:parents per:schools_attended per:cause_of_death per:city_of_death "
    "per:stateorprovince_of_death org:founded per:country_of_birth per:date_of_birth "
    "per:city_of_birth per:charges"
).split()
# Bump when the conversion to FewRel format changes, so old token caches stop matching.
CONVERSION_VERSION = 1
# The Penn Treebank escapes in TACRED's tokens, mapped back so BERT sees the characters.
PTB_ESCAPES = {
    "-LRB-": "(",
    "-RRB-": ")",
    "-LSB-": "[",
    "-RSB-": "]",
    "-LCB-": "{",
    "-RCB-": "}",
}


@dataclass
class TACREDOptions(RelationOptions):
    data_file: str | None = option(
        None,
        "a TACRED JSON file (LDC list format or FewRel format) or a folder with train.json, "
        "dev.json and test.json (default: <data_root>/tacred)",
    )
    num_experiences: int = option(10, "number of tasks (must divide the 40 relations)")
    max_train: int = option(320, "at most this many training sentences per relation")
    max_test: int = option(41, "at most this many test sentences per relation (and n // 5)")
    exclude_relations: list[str] = option(
        list(EXCLUDED_RELATIONS), "labels left out of the protocol (comma-separated)"
    )
    template: RelationTemplate = template_option()
    split: SplitRule = split_option()


def check_tacred_present(
    options: TACREDOptions,
    data_root: Path,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """``clbench download tacred``: nothing to fetch; says where the files are or must go."""
    folder = Path(data_root) / "tacred"
    files = find_tacred_files(options.data_file, folder)
    return files[0].parent if len(files) > 1 else files[0]


def tacred_record_to_example(record: Any, where: str) -> tuple[str, dict]:
    """(relation, FewRel-format example) from one LDC record; malformed ones are named."""
    keys = ("token", "relation", "subj_start", "subj_end", "obj_start", "obj_end")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise UsageError(f"{where}: expected a TACRED record with keys {', '.join(keys)}")
    tokens = [PTB_ESCAPES.get(t, t) for t in record["token"]]
    spans = {}
    for role in ("subj", "obj"):
        start, end = record[f"{role}_start"], record[f"{role}_end"]
        if not (
            isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(tokens)
        ):
            raise UsageError(f"{where}: {role} span [{start}, {end}] outside {len(tokens)} tokens")
        indices = list(range(start, end + 1))
        spans[role] = [
            " ".join(tokens[i] for i in indices),
            record.get(f"{role}_type", ""),
            [indices],
        ]
    return str(record["relation"]), {"tokens": tokens, "h": spans["subj"], "t": spans["obj"]}


def load_tacred(files: Sequence[Path], exclude: Sequence[str]) -> dict[str, list[dict]]:
    """Relation -> FewRel-format examples, from LDC-format lists or one FewRel-format file."""
    data: dict[str, list[dict]] = {}
    for path in files:
        raw = read_json(path)
        if isinstance(raw, dict):  # already converted (FewRel format)
            check_fewrel_structure(raw, path)
            for relation, examples in raw.items():
                data.setdefault(relation, []).extend(examples)
            continue
        if not isinstance(raw, list):
            raise UsageError(f"{path}: expected a list of TACRED records or a FewRel-format object")
        for index, record in enumerate(raw):
            relation, example = tacred_record_to_example(record, f"{path}: record {index}")
            data.setdefault(relation, []).append(example)
    for relation in exclude:
        data.pop(relation, None)
    if not data:
        raise UsageError(f"no relations left in {', '.join(map(str, files))}")
    return data


def split_tacred(
    data: Mapping[str, Sequence[dict]],
    seed: int,
    max_train: int,
    max_test: int,
    *,
    reseed_per_relation: bool = False,
) -> RelationSplits:
    """Per relation (sorted ids, one seeded RNG): test = first min(n // 5, max_test) of a
    shuffle, train = the next max_train at most. A relation with no test sentence is an
    error: it could be learnt but never scored. ``reseed_per_relation``: each relation's
    shuffle from a fresh ``random.seed(seed)``, as CRL's sampler does (lines 114-118; its
    test / train rule, lines 146-152, is the same cut)."""
    rng = random.Random(seed)
    train: dict[str, list[int]] = {}
    test: dict[str, list[int]] = {}
    for relation in sorted(data):
        order = list(range(len(data[relation])))
        if reseed_per_relation:
            rng = random.Random(seed)
        rng.shuffle(order)
        n_test = min(len(order) // 5, max_test)
        if n_test < 1:
            raise UsageError(
                f"relation {relation!r} has {len(order)} sentences: too few for a test set "
                "(needs 5); add it to scenario.exclude_relations"
            )
        test[relation] = order[:n_test]
        train[relation] = order[n_test : n_test + max_train]
    return RelationSplits(train=train, val={r: [] for r in train}, test=test)


def check_tacred_options(options: TACREDOptions) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    if options.max_train < 1 or options.max_test < 1:
        raise UsageError("max_train and max_test must be at least 1")
    if sorted(options.exclude_relations) == sorted(EXCLUDED_RELATIONS):
        # the protocol's 40 relations: an impossible split is known without the data
        options.task_split(TACRED_RELATIONS, "tacred", unit="relations")
    else:
        options.check_split_shape("tacred", unit="relations")


def describe_tacred(options: TACREDOptions) -> str:
    per_relation = f"<= {options.max_train} train / min(n/5, {options.max_test}) test per relation"
    if sorted(options.exclude_relations) != sorted(EXCLUDED_RELATIONS):
        return f"the labels left after excluding {len(options.exclude_relations)}, {per_relation}"
    split = protocol_line(options, TACRED_RELATIONS, "tacred", unit="relations")
    return f"{split}, {per_relation}"


@SCENARIOS.register(
    "tacred",
    "TACRED (user-supplied, LDC license), 40 relations, 10 tasks x 4, <=320 train / "
    "min(n/5, 41) test per relation",
    spec=ScenarioSpec(
        default_backbone="bert-base-uncased",
        modality="text",
        family="relation-extraction",
        data_status=tacred_data_status,
        download=check_tacred_present,
        check_options=check_tacred_options,
        describe=describe_tacred,
    ),
)
def tacred(options: TACREDOptions, encoder: Any, seed: int) -> Scenario:
    check_tacred_options(options)
    require_text_encoder(encoder, "tacred")
    files = find_tacred_files(options.data_file, default_data_root() / "tacred")
    data = load_tacred(files, options.exclude_relations)
    tasks = options.task_split(len(data), "tacred", unit="relations")
    announce("tacred", tasks)
    crl = options.split == "crl"
    splits = split_tacred(data, seed, options.max_train, options.max_test, reseed_per_relation=crl)
    digest = hashlib.sha256()
    digest.update(f"tacred-conversion-{CONVERSION_VERSION}".encode())
    for path in files:
        digest.update(bytes.fromhex(file_digest(path)))
    digest.update(json.dumps(sorted(options.exclude_relations)).encode())
    if crl and not set(data) <= set(CRL_TACRED_ID2REL):
        unknown = ", ".join(sorted(set(data) - set(CRL_TACRED_ID2REL)))
        raise UsageError(
            f"split=crl orders the relations by CRL's id2rel_tacred.json, which lacks {unknown}"
        )
    protocol = protocol_arguments(
        data,
        encoder,
        seed,
        template=options.template,
        split=options.split,
        source_digest=digest.hexdigest(),
        relation_order=[r for r in CRL_TACRED_ID2REL if r in data],
        crl_splits=lambda: splits,
    )
    details = {
        "data_files": [str(p) for p in files],
        "excluded_relations": list(options.exclude_relations),
        "max_train": options.max_train,
        "max_test": options.max_test,
        **protocol.pop("details"),
    }
    protocol.setdefault("splits", splits)
    return build_relation_scenario(
        "tacred",
        encoder=encoder,
        seed=seed,
        tasks=tasks,
        max_length=options.max_length,
        n_train=max(len(v) for v in splits.train.values()),
        n_val=0,
        n_test=max(len(v) for v in splits.test.values()),
        relation_names={r: r for r in data},
        details=details,
        **protocol,
    )

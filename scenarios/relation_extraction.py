"""The FewRel scenarios, in the FewRel JSON format (:mod:`clbench.data.relations`).

``fewrel-offline`` is the 16-relation val_wiki file that ships in ``../shared/data``;
``fewrel`` is the full 80-relation protocol of RP-CRE / CRL (train_wiki + val_wiki,
downloaded from the FewRel repository and md5-checked).

Two options of every relation scenario (TACRED's too) reproduce the authors' codes; both
are recorded only when set and marked as quirks:

* ``template=authors``: the WAVE-CRE code's input text, ``[CLS] head [MASK] tail [SEP]
  marked sentence [SEP] [SEP]`` (:func:`apply_template`; its own token cache);
* ``split=crl``: the CRL / RP-CRE split and task order as their sampler derives them
  from the seed (:func:`crl_shuffle`, :func:`crl_class_order`): ``random.seed(seed)``
  before each relation's shuffle, and the tasks cut from the argsort of one seeded
  shuffle over ``id2rel.json``'s order. ``--seed 2021`` on fewrel then gives their task 1
  (P156, P177, P241, P264, P276, P39, P410, P84).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clbench.config import option
from clbench.data.download import (
    ProgressCallback,
    Resource,
    download,
    file_digest,
    is_verified,
)
from clbench.data.fewrel_files import (  # torch-free: `clbench list` probes with them
    FEWREL_FULL_FILES,
    fewrel_candidates,
    fewrel_data_status,
    fewrel_offline_data_status,
)
from clbench.data.files import find_data_file
from clbench.data.relations import (
    FEWREL_HOW_TO_GET,
    MAX_LENGTH_HELP,
    RelationOptions,
    RelationSplits,
    build_relation_scenario,
    check_relation_sizes,
    load_fewrel_json,
    load_relation_names,
    merge_relation_files,
    require_text_encoder,
)
from clbench.data.splits import OMIT_AT_DEFAULT, added_option, announce, protocol_line
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import Scenario, ScenarioSpec, default_data_root

log = logging.getLogger(__name__)

FEWREL_BASE_URL = "https://raw.githubusercontent.com/thunlp/FewRel/master/data"
# md5s published for these files by dataset loaders (datamaestro, among others); those of
# val_wiki.json and pid2name.json match the copies in ../shared/data/fewrel.
FEWREL_MD5 = {
    "train_wiki.json": "5e663e9c3f1bfbdb2de72696e9504fd7",
    "val_wiki.json": "3f25573428c0332cb64b367a275ab0c7",
    "pid2name.json": "0fe4c5a197c83668d1c7ef255cba5474",
}
FEWREL_RELATIONS = 80
VAL_WIKI_RELATIONS = 16
# RP-CRE / CRL report the mean over these five seeds; pass them as `clbench run --seed`.
PAPER_SEEDS = (2021, 2121, 2221, 2321, 2421)
PROTOCOL_PER_RELATION = (420, 140, 140)  # train / validation / test


# CRL's datasets/id2rel.json (thuiar/CRL 7316cba; RP-CRE and the WAVE-CRE code read the
# same file): the relation order their task assignment indexes. val_wiki's 16 relations
# are its last 16, in val_wiki's own key order.
CRL_FEWREL_ID2REL = (
    "P931 P4552 P140 P1923 P150 P6 P27 P449 P1435 P175 P1344 P39 P527 P740 P706 P84 P495 "
    "P123 P57 P22 P178 P241 P403 P1411 P135 P991 P156 P176 P31 P1877 P102 P1408 P159 P3373 "
    "P1303 P17 P106 P551 P937 P355 P710 P137 P674 P466 P136 P306 P127 P400 P974 P1346 P460 "
    "P86 P118 P264 P750 P58 P3450 P105 P276 P101 P407 P1001 P800 P131 P177 P364 P2094 P361 "
    "P641 P59 P413 P206 P412 P155 P26 P410 P25 P463 P40 P921"
).split()

# -------------------------------------------------- the authors' template and split

RelationTemplate = Literal["marked", "authors"]
SplitRule = Literal["clbench", "crl"]
DEFAULT_TEMPLATE: RelationTemplate = "marked"
DEFAULT_SPLIT: SplitRule = "clbench"


def _quirk_option(default: str, help: str, quirk: str) -> Any:
    """:func:`added_option` (recorded only when set) that reproduces an authors' quirk."""
    metadata = {"help": help, "symbol": None, "quirk": quirk, OMIT_AT_DEFAULT: True}
    return dataclasses.field(default=default, metadata=metadata)


def template_option() -> Any:
    return _quirk_option(
        DEFAULT_TEMPLATE,
        "encoder input: marked = [CLS] marked sentence [SEP] (RP-CRE / CRL); authors = "
        "[CLS] head [MASK] tail [SEP] marked sentence [SEP] [SEP] (the WAVE-CRE code; a "
        "long sentence is windowed around its entities, so the prefix may be cut)",
        quirk="hide-prompt-cre e5de6bb dataloaders/sampler.py lines 129-136: head tokens + "
        "[MASK] + tail tokens + [SEP] + marked sentence + [SEP], then encode() adds "
        "[CLS] and [SEP]",
    )


def split_option() -> Any:
    return _quirk_option(
        DEFAULT_SPLIT,
        "per-relation split and task order: clbench = one seeded RNG over the sorted "
        "relation ids, tasks from a seeded shuffle of the sorted ids; crl = CRL / RP-CRE's "
        "sampler: random.seed(seed) before each relation's shuffle, tasks from the argsort "
        "of a seeded shuffle over id2rel.json's relation order",
        quirk="CRL dataloaders/sampler.py lines 36-40 (task order) and 114-118 (re-seeded "
        "shuffles); RP-CRE sampler.py 80-84; hide-prompt-cre sampler.py 39-43, 120-122",
    )


def apply_template(
    data: Mapping[str, Sequence[dict]], template: RelationTemplate, encoder: Any
) -> Mapping[str, Sequence[dict]]:
    """The examples as ``template`` feeds them to the encoder (``marked``: unchanged).

    ``authors``: the words ``head [MASK] tail [SEP]`` before the sentence and ``[SEP]``
    after it, with the entity spans moved past the prefix, so the markers still wrap the
    entities of the sentence; the encoder's own [CLS] / [SEP] complete the authors'
    ``encode(text)`` (their text ends in [SEP], so it ends in two). The head and tail
    words are those of the marked (first) mention, from its first to its last word.
    """
    if template == "marked":
        return data
    if template != "authors":
        raise UsageError(f"unknown template {template!r}; valid choices: marked, authors")
    tokenizer = encoder.tokenizer
    mask, sep = tokenizer.mask_token, tokenizer.sep_token
    if mask is None or sep is None:
        raise UsageError("template=authors needs a tokenizer with mask and separator tokens")

    def authors_text(example: dict) -> dict:
        tokens = example["tokens"]

        def words(entity: list) -> list[str]:
            span = entity[2][0]
            return tokens[min(span) : max(span) + 1]

        prefix = [*words(example["h"]), mask, *words(example["t"]), sep]

        def moved(entity: list) -> list:
            spans = [[index + len(prefix) for index in span] for span in entity[2]]
            return [entity[0], entity[1], spans]

        return {
            **example,
            "tokens": [*prefix, *tokens, sep],
            "h": moved(example["h"]),
            "t": moved(example["t"]),
        }

    return {relation: [authors_text(e) for e in examples] for relation, examples in data.items()}


def template_digest(source_digest: str, template: RelationTemplate) -> str:
    """The token cache's data key: another template is another encoding of the file (the
    default keeps the key every existing cache has)."""
    if template == DEFAULT_TEMPLATE:
        return source_digest
    return hashlib.sha256(f"{source_digest}\ntemplate={template}".encode()).hexdigest()


def crl_shuffle(size: int, seed: int) -> list[int]:
    """The order CRL's sampler puts a relation's ``size`` examples in: ``random.seed(seed)``
    then ``random.shuffle``, afresh for each relation, so relations of one size share it."""
    order = list(range(size))
    random.Random(seed).shuffle(order)  # the same Mersenne Twister state as random.seed
    return order


def crl_class_order(relations: Sequence[str], id2rel: Sequence[str], seed: int) -> list[int]:
    """Class ids (indices into the sorted ``relations``) in the order CRL's sampler visits
    them: ``random.seed(seed)``, shuffle ``range(len(id2rel))``, ``np.argsort`` of it, and
    task t takes ``id2rel[argsort[t*k : (t+1)*k]]``."""
    if sorted(id2rel) != sorted(relations):
        raise ValueError("id2rel must list each relation once")
    shuffled = crl_shuffle(len(id2rel), seed)
    visit = sorted(range(len(id2rel)), key=shuffled.__getitem__)  # argsort: no ties
    class_id = {relation: index for index, relation in enumerate(sorted(relations))}
    return [class_id[id2rel[index]] for index in visit]


def crl_relation_order(data: Mapping[str, Sequence[dict]], id2rel: Sequence[str]) -> list[str]:
    """The relations of ``data`` in ``id2rel``'s order, when it lists them all; else in the
    data file's own key order (a file CRL's id2rel.json does not describe)."""
    if set(data) <= set(id2rel):
        return [relation for relation in id2rel if relation in data]
    return list(data)


def crl_split_relation_examples(
    data: Mapping[str, Sequence[dict]], seed: int, n_train: int, n_val: int, n_test: int
) -> RelationSplits:
    """CRL's FewRel split: per relation :func:`crl_shuffle`, then the first n_train
    examples train, the next n_val validation, the next n_test test (CRL keeps the rest
    of its 700 as test: the same with 420/140/140)."""
    needed = n_train + n_val + n_test
    splits: dict[str, dict[str, list[int]]] = {"train": {}, "val": {}, "test": {}}
    for relation in sorted(data):
        if len(data[relation]) < needed:
            raise UsageError(
                f"relation {relation!r} has {len(data[relation])} examples, fewer than "
                f"n_train + n_val + n_test = {needed}"
            )
        order = crl_shuffle(len(data[relation]), seed)
        splits["train"][relation] = order[:n_train]
        splits["val"][relation] = order[n_train : n_train + n_val]
        splits["test"][relation] = order[n_train + n_val : needed]
    return RelationSplits(**splits)


def protocol_arguments(
    data: Mapping[str, Sequence[dict]],
    encoder: Any,
    seed: int,
    *,
    template: RelationTemplate,
    split: SplitRule,
    source_digest: str,
    relation_order: Sequence[str],
    crl_splits: Callable[[], RelationSplits],
) -> dict[str, Any]:
    """The arguments of ``build_relation_scenario`` that ``template`` and ``split`` set:
    the (templated) data and its cache key, and with ``split=crl`` CRL's splits
    (``crl_splits()``) and class order over ``relation_order``; ``details`` records both
    when they are not the defaults."""
    if split not in ("clbench", "crl"):
        raise UsageError(f"unknown split {split!r}; valid choices: clbench, crl")
    arguments: dict[str, Any] = {
        "data": apply_template(data, template, encoder),
        "source_digest": template_digest(source_digest, template),
    }
    details: dict[str, Any] = {}
    if template != DEFAULT_TEMPLATE:
        details["template"] = template
    if split == "crl":
        arguments["splits"] = crl_splits()
        arguments["class_order"] = crl_class_order(sorted(data), relation_order, seed)
        details["split"] = split
        details["relation_order"] = list(relation_order)
    arguments["details"] = details
    return arguments


def default_fewrel_candidates(filename: str = "val_wiki.json") -> list[Path]:
    """:func:`fewrel_candidates` under the default data root."""
    return fewrel_candidates(filename, default_data_root())


# ---------------------------------------------------------------------- fewrel-offline


@dataclass
class FewRelOfflineOptions(RelationOptions):
    data_file: str | None = option(
        None,
        "FewRel-format JSON (default: <data_root>/fewrel/val_wiki.json, then "
        "../shared/data/fewrel/val_wiki.json beside the repository)",
    )
    num_experiences: int = option(4, "number of tasks (the relations split equally)")
    max_length: int = option(128, MAX_LENGTH_HELP)
    n_train: int = option(420, "training sentences per relation")
    n_val: int = option(140, "validation sentences per relation (kept aside)")
    n_test: int = option(140, "test sentences per relation")
    template: RelationTemplate = template_option()
    split: SplitRule = split_option()


def fetch_fewrel_offline(
    options: FewRelOfflineOptions,
    data_root: Path,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """val_wiki.json (and pid2name.json) into ``<data_root>/fewrel`` unless found already."""
    status = fewrel_offline_data_status(options, data_root)
    if status.present:
        return status.location
    folder = Path(data_root) / "fewrel"
    download(fewrel_resource("pid2name.json"), folder, log=log, progress=progress)
    return download(fewrel_resource("val_wiki.json"), folder, log=log, progress=progress)


def check_fewrel_offline_options(options: FewRelOfflineOptions) -> None:
    """The checks that need no data (val_wiki's 16 relations are known)."""
    if options.data_file is None:
        options.task_split(VAL_WIKI_RELATIONS, "fewrel-offline", unit="relations")
    else:
        options.check_split_shape("fewrel-offline", unit="relations")
    check_max_length(options.max_length)


def describe_fewrel_offline(options: FewRelOfflineOptions) -> str:
    per_relation = f"{options.n_train}/{options.n_val}/{options.n_test} per relation"
    if options.data_file is not None:
        return f"the relations of {Path(options.data_file).name}, {per_relation}"
    split = protocol_line(options, VAL_WIKI_RELATIONS, "fewrel-offline", unit="relations")
    return f"val_wiki: {split}, {per_relation}"


@SCENARIOS.register(
    "fewrel-offline",
    "FewRel val_wiki (16 relations, MIT), 4 tasks x 4 relations, 420/140/140 per relation; offline",
    spec=ScenarioSpec(
        default_backbone="minilm-l6",
        modality="text",
        family="relation-extraction",
        protocol="fewrel",
        data_status=fewrel_offline_data_status,
        download=fetch_fewrel_offline,
        check_options=check_fewrel_offline_options,
        describe=describe_fewrel_offline,
    ),
)
def fewrel_offline(options: FewRelOfflineOptions, encoder: Any, seed: int) -> Scenario:
    # Check the options and the backbone before reading 3.5 MB of JSON for nothing.
    check_fewrel_offline_options(options)
    require_text_encoder(encoder, "fewrel-offline")
    data_file = find_data_file(
        options.data_file, default_fewrel_candidates(), "FewRel data file", FEWREL_HOW_TO_GET
    )
    data = load_fewrel_json(data_file)
    tasks = options.task_split(len(data), "fewrel-offline", unit="relations")
    announce("fewrel-offline", tasks)
    names_file = data_file.parent / "pid2name.json"
    relation_names = load_relation_names(names_file) if names_file.is_file() else None
    protocol = protocol_arguments(
        data,
        encoder,
        seed,
        template=options.template,
        split=options.split,
        source_digest=file_digest(data_file),
        relation_order=crl_relation_order(data, CRL_FEWREL_ID2REL),
        crl_splits=lambda: crl_split_relation_examples(
            data, seed, options.n_train, options.n_val, options.n_test
        ),
    )
    details = {
        "data_file": str(data_file),
        "relation_names_file": str(names_file) if relation_names is not None else None,
        **protocol.pop("details"),
    }
    return build_relation_scenario(
        "fewrel-offline",
        encoder=encoder,
        seed=seed,
        tasks=tasks,
        max_length=options.max_length,
        n_train=options.n_train,
        n_val=options.n_val,
        n_test=options.n_test,
        relation_names=relation_names,
        details=details,
        **protocol,
    )


# ------------------------------------------------------------------------ full FewRel


def fewrel_resource(filename: str, base_url: str = FEWREL_BASE_URL) -> Resource:
    return Resource(filename, f"{base_url.rstrip('/')}/{filename}", md5=FEWREL_MD5[filename])


def locate_fewrel_file(
    filename: str,
    data_root: Path,
    *,
    base_url: str = FEWREL_BASE_URL,
    download_missing: bool,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """A verified copy of one published FewRel file, downloaded when missing and allowed."""
    resource = fewrel_resource(filename, base_url)
    candidates = fewrel_candidates(filename, data_root)
    for path in candidates:
        if path.is_file():
            if not is_verified(path, resource):
                raise DataNotFoundError(
                    f"{path} is not the published FewRel {filename} (its md5 is not "
                    f"{resource.md5}); delete it and run `clbench download fewrel`, or use it "
                    "as it is with --set scenario.data_file=PATH"
                )
            return path
    if not download_missing:
        raise DataNotFoundError(
            f"FewRel file {filename} not found (looked in: "
            f"{', '.join(str(p) for p in candidates)}); run `clbench download fewrel` (MIT "
            f"license; it fetches {resource.url}), or put the file in "
            f"{candidates[0].parent}, or pass --set scenario.data_file=PATH"
        )
    return download(resource, candidates[0].parent, log=log, progress=progress)


@dataclass
class FewRelOptions(RelationOptions):
    data_file: str | None = option(
        None,
        "a FewRel-format JSON to use instead of train_wiki + val_wiki (e.g. a FewRel 2.0 "
        "domain set); tasks and per-relation counts are then sized to fit",
    )
    num_experiences: int | None = option(
        None,
        "number of equal tasks; default: the most tasks <= 10 that divide the relations with "
        ">= 2 each (80 -> 10 x 8), else the most with >= 2 each, as equal as they can be",
    )
    exclude_relations: list[str] = added_option([], "relation ids left out (comma-separated)")
    min_per_relation: int = added_option(
        10, "fewer sentences in a relation is an error (it needs train, validation and test)"
    )
    n_train: int | None = option(
        None, "training sentences per relation (default 420, or 60% of the smallest relation)"
    )
    n_val: int | None = option(
        None, "validation sentences per relation, kept aside (default 140, or 20%)"
    )
    n_test: int | None = option(None, "test sentences per relation (default 140, or 20%)")
    download: bool = option(True, "download missing FewRel files into the data root")
    base_url: str = option(FEWREL_BASE_URL, "where train_wiki.json etc. are downloaded from")
    template: RelationTemplate = template_option()
    split: SplitRule = split_option()


def fit_per_relation(
    data: Mapping[str, Sequence[dict]], n_train: int | None, n_val: int | None, n_test: int | None
) -> tuple[int, int, int]:
    """Given counts, else 420 / 140 / 140 when every relation has 700, else 60/20/20 %."""
    smallest = min(len(examples) for examples in data.values())
    if smallest >= sum(PROTOCOL_PER_RELATION):
        auto = PROTOCOL_PER_RELATION
    else:  # e.g. FewRel 2.0's val_pubmed: 100 per relation -> 60 / 20 / 20
        held_out = max(1, smallest // 5)  # one of each from 3 sentences on
        auto = (smallest - 2 * held_out, held_out, held_out)
    given = (n_train, n_val, n_test)
    return tuple(a if g is None else g for g, a in zip(given, auto))  # type: ignore[return-value]


def fetch_fewrel(
    options: FewRelOptions,
    data_root: Path,
    log: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """train_wiki.json, val_wiki.json and pid2name.json, each verified; returns the folder."""
    for filename in (*FEWREL_FULL_FILES, "pid2name.json"):
        locate_fewrel_file(
            filename,
            data_root,
            base_url=options.base_url,
            download_missing=True,
            log=log,
            progress=progress,
        )
    return Path(data_root) / "fewrel"


def _relation_names_for(data_files: Sequence[Path], options: FewRelOptions) -> Path | None:
    """pid2name.json beside the data, else the verified (or downloaded) published one."""
    beside = data_files[0].parent / "pid2name.json"
    if beside.is_file():
        return beside
    try:
        return locate_fewrel_file(
            "pid2name.json",
            default_data_root(),
            base_url=options.base_url,
            download_missing=options.download,
        )
    except DataNotFoundError as error:  # names only: relations keep their ids
        warnings.warn(f"relation names unavailable ({error}); using relation ids", stacklevel=3)
        return None


def check_max_length(max_length: int) -> None:
    if max_length < 8:
        raise UsageError(f"max_length must be at least 8 (got {max_length})")


def check_fewrel_options(options: FewRelOptions) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    if options.data_file is None and not options.exclude_relations:  # 80 relations known
        options.task_split(FEWREL_RELATIONS, "fewrel", unit="relations", automatic=True)
    else:
        options.check_split_shape("fewrel", unit="relations")
    check_max_length(options.max_length)
    if options.min_per_relation < 3:
        raise UsageError(
            "min_per_relation must be at least 3 (a train, a validation and a test sentence; "
            f"got {options.min_per_relation})"
        )


def describe_fewrel(options: FewRelOptions) -> str:
    if options.data_file is not None:
        return (
            f"the relations of {Path(options.data_file).name} (>= {options.min_per_relation} "
            "sentences each); tasks and per-relation counts sized to fit"
        )
    split = protocol_line(options, FEWREL_RELATIONS, "fewrel", unit="relations")
    return f"train_wiki + val_wiki: {split}, 420/140/140 per relation"


@SCENARIOS.register(
    "fewrel",
    "FewRel train_wiki + val_wiki (80 relations, MIT), RP-CRE/CRL protocol: 10 tasks x 8 "
    "relations, 420/140/140 per relation; paper seeds 2021 2121 2221 2321 2421 (--seed)",
    spec=ScenarioSpec(
        default_backbone="bert-base-uncased",
        modality="text",
        family="relation-extraction",
        data_status=fewrel_data_status,
        download=fetch_fewrel,
        check_options=check_fewrel_options,
        describe=describe_fewrel,
    ),
)
def fewrel(options: FewRelOptions, encoder: Any, seed: int) -> Scenario:
    check_fewrel_options(options)
    require_text_encoder(encoder, "fewrel")
    if options.data_file is not None:
        data_files = [
            find_data_file(options.data_file, [], "FewRel-format data file", FEWREL_HOW_TO_GET)
        ]
    else:
        data_files = [
            locate_fewrel_file(
                name,
                default_data_root(),
                base_url=options.base_url,
                download_missing=options.download,
            )
            for name in FEWREL_FULL_FILES
        ]
    data = merge_relation_files(data_files)
    data = {r: examples for r, examples in data.items() if r not in options.exclude_relations}
    source = ", ".join(path.name for path in data_files)
    if not data:
        raise UsageError(f"scenario fewrel: no relations left in {source}")
    check_relation_sizes(data, options.min_per_relation, "fewrel", source)
    tasks = options.task_split(len(data), "fewrel", unit="relations", automatic=True)
    announce("fewrel", tasks)
    n_train, n_val, n_test = fit_per_relation(data, options.n_train, options.n_val, options.n_test)
    log.info(
        f"fewrel: {len(data)} relations of {source}, the smallest with "
        f"{min(len(v) for v in data.values())} sentences: {n_train} train / {n_val} "
        f"validation / {n_test} test sentences per relation"
    )
    names_file = _relation_names_for(data_files, options)
    digests = [file_digest(path) for path in data_files]
    if options.exclude_relations:  # other examples: another token cache
        digests.append("excluded:" + ",".join(sorted(options.exclude_relations)))
    source_digest = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    protocol = protocol_arguments(
        data,
        encoder,
        seed,
        template=options.template,
        split=options.split,
        source_digest=source_digest,
        relation_order=crl_relation_order(data, CRL_FEWREL_ID2REL),
        crl_splits=lambda: crl_split_relation_examples(data, seed, n_train, n_val, n_test),
    )
    details = {
        "data_files": [str(path) for path in data_files],
        "relation_names_file": str(names_file) if names_file is not None else None,
        "paper_seeds": list(PAPER_SEEDS),
        **({"excluded_relations": options.exclude_relations} if options.exclude_relations else {}),
        **protocol.pop("details"),
    }
    return build_relation_scenario(
        "fewrel",
        encoder=encoder,
        seed=seed,
        tasks=tasks,
        max_length=options.max_length,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        relation_names=load_relation_names(names_file) if names_file is not None else None,
        details=details,
        **protocol,
    )

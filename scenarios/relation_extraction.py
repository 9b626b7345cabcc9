"""Relation extraction in the FewRel JSON format: the FewRel scenarios and shared pieces.

The shared pieces (loading, the RP-CRE / CRL per-relation split, entity-marked encoding
with an on-disk cache, the scenario builder) serve every FewRel-format scenario (TACRED's
in ``tacred.py`` too). ``fewrel-offline`` is the 16-relation val_wiki file that ships in
``../shared/data``; ``fewrel`` is the full 80-relation protocol of RP-CRE / CRL
(train_wiki + val_wiki, downloaded from the FewRel repository and md5-checked).

FewRel JSON: ``{relation_id: [{"tokens": [...], "h": [name, wikidata_id, [[idx, ...]]],
"t": [...]}, ...]}``; an entity may have several mentions, we mark the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clbench.config import Options, option
from clbench.download import DataStatus, Resource, download, is_verified
from clbench.errors import DataNotFoundError, UsageError
from clbench.registry import SCENARIOS
from clbench.scenario import (
    Scenario,
    TensorClassificationDataset,
    class_incremental,
    default_data_root,
    seeded_class_order,
)

# Bump when the encoding changes (markers, truncation, special tokens): old caches then
# stop matching instead of being read as if they were current.
ENCODING_VERSION = 1

# The repository root: scenarios/ sits directly inside it.
REPO_ROOT = Path(__file__).resolve().parents[1]

FEWREL_HOW_TO_GET = (
    "FewRel is MIT-licensed: download data/val_wiki.json (and data/pid2name.json for the "
    "relation names) from https://github.com/thunlp/FewRel and put it in one of those "
    "places, or pass --set scenario.data_file=PATH"
)

MARKERS = ("[E11]", "[E12]", "[E21]", "[E22]")


# ---------------------------------------------------------------------------- loading


def load_fewrel_json(path: Path) -> dict[str, list[dict]]:
    """Read and check a FewRel-format file; a missing file is a DataNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"FewRel data file {path} not found (looked in: {path}); {FEWREL_HOW_TO_GET}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from error
    _check_fewrel_structure(data, path)
    return data


def _check_fewrel_structure(data: Any, path: Path) -> None:
    """Fail on the first malformed example, naming it, rather than deep inside encoding."""
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
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from error
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


def find_data_file(explicit: str | None, candidates: Sequence[Path], what: str, how: str) -> Path:
    """``explicit`` if given (it must exist), else the first existing candidate."""
    searched = [Path(explicit).expanduser()] if explicit is not None else list(candidates)
    for path in searched:
        if path.is_file():
            return path
    raise DataNotFoundError(
        f"{what} not found (looked in: {', '.join(str(p) for p in searched)}); {how}"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    One ``random.Random(seed)`` walks the relations in sorted id order (as RP-CRE's
    ``random.seed`` + sequential shuffles do), so the split depends on the file's
    content, never on its key order. Examples beyond the three counts are left out.
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


# --------------------------------------------------------------------------- encoding


def encode_relation_examples(
    examples: Sequence[dict],
    encoder: Any,
    max_length: int = 128,
    *,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Token ids [N, max_length]: ``[CLS] ... [E11] head [E12] ... [E21] tail [E22] ... [SEP]``.

    Markers are the ids in ``encoder.marker_ids`` (BERT's ``[unused0..3]``). A sequence
    longer than ``max_length`` keeps a window centred on the two marked entities; when
    even the stretch from the first to the last marker does not fit, the tokens farthest
    from both entities (usually the middle between them) are dropped. Every row thus holds
    each marker exactly once. ``stats`` (if given) receives the counts of rows windowed
    (``truncated_window``) and rows with tokens cut from between the entities
    (``truncated_cut``).
    """
    if max_length < 8:
        raise UsageError(f"max_length must be at least 8 (got {max_length})")
    tokenizer = encoder.tokenizer
    marker_ids = [encoder.marker_ids[m] for m in MARKERS]
    # One batched call: the fast tokenizer parallelises it in Rust.
    batch = tokenizer(
        [list(e["tokens"]) for e in examples], is_split_into_words=True, add_special_tokens=False
    )
    out = torch.full((len(examples), max_length), encoder.pad_token_id, dtype=torch.long)
    budget = max_length - 2  # room left beside [CLS] and [SEP]
    counts = {"truncated_window": 0, "truncated_cut": 0}
    for row, example in enumerate(examples):
        word_ids = batch.word_ids(row)
        if any(w is None for w in word_ids):  # only special tokens map to None
            raise RuntimeError(
                "the tokenizer added special tokens despite add_special_tokens=False"
            )
        content, marker_positions = _insert_markers(
            np.asarray(batch["input_ids"][row], dtype=np.int64),
            np.asarray(word_ids, dtype=np.int64),
            example["h"][2][0],
            example["t"][2][0],
            marker_ids,
        )
        if len(content) > budget:
            content, kind = _truncate_around_entities(content, marker_positions, budget)
            counts[kind] += 1
        out[row, 0] = tokenizer.cls_token_id
        out[row, 1 : len(content) + 1] = torch.from_numpy(content)
        out[row, len(content) + 1] = tokenizer.sep_token_id
    if stats is not None:
        stats.update(counts)
    return out


def _insert_markers(
    ids: np.ndarray,
    word_ids: np.ndarray,
    head_span: Sequence[int],
    tail_span: Sequence[int],
    marker_ids: Sequence[int],
) -> tuple[np.ndarray, dict[str, int]]:
    """Insert the four markers around the sub-word spans of the two entities.

    Returns the new ids and where each marker landed. A span covers the words from its
    smallest to its largest index; ``searchsorted`` on the (non-decreasing) word ids
    finds the sub-word boundaries, and stays correct for words with no sub-words.
    """
    e11, e12, e21, e22 = marker_ids
    h_open = int(np.searchsorted(word_ids, min(head_span), "left"))
    h_close = int(np.searchsorted(word_ids, max(head_span), "right"))
    t_open = int(np.searchsorted(word_ids, min(tail_span), "left"))
    t_close = int(np.searchsorted(word_ids, max(tail_span), "right"))
    # At one insertion point: closers before openers (adjacent spans); among openers the
    # span ending later goes first and among closers the span starting later goes first,
    # so nested or identical spans stay properly nested.
    insertions = sorted(
        [
            (h_open, 1, -h_close, 0, e11, "[E11]"),
            (t_open, 1, -t_close, 1, e21, "[E21]"),
            (h_close, 0, -h_open, 1, e12, "[E12]"),
            (t_close, 0, -t_open, 0, e22, "[E22]"),
        ]
    )
    points = [item[0] for item in insertions]
    content = np.insert(ids, points, [item[4] for item in insertions])
    # np.insert puts the k-th (sorted) value at original index + k
    positions = {item[5]: point + k for k, (item, point) in enumerate(zip(insertions, points))}
    return content, positions


def _truncate_around_entities(
    content: np.ndarray, marker_positions: dict[str, int], budget: int
) -> tuple[np.ndarray, str]:
    first, last = min(marker_positions.values()), max(marker_positions.values())
    if last - first + 1 <= budget:
        extra = budget - (last - first + 1)
        start = min(max(first - extra // 2, 0), len(content) - budget)
        return content[start : start + budget], "truncated_window"
    # The entities are too far apart for one window: keep the markers, then entity
    # tokens nearest their opening marker, then context nearest either entity.
    positions = np.arange(len(content))
    priority = np.full(len(content), np.inf)
    for opener, closer in (("[E11]", "[E12]"), ("[E21]", "[E22]")):
        start, stop = marker_positions[opener], marker_positions[closer]
        inside = (positions > start) & (positions < stop)
        priority[inside] = np.minimum(priority[inside], positions[inside] - start)
    markers = np.array(sorted(marker_positions.values()))
    distance = np.abs(positions[:, None] - markers[None, :]).min(axis=1)
    outside = np.isinf(priority)
    priority[outside] = len(content) + distance[outside]
    priority[markers] = -1
    keep = np.sort(np.argsort(priority, kind="stable")[:budget])
    return content[keep], "truncated_cut"


@dataclass(frozen=True)
class EncodedExamples:
    inputs: Tensor  # [N, max_length] token ids
    stats: dict[str, int]
    cache_file: Path
    from_cache: bool


def encode_relation_examples_cached(
    examples: Sequence[dict],
    encoder: Any,
    max_length: int,
    source_digest: str,
    cache_dir: Path | None = None,
) -> EncodedExamples:
    """:func:`encode_relation_examples`, stored in ``<data_root>/cache`` and reused.

    ``source_digest`` must identify the examples (e.g. the data file's sha256: we always
    encode a whole file in a fixed order); the key adds the tokenizer and the encoding
    version, so a different tokenizer or max_length never reads a stale cache.
    """
    tokenizer = encoder.tokenizer
    key_text = "\n".join(
        [
            source_digest,
            str(tokenizer.name_or_path),
            str(len(tokenizer)),
            str(max_length),
            str(ENCODING_VERSION),
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_data_root() / "cache"
    cache_file = cache_dir / f"relation-tokens-{key}.pt"
    if cache_file.is_file():
        cached = _read_cache(cache_file, len(examples), max_length)
        if cached is not None:
            return EncodedExamples(cached["inputs"], cached["stats"], cache_file, True)
    stats: dict[str, int] = {}
    inputs = encode_relation_examples(examples, encoder, max_length, stats=stats)
    _write_atomically(cache_file, {"inputs": inputs, "stats": stats})
    return EncodedExamples(inputs, stats, cache_file, False)


def _read_cache(path: Path, num_examples: int, max_length: int) -> dict[str, Any] | None:
    """The cached payload, or None (with a warning) when the file is unreadable or foreign."""
    try:
        payload = torch.load(path, weights_only=True)
        inputs = payload["inputs"]
        if tuple(inputs.shape) == (num_examples, max_length) and inputs.dtype == torch.long:
            return {"inputs": inputs, "stats": dict(payload["stats"])}
        problem = f"holds shape {tuple(inputs.shape)}, expected {(num_examples, max_length)}"
    except Exception as error:  # a damaged cache must not stop a run: it is rebuilt
        problem = f"cannot be read ({type(error).__name__}: {error})"
    warnings.warn(f"token cache {path} {problem}; re-encoding", stacklevel=3)
    return None


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    num_experiences: int,
    max_length: int,
    n_train: int,
    n_val: int,
    n_test: int,
    source_digest: str,
    relation_names: Mapping[str, str] | None = None,
    details: Mapping[str, Any] | None = None,
    splits: RelationSplits | None = None,
) -> Scenario:
    """A class-incremental relation-extraction scenario from FewRel-format data.

    Class id = index of the relation in sorted id order; the stream visits relations in
    ``seeded_class_order(num_relations, seed)``. The validation split is kept aside in
    ``details["validation"]``. ``splits`` replaces the RP-CRE / CRL cut for protocols
    that split otherwise (TACRED); ``n_train`` / ``n_val`` / ``n_test`` then only describe
    it (as the largest per-relation counts).
    """
    require_text_encoder(encoder, name)
    relations = sorted(data)
    if splits is None:
        splits = split_relation_examples(data, seed, n_train, n_val, n_test)
    # Encode the whole file in a fixed order (independent of the seed) so one cache
    # serves every seed; the split then only picks rows.
    offsets, examples = {}, []
    for relation in relations:
        offsets[relation] = len(examples)
        examples.extend(data[relation])
    encoded = encode_relation_examples_cached(examples, encoder, max_length, source_digest)

    def dataset(split: dict[str, list[int]]) -> TensorClassificationDataset:
        rows, labels = [], []
        for class_id, relation in enumerate(relations):
            rows.extend(offsets[relation] + i for i in split[relation])
            labels.extend([class_id] * len(split[relation]))
        return TensorClassificationDataset(
            encoded.inputs[torch.tensor(rows, dtype=torch.long)],
            torch.tensor(labels, dtype=torch.long),
        )

    train, val, test = dataset(splits.train), dataset(splits.val), dataset(splits.test)
    class_order = seeded_class_order(len(relations), seed)
    benchmark, classes = class_incremental(train, test, class_order, num_experiences)
    names = relation_names or {}
    return Scenario(
        name=name,
        benchmark=benchmark,
        classes_per_experience=classes,
        class_names=[names.get(r, r) for r in relations],
        modality="text",
        details={
            **(details or {}),
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


@dataclass
class FewRelOfflineOptions(Options):
    data_file: str | None = option(
        None,
        "FewRel-format JSON (default: <data_root>/fewrel/val_wiki.json, then "
        "../shared/data/fewrel/val_wiki.json beside the repository)",
    )
    num_experiences: int = option(4, "number of tasks (the relations split equally)")
    max_length: int = option(128, "tokens per sentence, [CLS]/[SEP]/markers included")
    n_train: int = option(420, "training sentences per relation")
    n_val: int = option(140, "validation sentences per relation (kept aside)")
    n_test: int = option(140, "test sentences per relation")


def default_fewrel_candidates(filename: str = "val_wiki.json") -> list[Path]:
    return [
        default_data_root() / "fewrel" / filename,
        REPO_ROOT.parent / "shared" / "data" / "fewrel" / filename,
    ]


@SCENARIOS.register(
    "fewrel-offline",
    "FewRel val_wiki (16 relations, MIT), 4 tasks x 4 relations, 420/140/140 per relation; offline",
)
def fewrel_offline(options: FewRelOfflineOptions, encoder: Any, seed: int) -> Scenario:
    # Check the backbone before reading 3.5 MB of JSON for nothing.
    require_text_encoder(encoder, "fewrel-offline")
    data_file = find_data_file(
        options.data_file, default_fewrel_candidates(), "FewRel data file", FEWREL_HOW_TO_GET
    )
    data = load_fewrel_json(data_file)
    names_file = data_file.parent / "pid2name.json"
    relation_names = load_relation_names(names_file) if names_file.is_file() else None
    return build_relation_scenario(
        "fewrel-offline",
        data,
        encoder,
        seed,
        num_experiences=options.num_experiences,
        max_length=options.max_length,
        n_train=options.n_train,
        n_val=options.n_val,
        n_test=options.n_test,
        source_digest=file_sha256(data_file),
        relation_names=relation_names,
        details={
            "data_file": str(data_file),
            "relation_names_file": str(names_file) if relation_names is not None else None,
        },
    )


fewrel_offline.default_backbone = "minilm-l6"


def fewrel_offline_data_status(options: FewRelOfflineOptions, data_root: Path) -> DataStatus:
    candidates = (
        [Path(options.data_file).expanduser()]
        if options.data_file
        else [Path(data_root) / "fewrel" / "val_wiki.json", *default_fewrel_candidates()[1:]]
    )
    found = next((path for path in candidates if path.is_file()), candidates[0])
    return DataStatus(found.is_file(), found, FEWREL_HOW_TO_GET)


def fetch_fewrel_offline(
    options: FewRelOfflineOptions, data_root: Path, log: Any = None, progress: Any = None
) -> Path:
    """val_wiki.json (and pid2name.json) into ``<data_root>/fewrel`` unless found already."""
    status = fewrel_offline_data_status(options, data_root)
    if status.present:
        return status.location
    folder = Path(data_root) / "fewrel"
    download(fewrel_resource("pid2name.json"), folder, log=log, progress=progress)
    return download(fewrel_resource("val_wiki.json"), folder, log=log, progress=progress)


fewrel_offline.data_status = fewrel_offline_data_status
fewrel_offline.download = fetch_fewrel_offline


# ------------------------------------------------------------------------ full FewRel

FEWREL_BASE_URL = "https://raw.githubusercontent.com/thunlp/FewRel/master/data"
# md5s published for these files by dataset loaders (datamaestro, among others); those of
# val_wiki.json and pid2name.json match the copies in ../shared/data/fewrel.
FEWREL_MD5 = {
    "train_wiki.json": "5e663e9c3f1bfbdb2de72696e9504fd7",
    "val_wiki.json": "3f25573428c0332cb64b367a275ab0c7",
    "pid2name.json": "0fe4c5a197c83668d1c7ef255cba5474",
}
FEWREL_FULL_FILES = ("train_wiki.json", "val_wiki.json")  # 64 + 16 = 80 relations
FEWREL_RELATIONS = 80
# RP-CRE / CRL report the mean over these five seeds; pass them as `clbench run --seed`.
PAPER_SEEDS = (2021, 2121, 2221, 2321, 2421)
PROTOCOL_PER_RELATION = (420, 140, 140)  # train / validation / test
PROTOCOL_EXPERIENCES = 10
MAX_AUTO_EXPERIENCES = 10


def fewrel_resource(filename: str, base_url: str = FEWREL_BASE_URL) -> Resource:
    return Resource(filename, f"{base_url.rstrip('/')}/{filename}", md5=FEWREL_MD5[filename])


def fewrel_candidates(filename: str, data_root: Path) -> list[Path]:
    """Where a FewRel file is looked for: the data root, then the copy beside the repository."""
    return [
        Path(data_root) / "fewrel" / filename,
        REPO_ROOT.parent / "shared" / "data" / "fewrel" / filename,
    ]


def locate_fewrel_file(
    filename: str,
    data_root: Path,
    *,
    base_url: str = FEWREL_BASE_URL,
    download_missing: bool,
    log: Any = None,
    progress: Any = None,
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
class FewRelOptions(Options):
    data_file: str | None = option(
        None,
        "a FewRel-format JSON to use instead of train_wiki + val_wiki (e.g. a FewRel 2.0 "
        "domain set); tasks and per-relation counts are then sized to fit",
    )
    num_experiences: int | None = option(
        None,
        "number of tasks; default 10 when it divides the relations (80 -> 10 x 8), else the "
        "largest count <= 10 that leaves >= 2 relations per task",
    )
    max_length: int = option(256, "tokens per sentence, [CLS]/[SEP]/markers included")
    n_train: int | None = option(
        None, "training sentences per relation (default 420, or 60% of the smallest relation)"
    )
    n_val: int | None = option(
        None, "validation sentences per relation, kept aside (default 140, or 20%)"
    )
    n_test: int | None = option(None, "test sentences per relation (default 140, or 20%)")
    download: bool = option(True, "download missing FewRel files into the data root")
    base_url: str = option(FEWREL_BASE_URL, "where train_wiki.json etc. are downloaded from")


def fit_task_count(num_relations: int, requested: int | None, scenario: str) -> int:
    """The requested task count if it divides the relations, else the automatic one."""
    if requested is not None:
        if requested < 1 or num_relations % requested:
            raise UsageError(
                f"scenario {scenario}: cannot split {num_relations} relations into {requested} "
                f"equal tasks (num_experiences must divide {num_relations})"
            )
        return requested
    for count in range(MAX_AUTO_EXPERIENCES, 1, -1):
        if num_relations % count == 0 and num_relations // count >= 2:
            return count
    raise UsageError(
        f"scenario {scenario}: {num_relations} relations split into no task count between 2 "
        f"and {MAX_AUTO_EXPERIENCES} with >= 2 relations per task; set "
        "scenario.num_experiences"
    )


def fit_per_relation(
    data: Mapping[str, Sequence[dict]], n_train: int | None, n_val: int | None, n_test: int | None
) -> tuple[int, int, int]:
    """Given counts, else 420 / 140 / 140 when every relation has 700, else 60/20/20 %."""
    smallest = min(len(examples) for examples in data.values())
    if smallest >= sum(PROTOCOL_PER_RELATION):
        auto = PROTOCOL_PER_RELATION
    else:  # e.g. FewRel 2.0's val_pubmed: 100 per relation -> 60 / 20 / 20
        held_out = smallest // 5
        auto = (smallest - 2 * held_out, held_out, held_out)
    given = (n_train, n_val, n_test)
    return tuple(a if g is None else g for g, a in zip(given, auto))  # type: ignore[return-value]


def merge_relation_files(paths: Sequence[Path]) -> dict[str, list[dict]]:
    merged: dict[str, list[dict]] = {}
    for path in paths:
        data = load_fewrel_json(path)
        repeated = sorted(set(data) & set(merged))
        if repeated:
            raise UsageError(f"{path} repeats relations of another file: {', '.join(repeated)}")
        merged.update(data)
    return merged


def fewrel_data_status(options: FewRelOptions, data_root: Path) -> DataStatus:
    if options.data_file:
        path = Path(options.data_file).expanduser()
        return DataStatus(path.is_file(), path, FEWREL_HOW_TO_GET)
    found = [
        next((p for p in fewrel_candidates(name, data_root) if p.is_file()), None)
        for name in FEWREL_FULL_FILES
    ]
    location = Path(data_root) / "fewrel"
    how = "run `clbench download fewrel` (MIT license, from github.com/thunlp/FewRel)"
    return DataStatus(all(found), location, how)


def fetch_fewrel(
    options: FewRelOptions, data_root: Path, log: Any = None, progress: Any = None
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


def check_fewrel_options(options: FewRelOptions) -> None:
    """The checks that need no data: run first, so bad options cost nothing."""
    if options.data_file is None:  # the 80 relations are known
        fit_task_count(FEWREL_RELATIONS, options.num_experiences, "fewrel")
    elif options.num_experiences is not None and options.num_experiences < 1:
        raise UsageError(f"num_experiences must be at least 1 (got {options.num_experiences})")
    if options.max_length < 8:
        raise UsageError(f"max_length must be at least 8 (got {options.max_length})")


@SCENARIOS.register(
    "fewrel",
    "FewRel train_wiki + val_wiki (80 relations, MIT), RP-CRE/CRL protocol: 10 tasks x 8 "
    "relations, 420/140/140 per relation; paper seeds 2021 2121 2221 2321 2421 (--seed)",
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
    num_experiences = fit_task_count(len(data), options.num_experiences, "fewrel")
    n_train, n_val, n_test = fit_per_relation(data, options.n_train, options.n_val, options.n_test)
    names_file = _relation_names_for(data_files, options)
    source_digest = hashlib.sha256(
        "\n".join(file_sha256(path) for path in data_files).encode()
    ).hexdigest()
    return build_relation_scenario(
        "fewrel",
        data,
        encoder,
        seed,
        num_experiences=num_experiences,
        max_length=options.max_length,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        source_digest=source_digest,
        relation_names=load_relation_names(names_file) if names_file is not None else None,
        details={
            "data_files": [str(path) for path in data_files],
            "relation_names_file": str(names_file) if names_file is not None else None,
            "paper_seeds": list(PAPER_SEEDS),
        },
    )


fewrel.default_backbone = "bert-base-uncased"
fewrel.data_status = fewrel_data_status
fewrel.download = fetch_fewrel
fewrel.check_options = check_fewrel_options

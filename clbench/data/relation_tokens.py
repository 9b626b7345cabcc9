"""Entity-marked token ids for FewRel-format examples, and their on-disk cache.

``[CLS] ... [E11] head [E12] ... [E21] tail [E22] ... [SEP]``, with the markers' ids
taken from the encoder (BERT's ``[unused0..3]``), truncated around the two entities. The
encoding of a whole data file is stored in ``<data_root>/cache`` under a key of the file,
the tokenizer, the length and :data:`ENCODING_VERSION`, and reused by every seed.
"""

from __future__ import annotations

import bisect
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clbench.errors import UsageError
from clbench.fileio import atomic_write_with
from clbench.progress import progress
from clbench.scenario import default_data_root

# Bump when the encoding changes (markers, truncation, special tokens): old caches then
# stop matching instead of being read as if they were current.
ENCODING_VERSION = 1

MARKERS = ("[E11]", "[E12]", "[E21]", "[E22]")
# Sentences per tokenizer call: large enough for the Rust batch to pay off, small enough
# that the progress bar moves every second or so on a small CPU.
TOKENIZE_CHUNK = 1024


def encode_relation_examples(
    examples: Sequence[dict],
    encoder: Any,
    max_length: int = 128,
    *,
    stats: dict[str, int] | None = None,
    label: str = "encoding sentences into token ids",
    announce: bool = False,
) -> Tensor:
    """Token ids [N, max_length]: ``[CLS] ... [E11] head [E12] ... [E21] tail [E22] ... [SEP]``.

    Markers are the ids in ``encoder.marker_ids`` (BERT's ``[unused0..3]``). A sequence
    longer than ``max_length`` keeps a window centred on the two marked entities; when
    even the stretch from the first to the last marker does not fit, the tokens farthest
    from both entities (usually the middle between them) are dropped. Every row thus holds
    each marker exactly once. ``stats`` (if given) receives the counts of rows windowed
    (``truncated_window``) and rows with tokens cut from between the entities
    (``truncated_cut``). ``label`` names the phase in the progress bar / lines; with
    ``announce`` its start and end are logged (building a cache), else it stays quiet
    unless it runs long enough for a periodic line.
    """
    if max_length < 8:
        raise UsageError(f"max_length must be at least 8 (got {max_length})")
    out = np.full((len(examples), max_length), encoder.pad_token_id, dtype=np.int64)
    counts = {"truncated_window": 0, "truncated_cut": 0}
    with progress(
        len(examples), label, unit="sentences", start_line=announce, end_line=announce
    ) as bar:
        # Batched calls (the fast tokenizer parallelises each in Rust), in chunks so the
        # bar moves; every sentence is tokenized on its own, so chunking changes nothing.
        for start in range(0, len(examples), TOKENIZE_CHUNK):
            chunk = examples[start : start + TOKENIZE_CHUNK]
            _encode_chunk(chunk, encoder, out[start : start + len(chunk)], counts)
            bar.update(len(chunk))
    if stats is not None:
        stats.update(counts)
    return torch.from_numpy(out)


def _encode_chunk(
    examples: Sequence[dict], encoder: Any, out: np.ndarray, counts: dict[str, int]
) -> None:
    """Encode ``examples`` into the rows of ``out`` (a view of the full result).

    Per row the work is a few list operations on ~50 ids: a numpy or torch call per row
    made this loop cost as much as the tokenizer. Only a row to truncate goes to numpy.
    """
    tokenizer = encoder.tokenizer
    marker_ids = [encoder.marker_ids[m] for m in MARKERS]
    batch = tokenizer(
        [list(e["tokens"]) for e in examples], is_split_into_words=True, add_special_tokens=False
    )
    budget = out.shape[1] - 2  # room left beside [CLS] and [SEP]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row, (example, encoding) in enumerate(zip(examples, batch.encodings)):
        word_ids = encoding.word_ids
        if None in word_ids:  # only special tokens map to None
            raise RuntimeError(
                "the tokenizer added special tokens despite add_special_tokens=False"
            )
        content, marker_positions = _insert_markers(
            encoding.ids, word_ids, example["h"][2][0], example["t"][2][0], marker_ids
        )
        if len(content) > budget:
            truncated, kind = _truncate_around_entities(
                np.asarray(content, dtype=np.int64), marker_positions, budget
            )
            content = truncated.tolist()
            counts[kind] += 1
        out[row, : len(content) + 2] = [cls_id, *content, sep_id]


def _insert_markers(
    ids: list[int],
    word_ids: list[int],
    head_span: Sequence[int],
    tail_span: Sequence[int],
    marker_ids: Sequence[int],
) -> tuple[list[int], dict[str, int]]:
    """Insert the four markers around the sub-word spans of the two entities.

    Returns the new ids and where each marker landed. A span covers the words from its
    smallest to its largest index; a binary search on the (non-decreasing) word ids
    finds the sub-word boundaries, and stays correct for words with no sub-words.
    """
    e11, e12, e21, e22 = marker_ids
    h_open = bisect.bisect_left(word_ids, min(head_span))
    h_close = bisect.bisect_right(word_ids, max(head_span))
    t_open = bisect.bisect_left(word_ids, min(tail_span))
    t_close = bisect.bisect_right(word_ids, max(tail_span))
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
    content: list[int] = []
    positions: dict[str, int] = {}
    previous = 0
    for point, *_, marker_id, marker in insertions:
        content.extend(ids[previous:point])
        positions[marker] = len(content)  # = point + markers inserted before it
        content.append(marker_id)
        previous = point
    content.extend(ids[previous:])
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
    inputs = encode_relation_examples(
        examples,
        encoder,
        max_length,
        stats=stats,
        label=f"building the token cache in {cache_dir}",
        announce=True,
    )
    payload = {"inputs": inputs, "stats": stats}
    atomic_write_with(cache_file, lambda temporary: torch.save(payload, temporary))
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

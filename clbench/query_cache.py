"""Un-prompted query features computed once per input and reused.

The frozen encoder's un-prompted feature of an input never changes, yet prompt methods
need it at every training step (prompt selection) and every evaluation (selection, task
identity): without a cache a run recomputes the query of every test item after every
task. Inputs carry no index through Avalanche's loaders, so the cache finds an input by a
fingerprint of its content: two independent modular hashes of its raw bits (exact for
token ids and for float pixels alike; a collision needs two different inputs to agree on
62 random bits). Lookups and inserts are tensor operations on the features' device.

A run's checkpoints hold the cache incrementally (:mod:`clbench.results.checkpoint`):
each writes only what changed since the previous one (:meth:`QueryCache.changes`: the
entries added and the keys dropped), so a checkpoint's size follows the new inputs, not
everything cached so far; on resume the parts are replayed in order
(:meth:`QueryCache.load_state_dict` with ``{"parts": [...]}``) into the same sorted
arrays an unbroken run holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypedDict

import torch
from torch import Tensor

from clbench.modular_hash import modular_dot

_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues fit in int64
_SEED = 20231101


class CacheChanges(TypedDict):
    """What :meth:`QueryCache.changes` returns (a checkpoint part holds one)."""

    keys: Tensor  # int64 [n], sorted: the entries to add
    values: Tensor | None  # [n, D]
    dropped: Tensor  # int64 [m]: the saved keys to drop first


class QueryCache:
    """Fingerprint -> feature, kept sorted by fingerprint for ``searchsorted`` lookups."""

    # (batch, its in-place version, its fingerprints): see fingerprint
    _last_fingerprint: ClassVar[tuple[Tensor, int, Tensor | None] | None] = None

    def __init__(self, max_items: int = 2_000_000) -> None:
        self.max_items = max_items
        self.keys = torch.empty(0, dtype=torch.long)
        self.values: Tensor | None = None
        self._weights: dict[tuple[int, str], Tensor] = {}
        self.hits = 0
        self.misses = 0
        # what the run folder's query-cache parts already hold (see changes / mark_saved):
        # the keys, sorted, on the CPU, and the names of the part files
        self.saved_keys = torch.empty(0, dtype=torch.long)
        self.saved_parts: list[str] = []
        self._forgotten: list[Tensor] = []  # keys dropped by forget since mark_saved

    def __len__(self) -> int:
        return int(self.keys.numel())

    def fingerprint(self, x: Tensor) -> Tensor | None:
        """int64 [B] fingerprints, or None for input types we do not hash.

        A pure function of ``x`` (the hash weights are seeded by the row size), so the
        last batch's result is kept for every cache: a prediction hashes its batch for the
        query cache and again for the prompted-feature cache, and the second time is
        free. The batch is recognised by identity and in-place version, and held until
        the next one, so its identity cannot pass to another tensor meanwhile."""
        last = QueryCache._last_fingerprint
        if last is not None and last[0] is x and last[1] == x._version:
            return None if last[2] is None else last[2].clone()
        keys = self._fingerprint(x)
        QueryCache._last_fingerprint = (x, x._version, keys)
        return None if keys is None else keys.clone()

    def _fingerprint(self, x: Tensor) -> Tensor | None:
        flat = x.reshape(x.shape[0], -1)
        if flat.dtype == torch.float32:
            flat = flat.contiguous().view(torch.int32)
        elif flat.dtype not in (torch.int64, torch.int32, torch.uint8):
            return None
        weights = self._hash_weights(flat.shape[1], x.device)
        if flat.dtype != torch.int64:  # pixels: the same sums through float64 products, faster
            first, second = modular_dot(flat, weights, _PRIME)
            return first * _PRIME + second
        residues = torch.remainder(flat, _PRIME)
        # per-element products stay below 2^62; the row sums below 2^31 * N
        first = torch.remainder(residues * weights[0], _PRIME).sum(1) % _PRIME
        second = torch.remainder(residues * weights[1], _PRIME).sum(1) % _PRIME
        return first * _PRIME + second

    def _hash_weights(self, size: int, device: torch.device) -> Tensor:
        key = (size, str(device))
        if key not in self._weights:
            generator = torch.Generator().manual_seed(_SEED + size)
            weights = torch.randint(1, _PRIME, (2, size), generator=generator)
            self._weights[key] = weights.to(device)
        return self._weights[key]

    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(found [B] bool, position [B]) of each key in the cache."""
        if self.values is None or len(self) == 0:
            return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
        stored = self.keys.to(keys.device)
        position = torch.searchsorted(stored, keys).clamp(max=len(stored) - 1)
        return stored[position] == keys, position

    def insert(self, keys: Tensor, values: Tensor) -> None:
        """Add entries for keys not cached yet. A key twice in ``keys`` (the same input
        twice in a batch) is added once, with its first value: keys stay unique, so the
        sorted arrays are the same whatever order the entries came in (a resumed run
        rebuilds them from checkpoint parts)."""
        keys, first = _first_of_each(keys)
        if len(self) + len(keys) > self.max_items:
            return  # full: later inputs are computed, not cached
        values = values.detach()[first] if first is not None else values.detach()
        if self.values is None:
            all_keys, all_values = keys, values
        else:
            all_keys = torch.cat([self.keys.to(keys.device), keys])
            all_values = torch.cat([self.values.to(values.device), values])
        order = torch.argsort(all_keys)
        self.keys, self.values = all_keys[order], all_values[order]

    def forget(self, keys: Tensor) -> None:
        """Drop the entries of ``keys`` (e.g. a finished task's training inputs, for a
        method that must keep nothing per example of past data). Keys stay sorted."""
        if self.values is None or len(self) == 0:
            return
        self._forgotten.append(keys.detach().cpu())
        keep = ~torch.isin(self.keys, keys.to(self.keys.device))
        self.keys, self.values = self.keys[keep], self.values[keep]

    def get_or_compute(
        self, x: Tensor, compute: Callable[[Tensor], Tensor], *, insert: bool = True
    ) -> Tensor:
        """Features of ``x``: cached rows looked up, the others computed (and cached)."""
        keys = self.fingerprint(x)
        if keys is None:
            return compute(x)
        found, position = self.lookup(keys)
        hits = int(found.sum())  # one host sync per batch: the shapes below depend on it
        self.hits += hits
        self.misses += len(keys) - hits
        values = self.values  # not None once anything was found
        if hits == len(keys) and values is not None:
            return values[position]
        cached = (
            values[position[found]] if hits and values is not None else None
        )  # before inserts reorder
        missing = ~found
        fresh = compute(x[missing])
        if insert:
            self.insert(keys[missing], fresh)
        if cached is None:
            return fresh
        out = fresh.new_empty((len(keys), *fresh.shape[1:]))
        out[missing] = fresh
        out[found] = cached.to(fresh.dtype)
        return out

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor | None]:
        """The whole cache: ``{"keys", "values"}`` on the CPU."""
        values = None if self.values is None else self.values.cpu()
        return {"keys": self.keys.cpu(), "values": values}

    def changes(self) -> CacheChanges:
        """What changed since :meth:`mark_saved` (since the start, before the first), on
        the CPU: ``dropped``, the saved keys :meth:`forget` dropped, and ``keys`` /
        ``values``, the entries to add after dropping those (in key order): the new ones,
        and a dropped key's entry when it was cached again. Replayed in that order they
        give the cache as it is; an entry added and dropped in between is in neither."""
        keys = self.keys.cpu()
        dropped = torch.empty(0, dtype=torch.long)
        if self._forgotten:
            forgotten = torch.cat(self._forgotten).unique()
            dropped = forgotten[torch.isin(forgotten, self.saved_keys)]
        added = ~torch.isin(keys, self.saved_keys) | torch.isin(keys, dropped)
        values = None
        if self.values is not None:
            values = self.values[added.to(self.values.device)].cpu()
        return {"keys": keys[added], "values": values, "dropped": dropped}

    def mark_saved(self, parts: Sequence[str]) -> None:
        """The cache as it is now is what the part files ``parts`` hold together: the
        next :meth:`changes` is relative to it."""
        self.saved_keys = self.keys.cpu().clone()
        self.saved_parts = list(parts)
        self._forgotten = []

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        """Load a whole cache (``{"keys", "values"}``, from :meth:`state_dict`), or replay
        checkpoint parts (``{"parts": [changes, ...], "part_names": [...]}``, oldest
        first; each as :meth:`changes` returned it), which also marks them saved."""
        if "parts" in state:
            keys, values = _replay(state["parts"])
            self.keys = keys.to(device)
            self.values = None if values is None else values.to(device)
            self.mark_saved(state["part_names"])
            return
        keys, values = state["keys"], state["values"]
        assert keys is not None, "a query-cache state always has keys"
        self.keys = keys.to(device)
        self.values = None if values is None else values.to(device)
        # nothing of this is in a run folder's parts yet: the next changes hold all of it
        self.saved_keys = torch.empty(0, dtype=torch.long)
        self.saved_parts = []
        self._forgotten = []


def _first_of_each(keys: Tensor) -> tuple[Tensor, Tensor | None]:
    """``keys`` without repeats (first occurrences, in order) and their positions in
    ``keys`` (None when nothing repeats: the common case costs one ``unique``)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    if len(unique) == len(keys):
        return keys, None
    positions = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(unique),), len(keys), dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    first = first.sort().values  # first occurrences in their original order
    return keys[first], first


def _replay(parts: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor | None]:
    """The sorted keys and values that ``parts`` (oldest first) add up to: each part's
    dropped keys leave, then its entries join; one concatenation unless keys are dropped."""
    keys: list[Tensor] = [torch.empty(0, dtype=torch.long)]
    values: list[Tensor] = []
    for part in parts:
        if len(part["dropped"]) and values:
            all_keys, all_values = torch.cat(keys), torch.cat(values)
            keep = ~torch.isin(all_keys, part["dropped"])
            keys, values = [all_keys[keep]], [all_values[keep]]
        if len(part["keys"]):
            keys.append(part["keys"])
            values.append(part["values"])
    all_keys = torch.cat(keys)
    order = torch.argsort(all_keys)
    return all_keys[order], torch.cat(values)[order] if values else None

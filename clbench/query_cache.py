"""Un-prompted query features computed once per input and reused.

The frozen encoder's un-prompted feature of an input never changes, yet prompt methods
need it at every training step (prompt selection) and every evaluation (selection, task
identity): without a cache a run recomputes the query of every test item after every
task. Inputs carry no index through Avalanche's loaders, so the cache finds an input by a
fingerprint of its content: two independent modular hashes of its raw bits (exact for
token ids and for float pixels alike; a collision needs two different inputs to agree on
62 random bits). Lookups and inserts are tensor operations on the features' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues fit in int64
_SEED = 20231101


class QueryCache:
    """Fingerprint -> feature, kept sorted by fingerprint for ``searchsorted`` lookups."""

    def __init__(self, max_items: int = 2_000_000) -> None:
        self.max_items = max_items
        self.keys = torch.empty(0, dtype=torch.long)
        self.values: Tensor | None = None
        self._weights: dict[tuple[int, str], Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return int(self.keys.numel())

    def fingerprint(self, x: Tensor) -> Tensor | None:
        """int64 [B] fingerprints, or None for input types we do not hash."""
        flat = x.reshape(x.shape[0], -1)
        if flat.dtype == torch.float32:
            flat = flat.contiguous().view(torch.int32)
        elif flat.dtype not in (torch.int64, torch.int32, torch.uint8):
            return None
        residues = torch.remainder(flat.long(), _PRIME)
        weights = self._hash_weights(flat.shape[1], x.device)
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
        if len(self) + len(keys) > self.max_items:
            return  # full: later inputs are computed, not cached
        values = values.detach()
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

    def state_dict(self) -> dict[str, Tensor | None]:
        values = None if self.values is None else self.values.cpu()
        return {"keys": self.keys.cpu(), "values": values}

    def load_state_dict(self, state: dict[str, Tensor | None], device: torch.device | str) -> None:
        keys, values = state["keys"], state["values"]
        assert keys is not None, "a query-cache state always has keys"
        self.keys = keys.to(device)
        self.values = None if values is None else values.to(device)

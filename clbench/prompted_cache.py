"""Prompted features of inputs under frozen per-task prompts, computed once per version.

HiDe-Prompt, NoRGa, hier-ot and WAVE-CRE freeze task k's prompt when task k ends, so the
prompted feature of a test input under that prompt is a fixed function of the input from
then on; yet without a cache every later evaluation runs the encoder on it again, and a
run of T tasks pays about T x items prompted passes where items would do. This cache maps
(input fingerprint, prompt slot, prompt version) -> feature:

* the input fingerprint is the query cache's content hash (:class:`QueryCache`), exact
  for token ids and float pixels alike;
* the slot is the task whose prompt an input uses (the inferred task at test time);
* the version of a slot changes whenever its parameters, or the parameters every slot
  shares (NoRGa's gates), change: :meth:`sync` compares their bits, so training,
  prompt momentum, a loaded checkpoint or any other write is seen without a hook, and the
  entries of the old version are dropped, never served.

An evaluation then runs the encoder only on the rows whose (slot, version) has no entry:
after task t, the inputs that pick prompt t, plus those whose prediction moved to a prompt
they had not used yet. What comes back is exactly what the encoder returned for that
input under that prompt; the features equal a fresh full-batch pass bit for bit wherever
the encoder's kernels are batch invariant (each row's result independent of the batch it
is computed in), and differ in the last bits where a kernel picks its blocking by batch
size (e.g. CPU attention on very short sequences with several threads).

Memory: one row of the feature's dtype per (input, slot) pair the evaluations used, on
the features' device: at least items x feature_dim x 4 bytes in fp32 (every input picks
a prompt), more where predictions move between prompts, at most slots times that (10,000
test items x 768 fp32 = 31 MB), and never more than ``max_bytes``: beyond it rows are
computed and not kept. The cache is not checkpointed: a resumed run refills it on its
first evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from clbench.query_cache import QueryCache

DEFAULT_MAX_BYTES = 2**30  # 1 GiB: ~35 slots of 10,000 items x 768 fp32

# rows of the batch to compute: an index tensor, or slice(None) for the whole batch (the
# very call an uncached prediction makes)
Rows = Tensor | slice
ComputeRows = Callable[[Rows], Tensor]


def flat_parameters(parameters: Iterable[Tensor]) -> Tensor:
    """The values of ``parameters`` as one fp32 vector (empty when there are none), for
    :meth:`PromptedFeatureCache.sync`."""
    flat = [p.detach().reshape(-1).float() for p in parameters]
    return torch.cat(flat) if flat else torch.zeros(0)


def _bits(values: Tensor) -> Tensor:
    """fp32 ``values`` as int32 bit patterns [rows, N]: compared bit for bit, -0.0 is not
    0.0 and a NaN equals itself."""
    flat = values.detach().float().reshape(len(values) if values.dim() > 1 else 1, -1)
    return flat.contiguous().view(torch.int32)


class PromptedFeatureCache:
    """(input fingerprint, prompt slot, prompt version) -> prompted feature; see the module
    docstring. ``computed`` / ``served`` count the rows run through the encoder / answered
    from the cache by :meth:`features` since construction."""

    def __init__(self, num_slots: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.num_slots = num_slots
        self.max_bytes = max_bytes
        self._hasher = QueryCache()  # only its content fingerprint is used
        # one sorted store per slot, holding the entries of the slot's current version only
        self._stores = [QueryCache(max_items=2**62) for _ in range(num_slots)]
        self.versions = [0] * num_slots
        # the parameters' bits at the last sync: [num_slots, N] and [1, M] int32
        self._snapshot: tuple[Tensor, Tensor] | None = None
        self.nbytes = 0
        self.computed = 0
        self.served = 0

    def __len__(self) -> int:
        return sum(len(store) for store in self._stores)

    def version(self, slot: int) -> int:
        return self.versions[slot]

    def clear(self) -> None:
        """Drop every entry and bump every version (e.g. an encoder that changed)."""
        for slot in range(self.num_slots):
            self._bump(slot)
        self._snapshot = None

    def _bump(self, slot: int) -> None:
        store = self._stores[slot]
        if store.values is not None:
            self.nbytes -= store.values.numel() * store.values.element_size()
        self._stores[slot] = QueryCache(max_items=2**62)
        self.versions[slot] += 1

    def sync(self, slot_parameters: Tensor, shared_parameters: Tensor | None = None) -> None:
        """Bump the version of each slot whose parameters changed since the last call.

        slot_parameters: [num_slots, N] fp32, row s all of slot s's parameter values;
        shared_parameters: [M] fp32 values every slot's feature depends on (a change there
        bumps every slot). Their bits are compared with a snapshot of the last call: exact,
        and a few memory passes over the prompts (a modular hash of them would cost more
        than the prompted pass it saves); one host sync.
        """
        if slot_parameters.shape[0] != self.num_slots:
            raise ValueError(
                f"{slot_parameters.shape[0]} slots of parameters for a cache of {self.num_slots}"
            )
        slots = _bits(slot_parameters)
        shared = slots.new_zeros(1, 0) if shared_parameters is None else _bits(shared_parameters)
        if self._snapshot is None:  # first call (or after clear): nothing to compare with
            changed = [slot for slot in range(self.num_slots) if len(self._stores[slot])]
        else:
            old_slots, old_shared = self._snapshot
            if old_slots.shape != slots.shape or old_shared.shape != shared.shape:
                moved = torch.ones(self.num_slots, dtype=torch.bool, device=slots.device)
            else:
                moved = (slots != old_slots.to(slots.device)).any(dim=1)
                moved |= (shared != old_shared.to(shared.device)).any()
            changed = moved.nonzero().flatten().tolist()
            if not changed:
                return
        for slot in changed:
            self._bump(slot)
        self._snapshot = (slots.clone(), shared.clone())

    def features(self, x: Tensor, slots: Tensor, compute: ComputeRows) -> Tensor:
        """Prompted features [B, D] of the batch ``x`` [B, ...] whose rows use the prompt
        slots ``slots`` [B]: cached rows looked up, the others from ``compute(rows)``
        (features of ``x[rows]`` under ``slots[rows]``) and cached. When no row is cached,
        ``compute(slice(None))`` runs on the whole batch, as an uncached prediction does.
        Call :meth:`sync` first whenever the prompts may have changed."""
        keys = self._hasher.fingerprint(x)
        if keys is None:  # an input type we do not hash: always computed
            self.computed += len(x)
            return compute(slice(None))
        found = torch.zeros(len(x), dtype=torch.bool, device=keys.device)
        hits: list[tuple[Tensor, Tensor]] = []  # (rows, cached features)
        for slot in torch.unique(slots).tolist():
            store = self._stores[int(slot)]
            if store.values is None:
                continue
            rows = (slots == slot).nonzero().flatten()
            hit, position = store.lookup(keys[rows])
            if bool(hit.any()):
                hits.append((rows[hit], store.values[position[hit]]))
                found[rows[hit]] = True
        missing = (~found).nonzero().flatten()
        self.served += len(x) - len(missing)
        self.computed += len(missing)
        if not hits:
            fresh = compute(slice(None))
            self._insert(keys, slots, fresh)
            return fresh
        if len(missing) == 0:
            values = hits[0][1]
            out = values.new_empty((len(x), *values.shape[1:]))
        else:
            fresh = compute(missing)
            self._insert(keys[missing], slots[missing], fresh)
            out = fresh.new_empty((len(x), *fresh.shape[1:]))
            out[missing] = fresh
        for rows, values in hits:
            out[rows] = values.to(out.dtype)
        return out

    def _insert(self, keys: Tensor, slots: Tensor, features: Tensor) -> None:
        row_bytes = features[0].numel() * features.element_size() if len(features) else 0
        for slot in torch.unique(slots).tolist():
            rows = (slots == slot).nonzero().flatten()
            added = len(rows) * row_bytes
            if self.nbytes + added > self.max_bytes:
                continue  # full: later rows are computed, not kept
            self._stores[int(slot)].insert(keys[rows], features[rows])
            self.nbytes += added

"""The float64 route to the query cache's modular sums gives the elementwise formula's
very values (so fingerprints, and the caches and checkpoints keyed by them, are unchanged)."""

from __future__ import annotations

import pytest
import torch

from clbench.modular_hash import modular_dot
from clbench.query_cache import _PRIME, QueryCache


def reference(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query cache's original elementwise formula."""
    residues = torch.remainder(values.long(), _PRIME)
    first = torch.remainder(residues * weights[0], _PRIME).sum(1) % _PRIME
    second = torch.remainder(residues * weights[1], _PRIME).sum(1) % _PRIME
    return first, second


def weights_for(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randint(1, _PRIME, (2, size), generator=generator)


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(4, 3, 32, 32).view(torch.int32).reshape(4, -1),  # float pixels' words
        torch.randint(-(2**31), 2**31 - 1, (3, 5000), dtype=torch.int32),
        torch.full((2, 150_528), -(2**31), dtype=torch.int32),  # the extremes, a 224-px row
        torch.full((2, 150_528), 2**31 - 1, dtype=torch.int32),
        torch.tensor([[0, 1, -1, _PRIME, _PRIME - 1, -_PRIME, 65535, 65536, -65536]]).int(),
        torch.randint(0, 256, (5, 777), dtype=torch.uint8),
    ],
)
def test_modular_dot_equals_the_elementwise_formula(values):
    weights = weights_for(values.shape[1])
    ours = modular_dot(values, weights, _PRIME)
    for got, expected in zip(ours, reference(values, weights)):
        assert torch.equal(got, expected)


def test_rows_longer_than_one_exact_chunk_are_summed_in_parts():
    # 3M odd terms near 2^32 sum past 2^53, where float64 rounds odd integers: the chunks
    # of 2^20 words keep every partial sum exact
    values = torch.full((1, 3_000_001), 2**31 - 1, dtype=torch.int32)
    weights = torch.full((2, values.shape[1]), _PRIME - 2, dtype=torch.long)
    for got, expected in zip(modular_dot(values, weights, _PRIME), reference(values, weights)):
        assert torch.equal(got, expected)


def test_image_fingerprints_are_the_elementwise_formula_s():
    cache = QueryCache()
    images = torch.randn(6, 3, 64, 64)
    words = images.reshape(6, -1).view(torch.int32)
    first, second = reference(words, cache._hash_weights(words.shape[1], images.device))
    assert torch.equal(cache.fingerprint(images), first * _PRIME + second)

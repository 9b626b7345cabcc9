"""The query cache: exact fingerprints, mixed hits and misses, same features as no cache."""

from __future__ import annotations

import torch

from clbench.query_cache import QueryCache


def counting(fn):
    calls = []

    def wrapped(x):
        calls.append(len(x))
        return fn(x)

    return wrapped, calls


def test_fingerprints_depend_on_content_only():
    cache = QueryCache()
    ids = torch.randint(0, 30000, (6, 40))
    keys = cache.fingerprint(ids)
    assert keys.unique().numel() == 6
    torch.testing.assert_close(cache.fingerprint(ids[[3, 1]]), keys[[3, 1]])
    changed = ids.clone()
    changed[2, 39] += 1
    assert cache.fingerprint(changed)[2] != keys[2]
    images = torch.randn(4, 3, 8, 8)
    assert cache.fingerprint(images).unique().numel() == 4
    assert cache.fingerprint(images.double()) is None  # not hashed: always computed


def test_hits_misses_and_order():
    cache = QueryCache()
    feature = lambda x: x.float().sum(1, keepdim=True) * torch.ones(1, 3)  # noqa: E731
    compute, calls = counting(feature)
    first = torch.randint(0, 100, (5, 7))
    torch.testing.assert_close(cache.get_or_compute(first, compute), feature(first))
    mixed = torch.cat([first[[4, 0]], torch.randint(100, 200, (3, 7)), first[[2]]])
    torch.testing.assert_close(cache.get_or_compute(mixed, compute), feature(mixed))
    assert calls == [5, 3]  # only the three new rows were computed
    torch.testing.assert_close(cache.get_or_compute(mixed, compute), feature(mixed))
    assert calls == [5, 3] and len(cache) == 8 and cache.hits == 3 + 6


def test_no_insert_keeps_the_cache_unchanged():
    cache = QueryCache()
    cache.get_or_compute(torch.randn(3, 4), lambda x: x, insert=False)
    assert len(cache) == 0


def test_state_round_trip():
    cache = QueryCache()
    x = torch.randint(0, 50, (4, 3))
    cache.get_or_compute(x, lambda v: v.float())
    restored = QueryCache()
    restored.load_state_dict(cache.state_dict(), "cpu")
    compute, calls = counting(lambda v: v.float())
    torch.testing.assert_close(restored.get_or_compute(x, compute), x.float())
    assert calls == []


def test_cached_queries_equal_fresh_ones_in_a_strategy(minilm):
    from clbench.strategies.l2p import L2P, L2PConfig

    strategy = L2P(encoder=minilm, num_classes=4, config=L2PConfig(pool_size=4, top_k=2))
    ids = torch.full((3, 12), minilm.pad_token_id)
    ids[:, 0], ids[:, 11] = 101, 102
    ids[:, 1:11] = torch.randint(2000, 9000, (3, 10))
    ids[:, 2], ids[:, 5] = minilm.marker_ids["[E11]"], minilm.marker_ids["[E21]"]
    first = strategy.query(ids)
    again = strategy.query(ids[[2, 0, 1]])
    torch.testing.assert_close(again, first[[2, 0, 1]])
    torch.testing.assert_close(first, minilm.query(ids), atol=1e-5, rtol=1e-5)
    assert strategy.query_cache.hits == 3

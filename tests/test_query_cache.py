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


# -- incremental checkpoints --------------------------------------------------------------
def filled(keys: list[int], width: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    key_tensor = torch.tensor(keys, dtype=torch.long)
    return key_tensor, key_tensor.float()[:, None].repeat(1, width) + 0.5


def assert_same_cache(restored: QueryCache, cache: QueryCache) -> None:
    assert torch.equal(restored.keys, cache.keys)
    assert restored.values is not None and cache.values is not None
    assert restored.values.dtype == cache.values.dtype
    assert torch.equal(restored.values, cache.values)


def test_changes_hold_only_what_is_new_since_the_last_save():
    cache = QueryCache()
    cache.insert(*filled([5, 1, 9]))
    first = cache.changes()
    assert first["keys"].tolist() == [1, 5, 9] and len(first["dropped"]) == 0
    cache.mark_saved(["part-0000.pt"])
    assert len(cache.changes()["keys"]) == 0  # nothing new: an empty part would be skipped
    cache.insert(*filled([7, 3]))
    cache.forget(torch.tensor([5, 3]))  # 5 was saved, 3 came and went in between
    second = cache.changes()
    assert second["keys"].tolist() == [7] and second["dropped"].tolist() == [5]
    torch.testing.assert_close(second["values"], filled([7])[1])
    restored = QueryCache()
    restored.load_state_dict({"parts": [first, second], "part_names": ["a", "b"]}, "cpu")
    assert_same_cache(restored, cache)
    assert restored.saved_parts == ["a", "b"] and len(restored.changes()["keys"]) == 0


def test_a_saved_key_forgotten_and_cached_again_replays_to_its_new_value():
    cache = QueryCache()
    cache.insert(*filled([2, 4]))
    first = cache.changes()
    cache.mark_saved(["part-0000.pt"])
    cache.forget(torch.tensor([4]))
    keys, values = filled([4])
    cache.insert(keys, values + 100.0)  # recomputed: another value for the same key
    second = cache.changes()
    assert second["dropped"].tolist() == [4] and second["keys"].tolist() == [4]
    restored = QueryCache()
    restored.load_state_dict({"parts": [first, second], "part_names": ["a", "b"]}, "cpu")
    assert_same_cache(restored, cache)


def test_an_input_twice_in_a_batch_is_cached_once():
    cache = QueryCache()
    x = torch.randint(0, 50, (3, 4))
    batch = torch.cat([x, x[[1]]])
    compute, calls = counting(lambda v: v.float())
    torch.testing.assert_close(cache.get_or_compute(batch, compute), batch.float())
    assert len(cache) == 3 and cache.keys.unique().numel() == 3
    torch.testing.assert_close(cache.get_or_compute(batch, compute), batch.float())
    assert calls == [4]


def test_a_whole_state_loaded_is_saved_whole_next_time():
    """A checkpoint from before the parts held the whole cache in the state: after loading
    it nothing is in a part yet, so the next part must hold everything."""
    cache = QueryCache()
    cache.insert(*filled([3, 8]))
    restored = QueryCache()
    restored.load_state_dict(cache.state_dict(), "cpu")
    assert restored.changes()["keys"].tolist() == [3, 8]


def test_checkpoints_write_the_cache_incrementally_and_load_it_back(tmp_path):
    from clbench.results import RunFolder
    from clbench.results.checkpoint import (
        checkpoint_path,
        load_checkpoint,
        query_cache_part_path,
        save_checkpoint,
    )

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    cache = QueryCache()
    sizes = []
    for experience in range(3):
        start = 1000 * experience
        cache.insert(*filled(list(range(start, start + 500)), width=64))
        state = {"strategy": {"query_cache": None}, "finished_experiences": experience + 1}
        written = save_checkpoint(folder, state, query_cache=cache)
        part = query_cache_part_path(folder, f"part-{experience:04d}.pt")
        assert written.bytes_written == part.stat().st_size + checkpoint_path(folder).stat().st_size
        sizes.append(written.bytes_written)
    # every experience adds 500 entries, and writes about that much, not the whole cache
    assert max(sizes) < 1.1 * min(sizes)
    # a part a killed run left behind, listed by no checkpoint, is never read
    query_cache_part_path(folder, "part-0003.pt").write_bytes(b"half a part")
    payload = load_checkpoint(folder)
    assert payload["query_cache_parts"] == [f"part-{i:04d}.pt" for i in range(3)]
    restored = QueryCache()
    restored.load_state_dict(payload["strategy"]["query_cache"], "cpu")
    assert_same_cache(restored, cache)


def test_a_tampered_query_cache_part_is_refused_unrun(tmp_path):
    import pytest

    from clbench.results import RunFolder
    from clbench.results.checkpoint import (
        CheckpointError,
        load_checkpoint,
        query_cache_part_path,
        save_checkpoint,
    )

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    cache = QueryCache()
    cache.insert(*filled([1, 2]))
    save_checkpoint(
        folder, {"strategy": {"query_cache": None}, "finished_experiences": 1}, query_cache=cache
    )
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    with open(query_cache_part_path(folder, "part-0000.pt"), "wb") as stream:
        torch.save({"format": "clbench query-cache part", "keys": RunsCode()}, stream)
    with pytest.raises(CheckpointError, match="refused to load") as raised:
        load_checkpoint(folder)
    assert "part-0000.pt" in str(raised.value) and len(str(raised.value).splitlines()) == 1
    assert not marker.exists()


def test_a_batch_is_hashed_once_for_every_cache(monkeypatch) -> None:
    """The query cache and the prompted-feature cache hash the same test batch in turn:
    the second fingerprint is the first one's, until the batch changes in place."""
    calls = []
    real = QueryCache._fingerprint

    def counted(self, x):
        calls.append(1)
        return real(self, x)

    monkeypatch.setattr(QueryCache, "_fingerprint", counted)
    x = torch.rand(4, 3, 8, 8)
    first = QueryCache().fingerprint(x)
    second = QueryCache().fingerprint(x)  # another cache, the same batch
    assert len(calls) == 1 and torch.equal(first, second)
    second += 1  # a caller's copy: the kept fingerprints stay as they were
    assert torch.equal(QueryCache().fingerprint(x), first) and len(calls) == 1
    x[0, 0, 0, 0] += 1.0  # changed in place: hashed again, row 0 differs
    third = QueryCache().fingerprint(x)
    assert len(calls) == 2 and third[0] != first[0] and torch.equal(third[1:], first[1:])
    assert torch.equal(QueryCache().fingerprint(x.clone()), third) and len(calls) == 3

"""The sharded tensor cache on both stores: sharding, reopening, concurrency and crash safety."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from stagetune.core.cache import ShardedCache
from stagetune.core.errors import NotFoundError
from stagetune.core.store import Store

PREFIX = "cache/vae/fp123"


def entry(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "latents": torch.randn(4, 8, 8, generator=g).to(torch.bfloat16),
        "mask": torch.rand(3, generator=g) > 0.5,
        "scale": torch.tensor(float(i), dtype=torch.float64),  # 0-dim
        "ids": torch.arange(i, i + 5, dtype=torch.int64),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def shard_files(store: Store) -> list[str]:
    return [k for k in store.list(f"{PREFIX}/shards/")]


def index_files(store: Store) -> list[str]:
    return [k for k in store.list(f"{PREFIX}/index/")]


def test_writes_shards_of_write_batch_size_and_reads_back_bit_identical(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    assert len(cache) == 0
    with cache.writer(write_batch_size=4) as writer:
        for i in range(10):
            writer.add(f"k{i}", entry(i))
        assert writer.stats.shards_written == 2  # two full shards flushed while adding
    assert writer.stats.shards_written == 3  # the last partial one on exit
    assert writer.stats.entries_written == 10
    assert writer.stats.bytes_written > 0
    assert len(shard_files(store)) == 3 and len(index_files(store)) == 3
    # The writer's own cache sees its writes at once.
    assert len(cache) == 10 and cache.has("k9")

    reopened = ShardedCache(store, PREFIX)
    assert len(reopened) == 10
    for i in range(10):
        assert_same(reopened.get(f"k{i}"), entry(i))
    assert [sorted(e) for e in reopened.get_many(["k7", "k0", "k7"])] == [sorted(entry(0))] * 3
    for got, i in zip(reopened.get_many(["k9", "k0", "k5", "k1"]), [9, 0, 5, 1], strict=True):
        assert_same(got, entry(i))


def test_layout_and_index_format(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer(write_batch_size=2) as writer:
        writer.add("a", {"x": torch.ones(2)})
        writer.add("b", {"x": torch.zeros(2)})
    (shard,) = shard_files(store)
    (index,) = index_files(store)
    shard_id = shard.rsplit("/", 1)[1].removesuffix(".safetensors")
    assert index == f"{PREFIX}/index/{shard_id}.json"
    body = json.loads(store.get_bytes(index))
    assert body["keys"] == ["a", "b"] and body["shard"] == shard_id
    from safetensors.torch import load

    assert sorted(load(store.get_bytes(shard))) == ["a/x", "b/x"]


def test_has_missing_and_not_found(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer(write_batch_size=3) as writer:
        for key in ["a", "b", "c", "d"]:
            writer.add(key, {"t": torch.tensor([ord(key)])})
    assert cache.has("a") and "d" in cache and not cache.has("zz")
    assert cache.missing(["x", "a", "y", "x", "d", "y", "z"]) == ["x", "y", "z"]
    assert cache.missing([]) == []
    with pytest.raises(NotFoundError, match="'zz'"):
        cache.get("zz")
    with pytest.raises(NotFoundError, match="'nope'"):
        cache.get_many(["a", "nope"])


def test_refresh_picks_up_other_writers(store: Store) -> None:
    reader = ShardedCache(store, PREFIX)
    with ShardedCache(store, PREFIX).writer(write_batch_size=2) as writer:
        writer.add("late", {"t": torch.ones(1)})
    assert not reader.has("late")
    reader.refresh()
    assert reader.has("late")
    assert_same(reader.get("late"), {"t": torch.ones(1)})


def test_adding_copies_tensors_so_callers_can_reuse_buffers(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    buffer = torch.arange(12.0).reshape(3, 4)
    with cache.writer(write_batch_size=10) as writer:
        writer.add("view", {"t": buffer.t()})  # non-contiguous view
        writer.add("slice", {"t": buffer[1], "u": buffer[2]})  # views sharing one storage
        buffer.zero_()
    assert_same(ShardedCache(store, PREFIX).get("view"), {"t": torch.arange(12.0).reshape(3, 4).t().contiguous()})
    assert_same(ShardedCache(store, PREFIX).get("slice"), {"t": torch.arange(4.0, 8.0), "u": torch.arange(8.0, 12.0)})


def test_reads_are_independent_copies(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer() as writer:
        writer.add("k", {"t": torch.ones(3)})
    reader = ShardedCache(store, PREFIX)
    reader.get("k")["t"].mul_(5)
    assert torch.equal(reader.get("k")["t"], torch.ones(3))


def test_lru_keeps_a_bounded_number_of_shards(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer(write_batch_size=1) as writer:
        for i in range(6):
            writer.add(f"k{i}", {"t": torch.full((2,), i)})
    reader = ShardedCache(store, PREFIX, max_open_shards=2)
    for _ in range(2):
        for i in range(6):
            assert reader.get(f"k{i}")["t"].tolist() == [i, i]
    assert len(reader._open) == 2


def test_two_writers_on_one_prefix_never_clash(store: Store) -> None:
    """Two encoders (even of the same keys) write concurrently; every entry ends up readable."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            cache = ShardedCache(store, PREFIX)
            barrier.wait()
            with cache.writer(write_batch_size=5) as writer:
                # Overlapping keys: the same content-addressed entries encoded twice.
                for i in range(offset, offset + 20):
                    writer.add(f"k{i}", entry(i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Keys 10..19 give identical key sets in both writers' second and third shards: ids must differ.
    assert len(shard_files(store)) == 8 and len(index_files(store)) == 8
    cache = ShardedCache(store, PREFIX)
    assert len(cache) == 30
    for i in range(30):
        assert_same(cache.get(f"k{i}"), entry(i))


def test_crash_between_shard_and_index_leaves_entries_absent(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer(write_batch_size=2) as writer:
        writer.add("kept1", {"t": torch.ones(1)})
        writer.add("kept2", {"t": torch.ones(1)})

    real_put = store.put_bytes

    def crash_on_index(key: str, data: bytes) -> None:
        if "/index/" in key:
            raise KeyboardInterrupt("killed between shard and index")
        real_put(key, data)

    monkeypatch.setattr(store, "put_bytes", crash_on_index)
    writer = cache.writer(write_batch_size=2)
    writer.add("lost1", {"t": torch.zeros(1)})
    with pytest.raises(KeyboardInterrupt):
        writer.add("lost2", {"t": torch.zeros(1)})
    monkeypatch.undo()

    assert len(shard_files(store)) == 2  # the orphan shard exists...
    reopened = ShardedCache(store, PREFIX)
    assert len(reopened) == 2  # ...but no index names it: its entries are simply absent
    assert reopened.missing(["kept1", "lost1", "lost2"]) == ["lost1", "lost2"]
    assert_same(reopened.get("kept1"), {"t": torch.ones(1)})


def test_failed_flush_keeps_entries_pending_for_a_retry(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ShardedCache(store, PREFIX)
    writer = cache.writer(write_batch_size=10)
    writer.add("a", {"t": torch.ones(1)})
    real_put = store.put_bytes
    monkeypatch.setattr(store, "put_bytes", lambda key, data: (_ for _ in ()).throw(OSError("store down")))
    with pytest.raises(OSError):
        writer.flush()
    assert writer.pending == 1 and not cache.has("a")
    monkeypatch.setattr(store, "put_bytes", real_put)
    writer.close()
    assert ShardedCache(store, PREFIX).has("a")


def test_exception_inside_writer_keeps_what_was_added(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with pytest.raises(RuntimeError, match="encoder died"):
        with cache.writer(write_batch_size=100) as writer:
            writer.add("a", {"t": torch.ones(1)})
            writer.add("b", {"t": torch.ones(1)})
            raise RuntimeError("encoder died")
    assert len(ShardedCache(store, PREFIX)) == 2
    with pytest.raises(RuntimeError, match="closed"):
        writer.add("c", {"t": torch.ones(1)})


def test_missing_shard_named_in_index_is_a_clear_error(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer(write_batch_size=2) as writer:
        writer.add("a", {"t": torch.ones(1)})
    (shard,) = shard_files(store)
    store.delete(shard)
    reopened = ShardedCache(store, PREFIX)
    assert reopened.has("a")
    with pytest.raises(NotFoundError, match=shard.replace(".", r"\.")):
        reopened.get("a")


def test_empty_writer_writes_nothing(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer() as writer:
        pass
    assert writer.stats.shards_written == 0
    assert shard_files(store) == [] and index_files(store) == []


def test_bad_entries_are_refused(store: Store) -> None:
    cache = ShardedCache(store, PREFIX)
    with cache.writer() as writer:
        with pytest.raises(ValueError, match="without '/'"):
            writer.add("a/b", {"t": torch.ones(1)})
        with pytest.raises(ValueError, match="no tensors"):
            writer.add("a", {})
        with pytest.raises(TypeError):
            writer.add("a", {"t": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        cache.writer(write_batch_size=0)
    with pytest.raises(ValueError):
        ShardedCache(store, "/")


def test_caches_under_sibling_prefixes_are_separate(store: Store) -> None:
    with ShardedCache(store, "cache/text/fp1").writer() as writer:
        writer.add("k", {"t": torch.ones(1)})
    with ShardedCache(store, "cache/text/fp10").writer() as writer:
        writer.add("other", {"t": torch.ones(1)})
    assert ShardedCache(store, "cache/text/fp1").missing(["k", "other"]) == ["other"]

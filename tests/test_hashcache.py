"""The content-hash cache: unchanged files are never read again, changed ones are, on local folders and S3."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from fixtures_store import S3Server, fresh_bucket

from stagetune.core.errors import NotFoundError
from stagetune.core.manifest import hash_bytes
from stagetune.core.sources import LocalSource, Source, SourceFile, source_for
from stagetune.core.store import LocalStore, Store, open_store
from stagetune.ingest.hashcache import FORMAT, HashCache, cache_prefix, hash_files, iter_hashed

PAST_NS = 1_700_000_000 * 10**9  # files are dated well before "now" so the racy-window rule does not apply


class CountingSource:
    """Wraps a real source and counts what is read from it."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads: list[str] = []
        self.bytes_read = 0
        self._lock = threading.Lock()

    def list_files(self) -> list[SourceFile]:
        return self.inner.list_files()

    def read(self, path: str) -> bytes:
        data = self.inner.read(path)
        with self._lock:
            self.reads.append(path)
            self.bytes_read += len(data)
        return data

    def read_text(self, path: str) -> str | None:
        return self.inner.read_text(path)

    def sibling(self, path: str, suffix: str) -> str:
        return self.inner.sibling(path, suffix)

    def reset(self) -> None:
        self.reads, self.bytes_read = [], 0


def content(i: int, version: int = 0) -> bytes:
    return f"image {i:04d} v{version} ".encode() * (3 + i % 5)


class Dataset:
    """The same 30-file dataset in a local folder or under an S3 prefix, with ways to change one file."""

    def __init__(self, kind: str, tmp_path: Path, server: S3Server | None) -> None:
        self.kind = kind
        self.names = [f"{'nested/' if i % 4 == 0 else ''}f{i:04d}.png" for i in range(30)]
        if kind == "local":
            self.root = tmp_path / "images"
            for i, name in enumerate(self.names):
                self._write_local(name, content(i), PAST_NS + i)
            self.source = source_for({"id": "ds", "type": "local", "instance_data_dir": str(self.root)})
        else:
            assert server is not None
            self.client = server.client()
            self.bucket = fresh_bucket()
            self.client.make_bucket(self.bucket)
            for i, name in enumerate(self.names):
                self._put(name, content(i))
            self.source = source_for(
                {
                    "id": "ds",
                    "type": "aws",
                    "aws_bucket_name": self.bucket,
                    "aws_data_prefix": "set",
                    "aws_endpoint_url": server.endpoint,
                    "aws_region_name": server.region,
                    "aws_access_key_id": server.access_key,
                    "aws_secret_access_key": server.secret_key,
                }
            )

    def _write_local(self, name: str, data: bytes, mtime_ns: int) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    def _put(self, name: str, data: bytes) -> None:
        self.client.put_object(self.bucket, f"set/{name}", io.BytesIO(data), len(data))

    def touch(self, name: str) -> None:
        """Same bytes, new modification stamp."""
        if self.kind == "local":
            path = self.root / name
            os.utime(path, ns=(PAST_NS + 10**12, PAST_NS + 10**12))
        else:
            data = self.client.get_object(self.bucket, f"set/{name}").read()
            time.sleep(1.05)  # LastModified has one-second resolution
            self._put(name, data)

    def rewrite(self, name: str, data: bytes) -> None:
        if self.kind == "local":
            self._write_local(name, data, PAST_NS + 2 * 10**12)
        else:
            self._put(name, data)


@pytest.fixture(params=["local", "s3"])
def dataset(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dataset]:
    server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    yield Dataset(request.param, tmp_path, server)


def test_second_pass_over_unchanged_files_reads_nothing(dataset: Dataset, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    source = CountingSource(dataset.source)
    files = source.list_files()
    assert len(files) == 30

    first = hash_files(source, files, HashCache(store, source.url))
    assert len(source.reads) == 30
    for i, name in enumerate(dataset.names):
        digest, data, error = first[name]
        assert error is None and data == content(i) and digest == hash_bytes(content(i))

    source.reset()
    second = hash_files(source, source.list_files(), HashCache(store, source.url))  # a new run: loads from store
    assert source.reads == [] and source.bytes_read == 0
    assert {k: v.digest for k, v in second.items()} == {k: v.digest for k, v in first.items()}
    assert all(v.data is None for v in second.values())


def test_only_the_changed_file_is_read_again(dataset: Dataset, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    source = CountingSource(dataset.source)
    hash_files(source, source.list_files(), HashCache(store, source.url))

    touched, changed = dataset.names[3], dataset.names[8]
    dataset.touch(touched)
    dataset.rewrite(changed, content(8, version=1))  # same length, other bytes
    assert len(content(8, version=1)) == len(content(8))
    source.reset()
    result = hash_files(source, source.list_files(), HashCache(store, source.url))
    assert sorted(source.reads) == sorted(f.path for f in source.list_files() if f.relative in {touched, changed})
    assert result[touched].digest == hash_bytes(content(3)) and result[touched].data == content(3)
    assert result[changed].digest == hash_bytes(content(8, version=1))

    source.reset()
    hash_files(source, source.list_files(), HashCache(store, source.url))
    assert source.reads == []


def test_cache_lives_in_the_store_under_the_source_hash(store: Store) -> None:
    url = "s3://bucket/prefix/ (endpoint http://127.0.0.1:9)"
    cache = HashCache(store, url).load()
    files = [SourceFile(f"s3://bucket/prefix/{i}.png", f"{i}.png", 10, PAST_NS, f"etag{i}") for i in range(5)]
    for file in files:
        cache.put(file, f"d{file.relative}")
    assert cache.save() == 5
    prefix = cache_prefix(url)
    assert prefix == f"manifests/hashcache/{xxhash.xxh3_64_hexdigest(url.encode())}/"
    keys = list(store.list(prefix))
    assert len(keys) == 1 and keys[0].endswith(".json")
    body = json.loads(store.get_bytes(keys[0]))
    assert body["format"] == FORMAT and body["source"] == url and len(body["entries"]) == 5
    assert cache.save() == 0 and list(store.list(prefix)) == keys  # nothing new: nothing written
    again = HashCache(store, url).load()
    assert [again.get(f) for f in files] == [f"d{f.relative}" for f in files]
    moved = SourceFile(files[0].path, files[0].relative, 10, PAST_NS, "other-etag")
    assert again.get(moved) is None
    assert HashCache(store, "another source").load().get(files[0]) is None


def test_concurrent_writers_keep_each_others_entries_and_compaction_bounds_segments(store: Store) -> None:
    url = "/data/set"
    a, b = HashCache(store, url, compact_after=3).load(), HashCache(store, url, compact_after=3).load()
    files = [SourceFile(f"/data/set/{i}.png", f"{i}.png", i, PAST_NS + i, None) for i in range(40)]
    # two runs, both started from an empty cache, save interleaved
    for i, file in enumerate(files):
        (a if i % 2 else b).put(file, f"digest-{i}")
        if i % 5 == 4:
            (a if i % 10 == 9 else b).save()
    a.save()
    b.save()
    merged = HashCache(store, url).load()
    assert [merged.get(f) for f in files] == [f"digest-{i}" for i in range(40)]

    # many runs in sequence: compaction keeps the segment count bounded and loses nothing
    for round_ in range(10):
        run = HashCache(store, url, compact_after=3).load()
        run.put(SourceFile("/x", f"round-{round_}.png", 1, PAST_NS, None), f"r{round_}")
        run.save()
    segments = list(store.list(cache_prefix(url)))
    assert len(segments) <= 3, segments
    final = HashCache(store, url).load()
    assert len(final) == 50
    assert final.get(SourceFile("/x", "round-9.png", 1, PAST_NS, None)) == "r9"


def test_compaction_leaves_segments_written_meanwhile(store: Store) -> None:
    url = "/data/set"
    f1, f2, f3 = (SourceFile(f"/p/{i}", f"{i}.png", 1, PAST_NS, None) for i in range(3))
    seed = HashCache(store, url).load()
    seed.put(f1, "one")
    seed.save()
    compactor = HashCache(store, url, compact_after=1).load()  # has loaded the one segment
    other = HashCache(store, url).load()
    other.put(f2, "two")
    other.save()  # written after the compactor loaded
    compactor.put(f3, "three")
    compactor.save()  # compacts: deletes only what it loaded
    final = HashCache(store, url).load()
    assert (final.get(f1), final.get(f2), final.get(f3)) == ("one", "two", "three")


class VanishingStore(LocalStore):
    """A real local store on which a concurrent compaction happens between a listing and the reads."""

    def __init__(self, root: Path, url: str) -> None:
        super().__init__(root, fsync=False)
        self.url_of_cache = url
        self.raced = False

    def list(self, prefix: str) -> Iterator[str]:
        keys = list(super().list(prefix))
        if not self.raced and keys:
            self.raced = True
            HashCache(LocalStore(self.root, fsync=False), self.url_of_cache).load().save(compact=True)
        return iter(keys)


def test_reader_racing_a_compaction_lists_again(tmp_path: Path) -> None:
    url = "/data/set"
    files = [SourceFile(f"/p/{i}", f"{i}.png", 1, PAST_NS, None) for i in range(6)]
    plain = LocalStore(tmp_path / "store", fsync=False)
    for file in files:  # one segment per run
        run = HashCache(plain, url, compact_after=100).load()
        run.put(file, file.relative)
        run.save()
    racing = VanishingStore(tmp_path / "store", url)
    loaded = HashCache(racing, url).load()
    assert racing.raced and [loaded.get(f) for f in files] == [f.relative for f in files]


def test_freshly_modified_local_files_are_hashed_but_not_cached(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "new.png").write_bytes(b"just written")
    (root / "old.png").write_bytes(b"written long ago")
    os.utime(root / "old.png", ns=(PAST_NS, PAST_NS))
    store = LocalStore(tmp_path / "store", fsync=False)
    source = CountingSource(LocalSource(root))
    files = source.list_files()
    hash_files(source, files, HashCache(store, source.url))
    source.reset()
    result = hash_files(source, files, HashCache(store, source.url))
    assert source.reads == [str(root / "new.png")]  # a same-size rewrite within the mtime tick must not hide
    assert result["new.png"].digest == hash_bytes(b"just written")


def test_read_errors_are_reported_not_cached(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(name.encode())
        os.utime(root / name, ns=(PAST_NS, PAST_NS))
    source = LocalSource(root)
    files = source.list_files()
    (root / "a.png").unlink()  # vanishes between the listing and the read
    store = LocalStore(tmp_path / "store", fsync=False)
    result = hash_files(source, files, HashCache(store, source.url))
    assert isinstance(result["a.png"].error, NotFoundError) and result["a.png"].digest is None
    assert result["b.png"].digest == hash_bytes(b"b.png")
    assert HashCache(store, source.url).load().get(files[0]) is None


def test_streaming_saves_progress_even_when_stopped_early(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(10):
        (root / f"{i}.png").write_bytes(content(i))
        os.utime(root / f"{i}.png", ns=(PAST_NS, PAST_NS))
    store = LocalStore(tmp_path / "store", fsync=False)
    source = CountingSource(LocalSource(root))
    files = source.list_files()
    stream = iter_hashed(source, files, HashCache(store, source.url), max_workers=2, save_every=3)
    seen = [next(stream) for _ in range(4)]
    stream.close()
    assert [f.relative for f, _ in seen] == [f.relative for f in files[:4]]
    source.reset()
    hash_files(source, files, HashCache(store, source.url))
    assert len(source.reads) <= 6  # the first four (and any read-ahead that finished) are not read again


def test_retain_forgets_deleted_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    files = [SourceFile(f"/p/{i}", f"{i}.png", 1, PAST_NS, None) for i in range(4)]
    cache = HashCache(store, "/p").load()
    for f in files:
        cache.put(f, f.relative)
    cache.save()
    again = HashCache(store, "/p").load()
    assert again.retain(f.relative for f in files[:2]) == 2
    again.save()
    final = HashCache(store, "/p").load()
    assert len(final) == 2 and final.get(files[3]) is None and final.get(files[0]) == "0.png"


def test_unreadable_segments_are_ignored(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    prefix = cache_prefix("/p")
    store.put_bytes(prefix + "0-garbage.json", b"{not json")
    store.put_bytes(prefix + "1-future.json", json.dumps({"format": "stagetune.hashcache/9"}).encode())
    cache = HashCache(store, "/p", compact_after=1).load()
    assert len(cache) == 0
    cache.put(SourceFile("/p/a", "a.png", 1, PAST_NS, None), "d")
    cache.save()
    assert store.exists(prefix + "1-future.json")  # another version's data is never deleted


def test_cache_on_s3_store(s3_server: S3Server, tmp_path: Path) -> None:
    store = open_store(s3_server.url(fresh_bucket(), prefix="st"))
    root = tmp_path / "images"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.png").write_bytes(content(i))
        os.utime(root / f"{i}.png", ns=(PAST_NS, PAST_NS))
    source = CountingSource(LocalSource(root))
    hash_files(source, source.list_files(), HashCache(store, source.url))
    source.reset()
    hash_files(source, source.list_files(), HashCache(store, source.url))
    assert source.reads == []
    store.close()

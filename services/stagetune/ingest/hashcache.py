"""Remember content hashes, so re-ingesting an unchanged dataset reads no image twice.

Ingest must hash every file (the hash keys the caches and the manifest), but on a 100k-image S3
dataset reading every object again on each run costs far more than the listing that tells us nothing
changed. The cache maps (source, relative path) to the xxh3-128 of the bytes together with the
size, mtime and ETag it was computed for; a file is trusted only while all three still match.

Layout in the store, one folder per source (`xxh3_64` of its url, so paths and endpoints never
leak into keys):

    manifests/hashcache/<xxh3_64(source url)>/<written_ns:020d>-<random>.json

Every object is an independent *segment* of entries ``[relative, size, mtime_ns, etag, digest,
written_ns]``; a reader lists the folder and merges all segments, the newest entry per relative path
winning. A writer only ever adds new segments (one or more per `save`, each at most
`segment_entries` entries), so concurrent writers cannot overwrite each other. When a writer has
loaded more than `compact_after` segments it compacts: it writes everything it knows as new
segments first, and only then deletes the segments it loaded. An entry is therefore deleted only
after a copy of it is durable; segments written meanwhile by others are not touched, and a reader
that loses a race with a compaction (a listed segment has vanished) simply lists again.

Local files whose mtime is within `racy_window_ns` of the moment they were hashed are not cached:
a same-size rewrite within the file system's timestamp granularity would otherwise keep a stale
hash (git's "racily clean" problem). S3 objects carry an ETag, which changes with the content.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from stagetune.core.errors import NotFoundError
from stagetune.core.manifest import hash_bytes
from stagetune.core.sources import Source, SourceFile, read_many
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)

FORMAT = "stagetune.hashcache/1"
ROOT = "manifests/hashcache"

ReadMany = Callable[..., Iterator[tuple[str, bytes | Exception]]]


def cache_prefix(source_url: str) -> str:
    return f"{ROOT}/{xxhash.xxh3_64_hexdigest(source_url.encode('utf-8'))}/"


@dataclass(frozen=True)
class _Entry:
    size: int
    mtime_ns: int
    etag: str | None
    digest: str
    written_ns: int

    def matches(self, file: SourceFile) -> bool:
        return self.size == file.size and self.mtime_ns == file.mtime_ns and self.etag == file.etag


class HashCache:
    """Content hashes of one source's files, persisted in the store as mergeable segments."""

    def __init__(
        self,
        store: Store,
        source_url: str,
        *,
        segment_entries: int = 50_000,
        compact_after: int = 8,
        racy_window_ns: int = 2_000_000_000,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.store = store
        self.source_url = source_url
        self.prefix = cache_prefix(source_url)
        self.segment_entries = max(1, int(segment_entries))
        self.compact_after = max(1, int(compact_after))
        self.racy_window_ns = racy_window_ns
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, _Entry] = {}
        #: Our segments the merged view came from; the ones a compaction may delete.
        self._segments: list[str] = []
        self._dropped = False
        self.loaded = False

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"HashCache({self.source_url!r}, {len(self._entries)} entries, store {self.store.url!r})"

    # -- reading --------------------------------------------------------------------------------

    def load(self) -> HashCache:
        """Merge every segment in the store into memory (entries put since are kept)."""
        for _attempt in range(5):
            try:
                self._load_once()
                break
            except _SegmentVanished as exc:
                log.debug("hash cache %s: %s was compacted away while loading; listing again", self.prefix, exc)
        else:
            log.warning("hash cache %s: segments kept vanishing while loading; using what was read", self.prefix)
        self.loaded = True
        return self

    def _load_once(self) -> None:
        entries: dict[str, _Entry] = {}
        segments: list[str] = []
        for key in self.store.list(self.prefix):
            if not key.endswith(".json"):
                continue
            try:
                raw = self.store.get_bytes(key)
            except NotFoundError as exc:
                raise _SegmentVanished(key) from exc
            rows = _parse_segment(raw, key)
            if rows is None:
                continue  # another format (a newer stagetune): leave it alone, never delete it
            segments.append(key)
            for relative, entry in rows:
                _merge(entries, relative, entry)
        with self._lock:
            for relative, entry in self._pending.items():
                _merge(entries, relative, entry)
            self._entries = entries
            self._segments = segments

    def get(self, file: SourceFile) -> str | None:
        """The digest computed for exactly this size/mtime/ETag of the file, else None."""
        entry = self._entries.get(file.relative)
        return entry.digest if entry is not None and entry.matches(file) else None

    # -- writing --------------------------------------------------------------------------------

    def put(self, file: SourceFile, digest: str) -> bool:
        """Remember a digest; False when the file is too freshly modified to be trusted later."""
        now = self._clock()
        if file.etag is None and now - file.mtime_ns < self.racy_window_ns:
            return False
        entry = _Entry(size=file.size, mtime_ns=file.mtime_ns, etag=file.etag, digest=digest, written_ns=now)
        with self._lock:
            current = self._entries.get(file.relative)
            if current is not None and current.matches(file) and current.digest == digest:
                return True  # already known: nothing to write
            self._entries[file.relative] = entry
            self._pending[file.relative] = entry
        return True

    def retain(self, relatives: Iterable[str]) -> int:
        """Forget files no longer in the dataset (pass the full listing); the next save compacts."""
        keep = set(relatives)
        with self._lock:
            gone = [r for r in self._entries if r not in keep]
            for relative in gone:
                del self._entries[relative]
                self._pending.pop(relative, None)
            if gone:
                self._dropped = True
        return len(gone)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def save(self, *, compact: bool | None = None) -> int:
        """Write new entries as fresh segments (compacting when too many); returns entries written.

        Never rewrites an existing object, so two runs saving at once both keep their entries.
        """
        with self._lock:
            if compact is None:
                compact = self._dropped or len(self._segments) + 1 > self.compact_after
            if compact and not self._segments and not self._dropped:
                compact = False  # nothing to fold together
            if not self._pending and not compact:
                return 0
            rows = self._entries if compact else self._pending
            snapshot = sorted(rows.items())
            written = self._write_segments(snapshot)
            if compact:
                # Everything the old segments held is now in the new ones: only now may they go.
                for key in self._segments:
                    self.store.delete(key)
                self._segments = written
                self._dropped = False
            else:
                self._segments.extend(written)
            self._pending = {}
            return len(snapshot)

    def _write_segments(self, rows: Sequence[tuple[str, _Entry]]) -> list[str]:
        keys: list[str] = []
        for start in range(0, len(rows), self.segment_entries):
            chunk = rows[start : start + self.segment_entries]
            body = {
                "format": FORMAT,
                "source": self.source_url,
                "entries": [[r, e.size, e.mtime_ns, e.etag, e.digest, e.written_ns] for r, e in chunk],
            }
            key = f"{self.prefix}{self._clock():020d}-{uuid.uuid4().hex[:12]}.json"
            self.store.put_bytes(key, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
            keys.append(key)
        return keys


class _SegmentVanished(Exception):
    """A listed segment was deleted by a concurrent compaction before we read it."""


def _merge(entries: dict[str, _Entry], relative: str, entry: _Entry) -> None:
    current = entries.get(relative)
    if current is None or entry.written_ns >= current.written_ns:
        entries[relative] = entry


def _parse_segment(raw: bytes, key: str) -> list[tuple[str, _Entry]] | None:
    """Rows of one segment; None (and a warning) for anything that is not our format: a cache never fails a run."""
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            log.warning("hash cache segment %s is not %s; ignored", key, FORMAT)
            return None
        rows: list[tuple[str, _Entry]] = []
        for relative, size, mtime_ns, etag, digest, written_ns in body["entries"]:
            rows.append((str(relative), _Entry(int(size), int(mtime_ns), etag, str(digest), int(written_ns))))
        return rows
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("hash cache segment %s is unreadable (%s); ignored", key, exc)
        return None


# -- hashing a listing --------------------------------------------------------------------------------


class Hashed(NamedTuple):
    """A file's digest; `data` only when it had to be read (so ingest can parse its header for free)."""

    digest: str | None
    data: bytes | None
    error: Exception | None = None


def iter_hashed(
    source: Source,
    files: Sequence[SourceFile],
    cache: HashCache,
    read_many: ReadMany = read_many,
    *,
    max_workers: int = 8,
    save_every: int = 10_000,
) -> Iterator[tuple[SourceFile, Hashed]]:
    """Yield `(file, Hashed)` in the order of `files`, reading only files the cache does not vouch for.

    Streaming keeps memory flat on big datasets (each read's bytes live until the caller moves on);
    new digests are saved every `save_every` files and at the end, also when the caller stops early,
    so an interrupted first ingest keeps the work it did.
    """
    if not cache.loaded:
        cache.load()
    cached = [cache.get(f) for f in files]
    to_read = [f.path for f, digest in zip(files, cached, strict=True) if digest is None]
    reads = iter(read_many(source, to_read, max_workers=max_workers)) if to_read else iter(())
    try:
        for file, digest in zip(files, cached, strict=True):
            if digest is not None:
                yield file, Hashed(digest, None)
                continue
            path, result = next(reads)
            if path != file.path:  # a read_many that reorders would pair bytes with the wrong file
                raise RuntimeError(f"read_many returned {path!r} where {file.path!r} was expected")
            if isinstance(result, Exception):
                yield file, Hashed(None, None, result)
                continue
            digest = hash_bytes(result)  # the manifest's content hash: one function for both
            cache.put(file, digest)
            if cache.pending >= save_every:
                cache.save()
            yield file, Hashed(digest, result)
    finally:
        close = getattr(reads, "close", None)
        if close is not None:
            close()
        try:
            cache.save()
        except Exception as exc:  # noqa: BLE001 - losing the cache costs time, not correctness
            log.warning("could not save the hash cache of %s: %s", cache.source_url, exc)


def hash_files(
    source: Source,
    files: Sequence[SourceFile],
    cache: HashCache,
    read_many: ReadMany = read_many,
    *,
    max_workers: int = 8,
    keep_bytes: bool = True,
) -> dict[str, Hashed]:
    """`{relative: Hashed(digest, bytes or None, error)}` for all `files`; bytes only for files that were read.

    Holds every read file's bytes when `keep_bytes`; for big datasets prefer `iter_hashed`.
    """
    out: dict[str, Hashed] = {}
    for file, hashed in iter_hashed(source, files, cache, read_many, max_workers=max_workers):
        out[file.relative] = hashed if keep_bytes or hashed.data is None else hashed._replace(data=None)
    return out


__all__ = ["FORMAT", "ROOT", "HashCache", "Hashed", "cache_prefix", "hash_files", "iter_hashed"]

"""The sharded tensor cache behind VAE latents and text embeddings.

One object per sample is far too slow on S3, so entries are batched `write_batch_size` to a shard
(SimpleTuner's knob). Layout under a cache prefix:

    <prefix>/shards/<shard_id>.safetensors   tensors named `<key>/<name>`
    <prefix>/index/<shard_id>.json           {"format": ..., "shard": id, "keys": [...]}

Why it stays valid with no locks and no coordinator:

* Shard ids are a hash of the shard's keys plus a random part, so two writers (pods, processes,
  threads) never write the same object, even when they encode the same keys.
* A shard is written before its index file, and both writes are atomic (see `Store`), so every
  index entry points at a whole shard. A writer killed in between leaves an orphan shard that no
  index names: its entries are simply absent and get encoded again next time.
* Entries are content-addressed: if two writers race on a key, both values are equal, and readers
  pick one deterministically.

Index files are immutable, so `refresh` only reads the ones it has not seen.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import safetensors
import safetensors.torch
import torch

from stagetune.core.errors import CorruptError, NotFoundError
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)

FORMAT = "stagetune-cache-shard/1"
SHARDS = "shards"
INDEX = "index"
_SHARD_SUFFIX = ".safetensors"
_INDEX_SUFFIX = ".json"


@dataclasses.dataclass
class CacheStats:
    """What a writer put in the store (reported by the encoder services and their metrics)."""

    bytes_written: int = 0
    entries_written: int = 0
    shards_written: int = 0


class _Shard:
    """A readable shard: tensor names grouped by entry key, read lazily or from decoded bytes."""

    def __init__(self, names: Iterable[str]) -> None:
        self.by_key: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for full in names:
            key, sep, name = full.partition("/")
            if sep:
                self.by_key[key].append((name, full))

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _MappedShard(_Shard):
    """A shard memory-mapped from a local file: no read of the whole shard, only the entry asked for.

    safetensors hands back the same mapped tensor on every `get_tensor`, so each read is cloned:
    a trainer scaling latents in place must not change what the next epoch reads.
    """

    def __init__(self, path: str) -> None:
        self._handle = safetensors.safe_open(path, framework="pt")
        self._lock = threading.Lock()
        super().__init__(self._handle.keys())

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        with self._lock:
            return {name: self._handle.get_tensor(full).clone() for name, full in self.by_key[key]}


class _LoadedShard(_Shard):
    """A shard fetched whole (S3): decoded once, each read gets its own copy so callers may mutate it."""

    def __init__(self, data: bytes) -> None:
        self._tensors = safetensors.torch.load(data)
        super().__init__(self._tensors.keys())

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        return {name: self._tensors[full].clone() for name, full in self.by_key[key]}


class ShardedCache:
    """Read side of a cache prefix, plus `writer()` to add entries to it."""

    def __init__(self, store: Store, prefix: str, *, max_open_shards: int = 4) -> None:
        prefix = prefix.strip("/")
        if not prefix:
            raise ValueError("a cache needs a non-empty prefix")
        self.store = store
        self.prefix = prefix
        self.max_open_shards = max(1, max_open_shards)
        self._index: dict[str, str] = {}  # entry key -> shard id
        self._seen_index_files: set[str] = set()
        self._open: collections.OrderedDict[str, _Shard] = collections.OrderedDict()
        self._lock = threading.RLock()
        self.refresh()

    # -- keys in the store ----------------------------------------------------------------------

    def shard_key(self, shard_id: str) -> str:
        return f"{self.prefix}/{SHARDS}/{shard_id}{_SHARD_SUFFIX}"

    def index_key(self, shard_id: str) -> str:
        return f"{self.prefix}/{INDEX}/{shard_id}{_INDEX_SUFFIX}"

    # -- index ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up shards other writers finished since the last refresh (new index files only)."""
        index_prefix = f"{self.prefix}/{INDEX}/"
        new = [
            key
            for key in self.store.list(index_prefix)
            if key.endswith(_INDEX_SUFFIX) and key not in self._seen_index_files
        ]
        if not new:
            return
        if len(new) > 8:
            # Many small GETs: overlap their latency (S3); harmless on a local folder.
            with ThreadPoolExecutor(max_workers=8) as pool:
                bodies = list(pool.map(self._read_index_file, new))
        else:
            bodies = [self._read_index_file(key) for key in new]
        with self._lock:
            # Listing order is sorted, so the shard a duplicated key resolves to is deterministic.
            for index_file, (shard_id, keys) in zip(new, bodies, strict=True):
                self._seen_index_files.add(index_file)
                if shard_id is None:
                    continue
                for key in keys:
                    self._index.setdefault(key, shard_id)

    def _read_index_file(self, index_file: str) -> tuple[str | None, list[str]]:
        shard_id = index_file.rsplit("/", 1)[-1][: -len(_INDEX_SUFFIX)]
        try:
            body = json.loads(self.store.get_bytes(index_file))
        except NotFoundError:
            return None, []  # deleted between list and get (cache being cleared)
        except ValueError as exc:
            raise CorruptError(f"cache index {index_file!r} in {self.store.url} is not valid JSON: delete it (and its "
                               "shard) and the entries are encoded again", field="cache") from exc
        keys = body.get("keys") if isinstance(body, dict) else body
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CorruptError(f"cache index {index_file!r} in {self.store.url} has no list of keys: delete it (and "
                               "its shard) and the entries are encoded again", field="cache")
        return shard_id, keys

    def _register(self, shard_id: str, keys: Iterable[str]) -> None:
        with self._lock:
            self._seen_index_files.add(self.index_key(shard_id))
            for key in keys:
                self._index.setdefault(key, shard_id)

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.has(key)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys not cached yet, first occurrence order, each once: the work list for an encoder."""
        seen: set[str] = set()
        out: list[str] = []
        with self._lock:
            for key in keys:
                if key not in seen and key not in self._index:
                    seen.add(key)
                    out.append(key)
        return out

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(sorted(self._index))

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- reads ----------------------------------------------------------------------------------

    def _shard(self, shard_id: str) -> _Shard:
        with self._lock:
            shard = self._open.get(shard_id)
            if shard is not None:
                self._open.move_to_end(shard_id)
                return shard
        shard = self._load_shard(shard_id)
        with self._lock:
            self._open[shard_id] = shard
            self._open.move_to_end(shard_id)
            while len(self._open) > self.max_open_shards:
                _, old = self._open.popitem(last=False)
                old.close()
        return shard

    def _load_shard(self, shard_id: str) -> _Shard:
        key = self.shard_key(shard_id)
        missing = NotFoundError(
            f"cache shard {key!r} is listed in the index of {self.prefix!r} but missing"
            f" from {self.store.url}",
            field="shard",
        )
        path = self.store.local_path(key)
        if path is not None:
            if not path.is_file():
                raise missing
            return _MappedShard(str(path))
        try:
            data = self.store.get_bytes(key)
        except NotFoundError as exc:
            raise missing from exc
        return _LoadedShard(data)

    def _no_entry(self, key: str) -> NotFoundError:
        return NotFoundError(f"no entry {key!r} in cache {self.prefix!r} of {self.store.url}", field="key")

    def get(self, key: str) -> dict[str, torch.Tensor]:
        with self._lock:
            shard_id = self._index.get(key)
        if shard_id is None:
            raise self._no_entry(key)
        return self._shard(shard_id).tensors(key)

    def get_many(self, keys: Iterable[str]) -> list[dict[str, torch.Tensor]]:
        """Like `get` for each key, in order, but opening each shard once however keys interleave."""
        keys = list(keys)
        with self._lock:
            shard_ids = [self._index.get(k) for k in keys]
        for key, shard_id in zip(keys, shard_ids, strict=True):
            if shard_id is None:
                raise NotFoundError(
                    f"no entry {key!r} in cache {self.prefix!r} of {self.store.url}", field="key"
                )
        by_shard: dict[str, list[int]] = collections.defaultdict(list)
        for i, shard_id in enumerate(shard_ids):
            by_shard[shard_id].append(i)  # type: ignore[index]
        out: list[dict[str, torch.Tensor]] = [{} for _ in keys]
        for shard_id, positions in by_shard.items():
            shard = self._shard(shard_id)
            for i in positions:
                out[i] = shard.tensors(keys[i])
        return out

    def close(self) -> None:
        with self._lock:
            for shard in self._open.values():
                shard.close()
            self._open.clear()

    # -- writes ---------------------------------------------------------------------------------

    def writer(self, write_batch_size: int = 128, *, flush_when_full: bool = True) -> CacheWriter:
        return CacheWriter(self, write_batch_size, flush_when_full=flush_when_full)


class CacheWriter:
    """Buffers entries and writes them a shard at a time; use as a context manager.

    With `flush_when_full=False` nothing is written before `flush()`/`close()`: the caller decides when
    (and on which thread) the shard goes out.
    """

    def __init__(self, cache: ShardedCache, write_batch_size: int = 128, *, flush_when_full: bool = True) -> None:
        if write_batch_size < 1:
            raise ValueError(f"write_batch_size must be at least 1, got {write_batch_size}")
        self.cache = cache
        self.write_batch_size = write_batch_size
        self.stats = CacheStats()
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._closed = False
        self._flush_when_full = flush_when_full

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one entry; tensors are copied now, so the caller may reuse its buffers at once."""
        if self._closed:
            raise RuntimeError("cache writer is closed")
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"cache entry key {key!r} must be a non-empty string without '/'")
        if not tensors:
            raise ValueError(f"cache entry {key!r} has no tensors; an empty entry cannot be stored")
        entry: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"cache entry {key!r}: tensor names must be non-empty strings, got {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"cache entry {key!r}/{name}: expected a torch.Tensor, got {type(tensor)}")
            # One copy to contiguous CPU memory of its own: safetensors refuses views and shared storage.
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            copy.copy_(tensor.detach())
            entry[name] = copy
        self._pending[key] = entry
        if self._flush_when_full and len(self._pending) >= self.write_batch_size:
            self.flush()

    def flush(self) -> None:
        """Write pending entries as one shard, then its index; on failure they stay pending."""
        if not self._pending:
            return
        keys = list(self._pending)
        digest = hashlib.blake2b("\n".join(sorted(keys)).encode(), digest_size=10).hexdigest()
        shard_id = f"{digest}-{uuid.uuid4().hex[:12]}"
        flat = {f"{key}/{name}": t for key, entry in self._pending.items() for name, t in entry.items()}
        data = safetensors.torch.save(flat, metadata={"format": "pt", "stagetune": FORMAT})
        index = json.dumps({"format": FORMAT, "shard": shard_id, "keys": keys}).encode()
        cache = self.cache
        cache.store.put_bytes(cache.shard_key(shard_id), data)
        cache.store.put_bytes(cache.index_key(shard_id), index)
        cache._register(shard_id, keys)
        self.stats.bytes_written += len(data) + len(index)
        self.stats.entries_written += len(keys)
        self.stats.shards_written += 1
        self._pending.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def discard(self) -> None:
        """Drop pending entries unwritten and close: another writer owns them now (a lost lease)."""
        self._pending.clear()
        self._closed = True

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Keep what was added even when the encoder failed half-way: it is valid work."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - do not hide the error that stopped the encoder
            log.exception("could not flush the cache writer for %r after an error", self.cache.prefix)
        finally:
            self._closed = True

"""The shared shape of a caching stage: find what is missing, encode it in batches, write shards.

Both encoder services (latents, text embeddings) are this loop with a different encoder, so a cache
hit costs one index lookup and a second run over the same data encodes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from stagetune.core import metrics
from stagetune.core.cache import ShardedCache
from stagetune.core.errors import StagetuneError
from stagetune.core.leases import Leases, Outcome, unit_id

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclasses.dataclass
class EncodeStats:
    total: int = 0
    hits: int = 0
    encoded: int = 0
    shared: int = 0  # needed here but encoded meanwhile by another replica (total = hits + encoded + shared)
    bytes_written: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # loading the encoder, only when something had to be encoded

    def as_outputs(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def encode_missing(
    *,
    stage: str,
    items: Sequence[Item],
    key_of: Callable[[Item], str],
    cache: ShardedCache,
    batches: Callable[[list[Item]], Iterable[list[Item]]],
    encode: Callable[..., list[dict[str, torch.Tensor]]],
    write_batch_size: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
    load: Callable[[], object] = lambda: None,
    lease_ttl: float | None = None,
    owner: str | None = None,
    prepare: Callable[[list[Item]], object] | None = None,
    torch_threads: int | None = None,
) -> EncodeStats:
    """Encode the items whose key is not in `cache` yet; each distinct key is encoded once.

    Replicas running this on the same items split the work: it is cut into units of one shard each,
    in an order every replica computes alike, and a unit is encoded only under its lease (see
    `stagetune.core.leases`). The call returns once every key is in the cache, whoever encoded it,
    because the next stage needs them all. `lease_ttl` defaults to `$STAGETUNE_LEASE_TTL_S` or 30 s.

    With `prepare`, the encoder's input is made ahead: while batch *n* is encoded, `prepare` runs on
    batches *n+1* and *n+2* in a background thread, and `encode(batch, prepare(batch))` is called.
    Decoding images releases the GIL, so it overlaps the forward pass instead of alternating with it.
    `torch_threads` is the encoder's thread count (default `PROCESS_THREADS`; see `compute_threads`).
    """
    started = time.perf_counter()
    if write_batch_size < 1:
        raise ValueError(f"write_batch_size must be at least 1, got {write_batch_size}")
    cache.refresh()
    unique: dict[str, Item] = {}
    for item in items:
        unique.setdefault(key_of(item), item)
    missing = set(cache.missing(unique))
    stats = EncodeStats(total=len(unique), hits=len(unique) - len(missing))
    metrics.CACHE_HITS.labels(stage).inc(stats.hits)
    progress(stats.hits, stats.total)
    if missing:
        with contextlib.ExitStack() as stack:
            stack.enter_context(compute_threads(torch_threads))
            if prepare is None:
                unit_encoder = _plain(encode)
            else:
                ahead = stack.enter_context(helper_threads(1, f"{stage}-prepare"))
                unit_encoder = _staged(encode, prepare, ahead)
            _encode_under_leases(stage, unique, missing, key_of, cache, batches, unit_encoder, write_batch_size,
                                 progress, load, stats, Leases(cache.store, cache.prefix, owner=owner, ttl=lease_ttl))
    metrics.CACHE_BYTES.labels(stage).inc(stats.bytes_written)
    stats.seconds = time.perf_counter() - started
    return stats


#: torch's intra-op thread count as the process started, read before any job sets one.
PROCESS_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def compute_threads(count: int | None = None) -> Iterator[None]:
    """Run the block with this thread's torch thread count set explicitly (default: `PROCESS_THREADS`).

    `torch.set_num_threads` also sets the count that threads started later take on, so a count set by
    one job leaks into others. Every thread that computes therefore sets its own, as a fixed function of
    the machine and the stage, never of timing: results can depend on the count, and two runs of one
    config must give the same bits.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count or PROCESS_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def helper_threads(count: int, name: str) -> ThreadPoolExecutor:
    """A pool for work beside the encoder (decoding, tokenising, writing shards).

    What runs there stays out of torch's compute (numpy, Pillow, tokenizers, I/O): a thread's first torch
    op starts OpenMP workers of its own, which spin on the cores the encoder needs. Nor do helpers set
    torch's thread count: that setting leaks into threads started later (see `compute_threads`).
    """
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)


#: How many batches `prepare` runs ahead of the encoder.
LOOKAHEAD = 2

#: Encodes a unit's batches in order: `(batches) -> iterator of each batch's outputs`.
UnitEncoder = Callable[[list[list[Item]]], Iterator[list[dict[str, torch.Tensor]]]]


def _plain(encode: Callable[[list[Item]], list[dict[str, torch.Tensor]]]) -> UnitEncoder:
    def run(batches: list[list[Item]]) -> Iterator[list[dict[str, torch.Tensor]]]:
        for batch in batches:
            with torch.inference_mode():
                yield encode(batch)

    return run


def _staged(encode: Callable[..., list[dict[str, torch.Tensor]]], prepare: Callable[[list[Item]], object],
            ahead: ThreadPoolExecutor) -> UnitEncoder:
    def run(batches: list[list[Item]]) -> Iterator[list[dict[str, torch.Tensor]]]:
        queued: deque[Future[object]] = deque()
        try:
            for index, batch in enumerate(batches):
                while len(queued) < LOOKAHEAD + 1 and index + len(queued) < len(batches):
                    queued.append(ahead.submit(prepare, batches[index + len(queued)]))
                prepared = queued.popleft().result()
                with torch.inference_mode():
                    outputs = encode(batch, prepared)
                yield outputs
        finally:  # a lost lease or an error: do not keep decoding batches nobody will encode
            for future in queued:
                future.cancel()

    return run


def _units(unique: dict[str, Item], key_of: Callable[[Item], str],
           batches: Callable[[list[Item]], Iterable[list[Item]]], unit_size: int) -> dict[str, list[str]]:
    """Every key (cached or not) cut into units of `unit_size`, in the encoder's batch order.

    Units are cut from all keys, not the missing ones, so a replica that starts late (and sees fewer
    missing) still names the same units as one that started early. Following the batch order keeps
    a unit's batches full (the VAE batches by image size), and that order does not depend on the
    batch size, so replicas configured differently still agree.
    """
    ordered = [key_of(item) for batch in batches([unique[k] for k in sorted(unique)]) for item in batch]
    if len(ordered) != len(unique) or set(ordered) != unique.keys():
        ordered = sorted(unique)  # a `batches` that drops or repeats items: fall back to key order
    cut = [ordered[i : i + unit_size] for i in range(0, len(ordered), unit_size)]
    return {unit_id(keys): keys for keys in cut}


def _encode_under_leases(
    stage: str,
    unique: dict[str, Item],
    missing: set[str],
    key_of: Callable[[Item], str],
    cache: ShardedCache,
    batches: Callable[[list[Item]], Iterable[list[Item]]],
    encode: UnitEncoder,
    write_batch_size: int,
    progress: Callable[[int, int], None],
    load: Callable[[], object],
    stats: EncodeStats,
    leases: Leases,
) -> None:
    units = _units(unique, key_of, batches, write_batch_size)
    loaded = False
    sealing: Future[None] | None = None

    def sealed() -> None:  # one shard in flight at most: memory stays bounded and errors surface early
        nonlocal sealing
        if sealing is not None:
            done, sealing = sealing, None
            done.result()

    with leases, helper_threads(1, f"{stage}-write") as writes:
        try:
            for _attempt in range(3):
                pending = _in_starting_order(units, missing, leases.owner)
                while pending:
                    still: list[str] = []
                    for unit in pending:
                        result = leases.claim(unit)
                        if result.outcome is Outcome.HELD:
                            still.append(unit)
                            continue
                        if result.outcome is Outcome.DONE:
                            _count_shared(stage, units[unit], missing, stats, progress)
                            continue
                        if result.stale:
                            cache.refresh()  # a dead or interrupted holder may have flushed part of it
                        todo = [k for k in units[unit] if k in missing and not cache.has(k)]
                        _count_shared(stage, [k for k in units[unit] if k not in todo], missing, stats, progress)
                        if todo and not loaded:
                            _timed_load(load, stats)
                            loaded = True
                        seal = _encode_unit(stage, unit, todo, unique, key_of, cache, batches, encode, progress,
                                            stats, leases)
                        if seal is None:
                            still.append(unit)  # taken over while this replica stalled: the taker finishes it
                        else:
                            sealed()
                            sealing = writes.submit(_seal_and_finish, leases, unit, seal)
                    pending = still
                    if pending:
                        time.sleep(leases.poll_s)  # the rest is held by live replicas: look again shortly
                        progress(stats.hits + stats.encoded + stats.shared, stats.total)  # notices cancellation
                sealed()
                # Done markers are hints; the index is the truth. Keys still absent (an index pruned by
                # hand under an old done marker) go round again.
                cache.refresh()
                absent = {k for k in missing if not cache.has(k)}
                if not absent:
                    return
                _forget_done(units, absent, leases)
                missing = absent
        finally:
            _let_last_shard_land(sealing, stage)  # an error above: still let the last shard land (valid work)
    raise StagetuneError(f"{len(missing)} {stage} cache entries are still missing from {cache.prefix!r} "
                         f"in {cache.store.url} after three rounds of encoding")


def _in_starting_order(units: dict[str, list[str]], missing: set[str], owner: str) -> list[str]:
    """The units with a missing key, rotated by this replica's owner name.

    Replicas start at different units, so they seldom contend for the same one.
    """
    pending = [unit for unit, keys in units.items() if any(k in missing for k in keys)]
    offset = int(hashlib.blake2b(owner.encode(), digest_size=4).hexdigest(), 16) % len(pending)
    return pending[offset:] + pending[:offset]


def _timed_load(load: Callable[[], object], stats: EncodeStats) -> None:
    """Load the encoder, counting the time apart: only a replica with something to encode pays for it."""
    load_started = time.perf_counter()
    load()
    stats.load_seconds = time.perf_counter() - load_started


def _seal_and_finish(leases: Leases, unit: str, seal: Callable[[], bool]) -> None:
    """On the write thread: the unit is done only once its shard and index are written under the lease."""
    if seal():
        leases.finish(unit)


def _forget_done(units: dict[str, list[str]], absent: set[str], leases: Leases) -> None:
    """Clear the done marker of every unit with an absent key, so the next round claims it again."""
    for unit, keys in units.items():
        if any(k in absent for k in keys):
            leases.forget_done(unit)


def _let_last_shard_land(sealing: Future[None] | None, stage: str) -> None:
    """Wait for the shard still being written after an error, without hiding that error."""
    if sealing is not None:
        try:
            sealing.result()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            log.warning("could not write the last %s shard", stage, exc_info=True)


def _count_shared(stage: str, keys: list[str], missing: set[str], stats: EncodeStats,
                  progress: Callable[[int, int], None]) -> None:
    """Keys this job needed that another replica (or an earlier, interrupted holder) encoded."""
    shared = 0
    for key in keys:
        if key in missing:
            missing.discard(key)
            shared += 1
    if shared:
        stats.shared += shared
        metrics.CACHE_HITS.labels(stage).inc(shared)
        progress(stats.hits + stats.encoded + stats.shared, stats.total)


def _encode_unit(
    stage: str,
    unit: str,
    todo: list[str],
    unique: dict[str, Item],
    key_of: Callable[[Item], str],
    cache: ShardedCache,
    batches: Callable[[list[Item]], Iterable[list[Item]]],
    encode: UnitEncoder,
    progress: Callable[[int, int], None],
    stats: EncodeStats,
    leases: Leases,
) -> Callable[[], bool] | None:
    """Encode one held unit; None if the lease was lost, so the unit is not done here.

    The returned `seal()` writes the unit's shard and its index; it returns False if the lease was lost
    meanwhile (the shard is then discarded, the taker writes it). It is called on the write thread while
    the next unit encodes: shard uploads (seconds per shard on S3 at real model sizes) overlap encoding.
    """
    if not todo:
        return lambda: True
    writer = cache.writer(len(todo), flush_when_full=False)
    planned = list(batches([unique[k] for k in todo]))
    encoded = encode(planned)
    try:
        for batch in planned:
            if leases.lost(unit):
                writer.discard()  # the taker encodes them; flushing too would index them twice
                return None
            batch_started = time.perf_counter()
            outputs = next(encoded)
            for item, tensors in zip(batch, outputs, strict=True):
                writer.add(key_of(item), tensors)
            stats.encoded += len(batch)
            metrics.ITEMS_ENCODED.labels(stage).inc(len(batch))
            metrics.BATCH_SECONDS.labels(stage).observe(time.perf_counter() - batch_started)
            progress(stats.hits + stats.encoded + stats.shared, stats.total)
        if leases.lost(unit):
            writer.discard()
            return None
    except BaseException:
        # Keep what was encoded (valid work) and tell the next holder to re-read the index.
        flushed = writer.pending > 0
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - do not hide the error that stopped the encoder
            log.exception("could not flush the cache writer for %r after an error", cache.prefix)
            flushed = False
        finally:
            stats.bytes_written += writer.stats.bytes_written
        try:
            leases.release(unit, dirty=flushed)
        except Exception:  # noqa: BLE001
            log.warning("could not release lease on unit %s", unit, exc_info=True)
        raise
    finally:
        encoded.close()

    def seal() -> bool:
        if leases.lost(unit):
            writer.discard()
            return False
        try:
            writer.close()
        except BaseException:
            try:
                leases.release(unit, dirty=True)  # the index may or may not have been written
            except Exception:  # noqa: BLE001 - the write error is the one to report
                log.warning("could not release lease on unit %s", unit, exc_info=True)
            raise
        finally:
            stats.bytes_written += writer.stats.bytes_written
        return True

    return seal


def chunks(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start : start + size])

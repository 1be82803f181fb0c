"""Leases on work units in the store, so encoder replicas on one manifest split the work.

Helm scales the vae and text Deployments by replicas, and a Kubernetes Service sends one job to each,
so two replicas often get the same manifest. Content addressing already keeps them *correct* (equal
keys, equal values); leases keep them from doing the same work twice.

The store offers only atomic put/get/list/delete of whole objects. S3 has no compare-and-swap (and
conditional PUTs are not portable across MinIO, SeaweedFS, Ceph and cloud S3), so a lease cannot be
one object that claimants race to overwrite. Instead every claimant writes its *own* object and the
claim is decided by Lamport's bakery algorithm, which needs nothing but single-writer registers and a
consistent listing::

    <cache prefix>/leases/<unit>/claim-<owner>.json   one per claimant: state, ticket number, heartbeat
    <cache prefix>/leases/<unit>/done.json            the unit's keys are in the cache index
    <cache prefix>/leases/<unit>/dirty.json           a holder stopped after flushing part of the unit

To claim a unit: write my claim as `choosing`; list the unit's claims; take ticket 1 + the largest
ticket seen; rewrite my claim as `ready` with that ticket; list again, waiting out any claimant still
`choosing`. I hold the unit if no live ready claim has a smaller (ticket, owner); otherwise I delete
my claim and move on to other units (I never wait for a holder: there is other work). Why it is
exclusive: if A holds the unit, any B that starts later lists A's ready claim while choosing and takes
a larger ticket, so it loses; two that choose concurrently see each other and compare the same pair.

A holder rewrites its claim every ttl/3 (`beat` + 1). A claim whose content has not changed for a
whole ttl, *measured on the observer's own monotonic clock*, belongs to a dead replica: it is deleted
and the unit claimed again. No wall clocks are compared, so clock skew between machines is harmless.

Honest limits: exclusivity holds while the store's listings show every completed put (true of AWS S3
since 2020, MinIO, SeaweedFS and a local folder) and while a live holder renews within its ttl. A
holder stalled longer than its ttl (a long GC pause, a network partition) may be taken over while it
still works; it notices at its next renewal and drops its unflushed entries, but what it already
flushed may be encoded a second time by the taker. That costs compute, never correctness: entries are
content-addressed and the cache index tolerates duplicates.

A claimant that finds a unit done removes any claims still on it (left by a replica killed between
writing done.json and deleting its claim), so finished work leaves only its done marker behind.

Lease objects are written with `durable=False` (no fsync on a local store): losing one in a power cut
frees a unit or forgets a done marker, and the cache index, not the markers, says what is encoded.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from stagetune.core import metrics
from stagetune.core.errors import ConfigError, NotFoundError
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)

ENV_TTL = "STAGETUNE_LEASE_TTL_S"
DEFAULT_TTL_S = 30.0
LEASES = "leases"
FORMAT = "stagetune-lease/1"
_CLAIM = "claim-"
_SUFFIX = ".json"
_DONE = "done.json"
_DIRTY = "dirty.json"
_CHOOSING = "choosing"
_READY = "ready"
#: How often a claimant re-lists while another claimant is half-way through choosing its ticket.
_CHOOSING_POLL_S = 0.02


def lease_ttl(value: float | None = None) -> float:
    """The ttl to use: the argument, else `$STAGETUNE_LEASE_TTL_S`, else 30 s (tests use about 1 s)."""
    if value is None:
        raw = os.environ.get(ENV_TTL, "").strip()
        if not raw:
            return DEFAULT_TTL_S
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{ENV_TTL}={raw!r} must be a number of seconds", field=ENV_TTL) from None
    if not value > 0:
        raise ConfigError(f"the lease ttl ({ENV_TTL}) must be a positive number of seconds, got {value!r}",
                          field=ENV_TTL)
    return float(value)


def new_owner_id() -> str:
    """Host, pid and a random part: readable in the store, unique even for two jobs in one process."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def unit_id(keys: list[str]) -> str:
    """A work unit is named by its keys, so replicas that list the same keys name the same units."""
    return hashlib.blake2b("\n".join(sorted(keys)).encode(), digest_size=10).hexdigest()


class Outcome(enum.Enum):
    WON = "won"  # this replica holds the unit now
    DONE = "done"  # another replica finished it
    HELD = "held"  # a live replica holds it; try again later


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    outcome: Outcome
    #: A dead holder's claim was removed, or a holder left part of the unit flushed: the caller must
    #: re-read the cache index before encoding, or it would redo that part.
    stale: bool = False


@dataclasses.dataclass(frozen=True)
class _Claim:
    owner: str
    state: str
    number: int
    beat: int
    ttl: float


@dataclasses.dataclass
class _UnitView:
    done: bool = False
    dirty: bool = False
    claims: dict[str, _Claim] = dataclasses.field(default_factory=dict)


class Leases:
    """One replica's leases under a cache prefix; holds units until `finish` or `release`.

    A heartbeat thread renews held units and notices when one was taken over (`lost`). Use as a
    context manager, or call `close`, so a failed job gives its units back at once instead of making
    the other replicas wait a ttl.
    """

    def __init__(self, store: Store, cache_prefix: str, *, owner: str | None = None,
                 ttl: float | None = None) -> None:
        self.store = store
        self.prefix = f"{cache_prefix.strip('/')}/{LEASES}"
        # A bounded metric label: cache/vae/<fingerprint> -> "vae"; the run lock (.stagetune) -> "run".
        parts = cache_prefix.strip("/").split("/")
        self._stage = parts[1] if parts[0] == "cache" and len(parts) > 1 else "run"
        self.owner = owner or new_owner_id()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.owner):
            raise ValueError(f"lease owner {self.owner!r} must be letters, digits, '.', '_' or '-'")
        self.ttl = lease_ttl(ttl)
        #: How often a replica with nothing to claim looks again: a dead holder is noticed within ~1.25 ttl.
        self.poll_s = min(1.0, self.ttl / 4)
        self._held: dict[str, _Claim] = {}
        self._lost: set[str] = set()
        # (unit, owner) -> (what the claim said, when this replica first saw it say that)
        self._seen: dict[tuple[str, str], tuple[_Claim, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- keys ---------------------------------------------------------------------------------------

    def _unit_prefix(self, unit: str) -> str:
        return f"{self.prefix}/{unit}/"

    def _claim_key(self, unit: str, owner: str) -> str:
        return f"{self.prefix}/{unit}/{_CLAIM}{owner}{_SUFFIX}"

    # -- reading a unit -----------------------------------------------------------------------------

    def _view(self, unit: str) -> _UnitView:
        view = _UnitView()
        for key in self.store.list(self._unit_prefix(unit)):
            name = key.rsplit("/", 1)[-1]
            if name == _DONE:
                view.done = True
            elif name == _DIRTY:
                view.dirty = True
            elif name.startswith(_CLAIM) and name.endswith(_SUFFIX):
                owner = name[len(_CLAIM) : -len(_SUFFIX)]
                if owner == self.owner:
                    continue
                try:
                    body = json.loads(self.store.get_bytes(key))
                    claim = _Claim(owner, str(body["state"]), int(body["number"]), int(body["beat"]),
                                   float(body["ttl"]))
                except NotFoundError:
                    continue  # finished or gave up between the list and the get: as good as absent
                except (ValueError, KeyError, TypeError):
                    # Not written by us (puts are atomic): it holds nothing, but is aged like any claim
                    # so a newer writer's format is not deleted on sight.
                    claim = _Claim(owner, "unknown", 0, 0, self.ttl)
                view.claims[owner] = claim
        return view

    def _dead(self, unit: str, claim: _Claim) -> bool:
        """Unchanged for a whole ttl on this replica's clock: its writer stopped renewing."""
        now = time.monotonic()
        seen = self._seen.get((unit, claim.owner))
        if seen is None or seen[0] != claim:
            self._seen[(unit, claim.owner)] = (claim, now)
            return False
        return now - seen[1] > max(self.ttl, claim.ttl)

    def _write_claim(self, unit: str, state: str, number: int, beat: int) -> _Claim:
        # written_at, host and pid are for people, and for a run lock telling a crashed holder (see run_lock.py).
        body = {"format": FORMAT, "owner": self.owner, "unit": unit, "state": state, "number": number,
                "beat": beat, "ttl": self.ttl, "written_at": time.time(), "host": socket.gethostname(),
                "pid": os.getpid()}
        self.store.put_bytes(self._claim_key(unit, self.owner), json.dumps(body).encode(), durable=False)
        return _Claim(self.owner, state, number, beat, self.ttl)

    def _drop_own(self, unit: str) -> None:
        self.store.delete(self._claim_key(unit, self.owner))

    # -- claiming -----------------------------------------------------------------------------------

    def claim(self, unit: str) -> ClaimResult:
        """Try to take `unit` (bakery algorithm, see the module docstring); never waits for a holder."""
        with self._lock:
            if unit in self._held:
                return ClaimResult(Outcome.WON)
        stale = False
        self._write_claim(unit, _CHOOSING, 0, 0)
        try:
            view = self._view(unit)
            if view.done:
                self._drop_own(unit)
                self._sweep(unit, view)
                return ClaimResult(Outcome.DONE)
            number = 1 + max((c.number for c in view.claims.values() if c.state == _READY), default=0)
            mine = self._write_claim(unit, _READY, number, 0)
            while True:
                view = self._view(unit)
                if view.done:
                    self._drop_own(unit)
                    return ClaimResult(Outcome.DONE)
                stale = stale or view.dirty
                choosing = False
                for claim in view.claims.values():
                    if self._dead(unit, claim):
                        log.warning("lease %s/%s: taking over from %s, silent for over %.1fs",
                                    self.prefix, unit, claim.owner, max(self.ttl, claim.ttl))
                        self.store.delete(self._claim_key(unit, claim.owner))
                        metrics.LEASE_TAKEOVERS.labels(self._stage).inc()
                        stale = True
                    elif claim.state == _CHOOSING:
                        choosing = True  # it may yet take a ticket below mine: wait until it has one
                    elif claim.state == _READY and (claim.number, claim.owner) < (number, self.owner):
                        self._drop_own(unit)
                        return ClaimResult(Outcome.HELD)
                if not choosing:
                    break
                time.sleep(_CHOOSING_POLL_S)
        except BaseException:
            self._forget_own(unit)
            raise
        with self._lock:
            self._held[unit] = mine
            self._lost.discard(unit)
        self._start_heartbeat()
        return ClaimResult(Outcome.WON, stale=stale)

    def _sweep(self, unit: str, view: _UnitView) -> None:
        """Remove other claims on a done unit: left by a replica killed between its done marker and
        deleting its claim. Nobody needs a claim on a done unit, a live finisher's included (it deletes
        its own anyway, and deleting twice is fine), so this waits for no ttl."""
        for owner in view.claims:
            try:
                self.store.delete(self._claim_key(unit, owner))
            except Exception:  # noqa: BLE001 - tidying only; the next claimant tries again
                log.debug("could not remove leftover claim of %s on done unit %s", owner, unit, exc_info=True)

    def _forget_own(self, unit: str) -> None:
        try:
            self._drop_own(unit)
        except Exception:  # noqa: BLE001 - already failing; the claim ages out after a ttl
            log.warning("could not remove claim %s", self._claim_key(unit, self.owner), exc_info=True)

    def adopt(self, unit: str) -> bool:
        """Go on renewing a claim this owner id already holds, written by another process (a client that
        took a run lock hands it to the service doing the run). False when there is no such claim."""
        try:
            body = json.loads(self.store.get_bytes(self._claim_key(unit, self.owner)))
            claim = _Claim(self.owner, _READY, int(body["number"]), int(body["beat"]), self.ttl)
        except NotFoundError:
            return False
        except (ValueError, KeyError, TypeError):
            return False
        with self._lock:
            self._held[unit] = claim
            self._lost.discard(unit)
        self._start_heartbeat()
        return True

    def stop_renewing(self, unit: str) -> None:
        """Stop renewing an adopted claim but leave it: the process that took it releases it."""
        with self._lock:
            self._held.pop(unit, None)

    def other_claims(self, unit: str) -> dict[str, dict]:
        """The raw claim objects of other owners on `unit`, keyed by owner (unreadable ones as {})."""
        out: dict[str, dict] = {}
        for key in self.store.list(self._unit_prefix(unit)):
            name = key.rsplit("/", 1)[-1]
            if not (name.startswith(_CLAIM) and name.endswith(_SUFFIX)):
                continue
            owner = name[len(_CLAIM) : -len(_SUFFIX)]
            if owner == self.owner:
                continue
            try:
                body = json.loads(self.store.get_bytes(key))
            except NotFoundError:
                continue
            except ValueError:
                body = {}
            out[owner] = body if isinstance(body, dict) else {}
        return out

    def remove_claim(self, unit: str, owner: str) -> None:
        """Delete another owner's claim that the caller has found dead by its own rule."""
        self.store.delete(self._claim_key(unit, owner))

    def lost(self, unit: str) -> bool:
        """The claim was taken over (this replica stalled past its ttl): stop working on the unit."""
        with self._lock:
            return unit in self._lost

    def finish(self, unit: str) -> None:
        """The unit's keys are in the cache index: say so, then give the claim up."""
        with self._lock:
            self._held.pop(unit, None)
            self.store.put_bytes(f"{self.prefix}/{unit}/{_DONE}", json.dumps({"format": FORMAT}).encode(),
                                 durable=False)
            self._drop_own(unit)

    def release(self, unit: str, *, dirty: bool = False) -> None:
        """Give the unit back unfinished; `dirty` when part of it was flushed, so the next holder re-reads."""
        with self._lock:
            self._held.pop(unit, None)
            if dirty:
                self.store.put_bytes(f"{self.prefix}/{unit}/{_DIRTY}", json.dumps({"format": FORMAT}).encode(),
                                     durable=False)
            self._drop_own(unit)

    def forget_done(self, unit: str) -> None:
        """Remove a done marker whose keys are not in the index (the index was pruned by hand)."""
        self.store.delete(f"{self.prefix}/{unit}/{_DONE}")

    # -- heartbeat ----------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._beat_loop, name=f"lease-{self.owner}", daemon=True)
            self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                for unit, claim in list(self._held.items()):
                    try:
                        if not self.store.exists(self._claim_key(unit, self.owner)):
                            log.warning("lease %s/%s was taken over: dropping the unit", self.prefix, unit)
                            self._lost.add(unit)
                            del self._held[unit]
                            continue
                        self._held[unit] = self._write_claim(unit, _READY, claim.number, claim.beat + 1)
                    except Exception:  # noqa: BLE001 - a store hiccup: try at the next beat, within the ttl
                        log.warning("could not renew lease %s/%s", self.prefix, unit, exc_info=True)

    def close(self) -> None:
        """Stop renewing and give back every unit still held (unfinished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            units = list(self._held)
            self._held.clear()
        for unit in units:
            self._forget_own(unit)

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

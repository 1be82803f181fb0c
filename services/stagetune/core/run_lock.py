"""One run at a time per output_dir: a lock held in the output store for the run's life.

Two runs writing one output_dir would interleave their checkpoints and one would resume the other's
weights. The lock is a lease (core/leases.py: per-claimant objects, exclusive by the bakery algorithm,
renewed every ttl/3), so it works the same on a local folder and on S3 and needs no server:

    <output_dir>/.stagetune/leases/run/claim-<owner>.json

A crash must not lock the folder for good. A fresh process cannot watch a claim for a whole ttl before
deciding, so it judges other claims by what they say: a claim is dead when its process is gone (same
host, no such pid), or when it was last renewed more than `2 × ttl` ago by its own clock (other hosts;
the margin absorbs clock skew). A dead claim is removed and the lock taken; a live one is an
`OutputInUseError` at once, naming the holder.

`stagetune train` takes the lock before ingest and hands its owner id to the trainer
(`StartTrainingRequest.run_lock_owner`), which adopts it and keeps it renewed while it trains.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from stagetune.core.errors import OutputInUseError
from stagetune.core.leases import Leases, Outcome, lease_ttl
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)

LOCK_PREFIX = ".stagetune"
UNIT = "run"
#: Another host's claim is dead once its last renewal is this many ttls old (its clock against ours).
STALE_TTLS = 2.0


class RunLock:
    """The run lock of one output store; a context manager that releases it."""

    def __init__(self, store: Store, *, owner: str | None = None, ttl: float | None = None,
                 what: str = "output_dir") -> None:
        self.store = store
        self.what = what
        self.ttl = lease_ttl(ttl)
        self._leases = Leases(store, LOCK_PREFIX, owner=owner, ttl=self.ttl)
        self.held = False
        self.adopted = False

    @property
    def owner(self) -> str:
        return self._leases.owner

    def acquire(self) -> RunLock:
        """Take the lock, or raise `OutputInUseError` naming the live run that holds it."""
        for _ in range(3):
            outcome = self._leases.claim(UNIT).outcome
            if outcome is Outcome.WON:
                self.held = True
                return self
            if outcome is Outcome.DONE:  # a lock is never finished; a stray marker must not block it
                self._leases.forget_done(UNIT)
                continue
            holder = self._live_holder()
            if holder is not None:
                raise OutputInUseError(
                    f"{self.what} {self.store.url} is in use by another run ({holder}): wait for it to end or "
                    f"stop it, or choose another {self.what}. A crashed run's lock is taken over at once on "
                    f"the same host, else {STALE_TTLS * self.ttl:.0f} s after its last renewal.",
                    field=self.what,
                )
        raise OutputInUseError(f"{self.what} {self.store.url}: could not take the run lock (runs starting at once?)",
                               field=self.what)

    def adopt_or_acquire(self) -> RunLock:
        """Keep renewing the lock our owner id already holds (taken by the client, which releases it), else
        take it (and release it ourselves)."""
        if self._leases.adopt(UNIT):
            self.held = self.adopted = True
            return self
        return self.acquire()

    def holder(self) -> str | None:
        """Who else holds the lock now (a description), or None; removes dead claims on the way."""
        return self._live_holder()

    def _live_holder(self) -> str | None:
        for owner, claim in self._leases.other_claims(UNIT).items():
            if _dead(claim, self.ttl):
                log.warning("%s %s: removing the run lock of %s, a run that is gone", self.what, self.store.url,
                            owner)
                self._leases.remove_claim(UNIT, owner)
                continue
            return _describe(owner, claim)
        return None

    def release(self) -> None:
        if self.held and self.adopted:
            self._leases.stop_renewing(UNIT)
        elif self.held:
            self._leases.release(UNIT)
        self.held = False
        self._leases.close()

    def __enter__(self) -> RunLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _dead(claim: dict, ttl: float) -> bool:
    host, pid = claim.get("host"), claim.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _process_alive(pid):
        return True
    written = claim.get("written_at")
    if not isinstance(written, int | float):
        return False  # unreadable: the lease rules age it out; never steal on a guess
    return time.time() - written > STALE_TTLS * max(ttl, float(claim.get("ttl") or 0))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(owner: str, claim: dict) -> str:
    written = claim.get("written_at")
    age = f", lock renewed {max(0.0, time.time() - written):.0f} s ago" if isinstance(written, int | float) else ""
    where = f"pid {claim['pid']} on {claim['host']}" if claim.get("host") and claim.get("pid") else f"owner {owner}"
    return where + age

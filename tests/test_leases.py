"""Leases in the store (local folder and the loopback S3 server): one holder at a time, done markers,
takeover of a killed holder's unit, and a holder noticing it was taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagetune.core.errors import ConfigError
from stagetune.core.leases import ENV_TTL, Leases, Outcome, lease_ttl, unit_id
from stagetune.core.store import Store, open_store

PREFIX = "cache/vae/fp-leases"
TTL = 1.0


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL another process can open too (the S3 one carries the test server's credentials)."""
    if request.param == "local":
        return str(tmp_path / "store")
    from fixtures_store import fresh_bucket

    return request.getfixturevalue("s3_server").url(fresh_bucket(), prefix="pfx")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()


def claims(store: Store, unit: str) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in store.list(f"{PREFIX}/leases/{unit}/")]


def test_one_holder_at_a_time_under_contention(store: Store) -> None:
    """Six claimants race for one unit, round after round: never two inside, and everyone gets in."""
    unit = unit_id(["a", "b"])
    rounds_each = 2
    inside = 0
    most_inside = 0
    wins: dict[str, int] = {}
    held_outcomes = 0
    lock = threading.Lock()
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def claimant(i: int) -> None:
        nonlocal inside, most_inside, held_outcomes
        leases = Leases(store, PREFIX, owner=f"owner-{i}", ttl=30.0)
        try:
            start.wait()
            won = 0
            while won < rounds_each:
                result = leases.claim(unit)
                if result.outcome is Outcome.HELD:
                    with lock:
                        held_outcomes += 1
                    time.sleep(0.001 * (i + 1))
                    continue
                assert result.outcome is Outcome.WON
                with lock:
                    inside += 1
                    most_inside = max(most_inside, inside)
                time.sleep(0.02)  # long enough for every other claimant to run its whole protocol
                with lock:
                    inside -= 1
                leases.release(unit)
                won += 1
            wins[leases.owner] = won
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            leases.close()

    threads = [threading.Thread(target=claimant, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert most_inside == 1
    assert wins == {f"owner-{i}": rounds_each for i in range(6)}
    assert held_outcomes > 0, "the claimants never contended: the test proved nothing"
    assert claims(store, unit) == [], "released claims are removed"


def test_finished_unit_is_done_for_everyone(store: Store) -> None:
    unit = unit_id(["k1"])
    first = Leases(store, PREFIX, ttl=TTL)
    second = Leases(store, PREFIX, ttl=TTL)
    try:
        assert first.claim(unit).outcome is Outcome.WON
        assert second.claim(unit).outcome is Outcome.HELD
        first.finish(unit)
        assert claims(store, unit) == ["done.json"]
        assert second.claim(unit).outcome is Outcome.DONE
        assert claims(store, unit) == ["done.json"], "a claimant that finds the unit done leaves no claim"
    finally:
        first.close()
        second.close()


def test_claim_left_on_a_done_unit_is_swept_by_the_next_claimant(store: Store) -> None:
    """A replica killed between writing done.json and deleting its claim leaves the claim behind."""
    unit = unit_id(["k-swept"])
    killed = Leases(store, PREFIX, ttl=TTL, owner="killed-replica")
    try:
        assert killed.claim(unit).outcome is Outcome.WON
        store.put_bytes(f"{PREFIX}/leases/{unit}/done.json", json.dumps({"format": 1}).encode())
        assert claims(store, unit) == ["claim-killed-replica.json", "done.json"]
    finally:
        killed._stop.set()  # stop its heartbeat without the clean-up a live replica would do
    later = Leases(store, PREFIX, ttl=TTL)
    try:
        assert later.claim(unit).outcome is Outcome.DONE
        assert claims(store, unit) == ["done.json"]
    finally:
        later.close()


def test_released_dirty_unit_tells_the_next_holder_to_reread(store: Store) -> None:
    unit = unit_id(["k2"])
    with Leases(store, PREFIX, ttl=TTL) as first, Leases(store, PREFIX, ttl=TTL) as second:
        assert first.claim(unit) == first.claim(unit)  # holding it already: still won
        first.release(unit)
        result = second.claim(unit)
        assert result.outcome is Outcome.WON and not result.stale
        second.release(unit, dirty=True)
        assert first.claim(unit).stale


def test_live_holder_keeps_its_unit_past_the_ttl(store: Store) -> None:
    """Renewals (every ttl/3) keep a working holder's unit from being taken over."""
    unit = unit_id(["k3"])
    with Leases(store, PREFIX, ttl=TTL) as holder, Leases(store, PREFIX, ttl=TTL) as other:
        assert holder.claim(unit).outcome is Outcome.WON
        deadline = time.monotonic() + 2.5 * TTL
        while time.monotonic() < deadline:
            assert other.claim(unit).outcome is Outcome.HELD
            time.sleep(other.poll_s)
        assert not holder.lost(unit)


_HOLDER = """
import sys, time
from stagetune.core.leases import Leases
from stagetune.core.store import open_store
leases = Leases(open_store(sys.argv[1]), sys.argv[2], owner="doomed", ttl=float(sys.argv[4]))
print(leases.claim(sys.argv[3]).outcome.value, flush=True)
time.sleep(600)
"""


def test_killed_holders_unit_is_taken_over_after_the_ttl(store: Store, store_url: str) -> None:
    """A real process holds a unit and is SIGKILLed: the unit is free again one ttl later, not before."""
    url = store_url
    unit = unit_id(["k4"])
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, PREFIX, unit, str(TTL)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "won"
        with Leases(store, PREFIX, ttl=TTL) as taker:
            assert taker.claim(unit).outcome is Outcome.HELD
            time.sleep(1.5 * TTL)
            assert taker.claim(unit).outcome is Outcome.HELD, "the holder is alive and renewing"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            killed = time.monotonic()
            while (result := taker.claim(unit)).outcome is Outcome.HELD:
                assert time.monotonic() - killed < 5 * TTL, "the dead holder's claim was never taken over"
                time.sleep(taker.poll_s)
            waited = time.monotonic() - killed
            assert result.outcome is Outcome.WON and result.stale, "a takeover must make the taker re-read"
            assert TTL * 0.9 <= waited, f"taken over after {waited:.2f}s, before the ttl ran out"
            assert claims(store, unit) == [f"claim-{taker.owner}.json"], "the dead claim was removed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_holder_notices_a_takeover(store: Store) -> None:
    """If a stalled holder's claim was removed, its next renewal says so, and it does not come back."""
    unit = unit_id(["k5"])
    with Leases(store, PREFIX, ttl=0.6) as holder:
        assert holder.claim(unit).outcome is Outcome.WON
        store.delete(f"{PREFIX}/leases/{unit}/claim-{holder.owner}.json")  # what a taker does
        deadline = time.monotonic() + 3
        while not holder.lost(unit):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert claims(store, unit) == [], "a holder that lost its unit must not renew it again"


def test_claim_objects_say_who_holds_what(store: Store) -> None:
    unit = unit_id(["k6"])
    with Leases(store, PREFIX, owner="replica-a", ttl=TTL) as leases:
        leases.claim(unit)
        body = json.loads(store.get_bytes(f"{PREFIX}/leases/{unit}/claim-replica-a.json"))
        assert body["owner"] == "replica-a" and body["state"] == "ready" and body["number"] == 1
        assert body["ttl"] == TTL and body["unit"] == unit
    assert claims(store, unit) == [], "closing gives back what is still held"


def test_ttl_from_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TTL, raising=False)
    assert lease_ttl() == 30.0
    assert lease_ttl(2.5) == 2.5
    monkeypatch.setenv(ENV_TTL, "0.75")
    assert lease_ttl() == 0.75
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(ENV_TTL, bad)
        with pytest.raises(ConfigError, match=ENV_TTL):
            lease_ttl()
    with pytest.raises(ValueError, match="owner"):
        Leases(open_store("/tmp/unused-store"), PREFIX, owner="a/b", ttl=1.0)

"""The job framework every service shares: idempotent Start, Watch, Get, Cancel, restart survival."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from stagetune.core.errors import ConfigError, NotFoundError
from stagetune.core.jobs import JobManager, JobState
from stagetune.core.store.local import LocalStore


def _wait(manager: JobManager, job_id: str) -> list:
    return list(manager.watch(job_id))


def test_submit_is_idempotent_on_request_id(tmp_path: Path) -> None:
    calls = []

    def work(ctx):
        calls.append(ctx.spec["n"])
        ctx.progress("counting", 1, 2, "things")
        ctx.log("halfway")
        return {"answer": ctx.spec["n"] * 2}

    manager = JobManager("demo", LocalStore(tmp_path), work)
    first = manager.submit("req-1", {"n": 21})
    events = _wait(manager, first.job_id)
    again = manager.submit("req-1", {"n": 21})
    assert again.job_id == first.job_id
    assert calls == [21], "a retried Start must not run the work twice"
    assert manager.get(first.job_id).outputs == {"answer": "42"}
    kinds = [e.kind for e in events]
    assert kinds[0] == "job" and kinds[-1] == "job"
    assert "progress" in kinds and "log" in kinds
    assert events[-1].data.state == JobState.SUCCEEDED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_failure_keeps_the_field_and_the_message(tmp_path: Path) -> None:
    def work(ctx):
        raise ConfigError("unknown key 'lerning_rate'", field="lerning_rate")

    manager = JobManager("demo", LocalStore(tmp_path), work)
    job = manager.submit("r", {})
    _wait(manager, job.job_id)
    record = manager.get(job.job_id)
    assert record.state == JobState.FAILED
    assert record.error_field == "lerning_rate"
    assert "lerning_rate" in record.error


def test_cancel_stops_a_running_job(tmp_path: Path) -> None:
    started = threading.Event()

    def work(ctx):
        started.set()
        for i in range(1000):
            ctx.progress("looping", i, 1000)
            threading.Event().wait(0.01)
        return {}

    manager = JobManager("demo", LocalStore(tmp_path), work)
    job = manager.submit("r", {})
    assert started.wait(5)
    manager.cancel(job.job_id)
    _wait(manager, job.job_id)
    assert manager.get(job.job_id).state == JobState.CANCELLED


def test_records_outlive_the_manager(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manager = JobManager("demo", store, lambda ctx: {"ok": "yes"})
    job = manager.submit("r", {})
    _wait(manager, job.job_id)
    manager.shutdown()
    reborn = JobManager("demo", store, lambda ctx: pytest.fail("must not run again"))
    assert reborn.get(job.job_id).outputs == {"ok": "yes"}
    assert [r.job_id for r in reborn.list()] == [job.job_id]
    assert reborn.submit("r", {}).state == JobState.SUCCEEDED
    events = list(reborn.watch(job.job_id))
    assert events[-1].data.state == JobState.SUCCEEDED
    with pytest.raises(NotFoundError, match="no such job"):
        reborn.get("demo-0000")


def test_a_job_left_running_by_a_dead_process_runs_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manager = JobManager("demo", store, lambda ctx: {"run": "first"})
    job = manager.submit("r", {})
    _wait(manager, job.job_id)
    record = manager.get(job.job_id)
    record.state, record.owner = JobState.RUNNING, "a-dead-process"
    store.put_bytes(f"jobs/{job.job_id}/record.json", record.to_json().encode())
    reborn = JobManager("demo", store, lambda ctx: {"run": "second"})
    again = reborn.submit("r", {})
    list(reborn.watch(again.job_id))
    assert reborn.get(job.job_id).outputs == {"run": "second"}


def test_progress_events_are_throttled_but_keep_phases_and_the_end(tmp_path: Path) -> None:
    def work(ctx):
        for i in range(1, 5001):
            ctx.progress("scanning", i, 5000, "files")
        ctx.progress("writing", 0, 1)
        ctx.progress("writing", 1, 1)
        return {}

    manager = JobManager("demo", LocalStore(tmp_path), work)
    job = manager.submit("r", {})
    progress = [e.data for e in _wait(manager, job.job_id) if e.kind == "progress"]
    assert len(progress) < 100, "5,000 updates must not become 5,000 events"
    assert (progress[0].phase, progress[0].done) == ("scanning", 1)
    assert any(p.phase == "scanning" and p.done == 5000 for p in progress)
    assert (progress[-1].phase, progress[-1].done) == ("writing", 1)
    assert manager.get(job.job_id).progress.done == 1


def test_each_job_gets_a_thread_that_ends_with_it() -> None:
    """Jobs run one at a time (max_workers=1), each on its own thread, and no thread outlives its job."""
    from stagetune.core.jobs import ThreadPerJob

    runner = ThreadPerJob(1, "test-job")
    gate = threading.Event()
    seen: list[threading.Thread] = []
    active = []

    def job(wait: bool) -> None:
        active.append(1)
        assert len(active) == 1  # never two at once
        seen.append(threading.current_thread())
        if wait:
            gate.wait(5)
        active.pop()

    runner.submit(job, True)
    runner.submit(job, False)
    runner.submit(job, False)
    time.sleep(0.1)
    assert len(seen) == 1  # the others wait for the first
    gate.set()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.shutdown()
    assert len({t.name for t in seen}) == 3 and not any(t.is_alive() for t in seen)

    stopped = ThreadPerJob(1, "test-stopped")
    stopped.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        stopped.submit(job, False)

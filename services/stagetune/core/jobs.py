"""Jobs: the unit of stage work, shared by every service.

A job is started idempotently on the client's `request_id` (the job id is derived from it, so a
retried Start finds the same job), runs on a worker thread, emits events that Watch streams, and
keeps its record in the store (`jobs/<job_id>/record.json`) so it outlives the service process.
A job whose record says it was running in another (dead) process is started again on the next
Start with the same request: stage work is content-addressed and the trainer resumes from its
checkpoints, so a re-run redoes only what was lost.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import xxhash

from stagetune.core import metrics
from stagetune.core.errors import CorruptError, NotFoundError, StagetuneError
from stagetune.core.store.base import Store

log = logging.getLogger(__name__)

#: One id per process: tells a record written by this process from one left by a dead one.
INSTANCE_ID = uuid.uuid4().hex
#: Least time between two progress events of one job (phase changes and the last count always go out).
PROGRESS_INTERVAL_S = float(os.environ.get("STAGETUNE_PROGRESS_INTERVAL_S", "0.1"))


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_ACTIVE = ("queued", "running")


def _count_active(service: str, old: JobState, new: JobState) -> None:
    """Move one job between the queued/running gauges (terminal states are counted by JOBS)."""
    if old.value in _ACTIVE:
        metrics.ACTIVE_JOBS.labels(service, old.value).dec()
    if new.value in _ACTIVE:
        metrics.ACTIVE_JOBS.labels(service, new.value).inc()


class JobCancelled(Exception):
    """Raised inside a job's work function when the job was cancelled."""


@dataclasses.dataclass
class Progress:
    phase: str = ""
    done: int = 0
    total: int = 0
    unit: str = ""


@dataclasses.dataclass
class JobRecord:
    job_id: str
    request_id: str
    service: str
    state: JobState = JobState.QUEUED
    error: str = ""
    error_field: str = ""
    created_at: float = dataclasses.field(default_factory=time.time)
    updated_at: float = dataclasses.field(default_factory=time.time)
    progress: Progress = dataclasses.field(default_factory=Progress)
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    owner: str = INSTANCE_ID

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        data = json.loads(text)
        data["state"] = JobState(data["state"])
        data["progress"] = Progress(**data["progress"])
        return cls(**data)


@dataclasses.dataclass
class Event:
    """One item of a job's stream; `kind` is progress, log, metric, preview or job."""

    seq: int
    time: float
    kind: str
    data: Any


def job_id_for(service: str, request_id: str) -> str:
    digest = xxhash.xxh3_64_hexdigest(f"{service}\0{request_id}".encode())
    return f"{service}-{digest}"


class JobContext:
    """What a job's work function sees: its spec, the store, and ways to report."""

    def __init__(self, manager: JobManager, record: JobRecord) -> None:
        self._manager = manager
        self.record = record
        self.cancelled = threading.Event()
        self._last_progress = 0.0

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def spec(self) -> dict[str, Any]:
        return self.record.spec

    @property
    def request(self) -> Any:
        """The Start request as its typed message (the spec is kept as JSON so records outlive the process)."""
        from google.protobuf import json_format

        return json_format.ParseDict(self.record.spec, self._manager.request_type())

    @property
    def store(self) -> Store:
        return self._manager.store

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.job_id)

    def progress(self, phase: str, done: int, total: int, unit: str = "") -> None:
        """Record progress; events go out at most every PROGRESS_INTERVAL_S, plus every phase change and the
        final count, so a per-file loop over 100k files does not stream 100k events to every watcher."""
        self.check_cancelled()
        new_phase = phase != self.record.progress.phase
        self.record.progress = Progress(phase, int(done), int(total), unit)
        now = time.monotonic()
        if new_phase or done >= total or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self._manager._emit(self.record.job_id, "progress", self.record.progress)

    def log(self, message: str, level: str = "info") -> None:
        log.log(logging.getLevelName(level.upper()), "[%s] %s", self.job_id, message)
        self._manager._emit(self.record.job_id, "log", {"level": level, "message": message})

    def metric(self, name: str, value: float, step: int = 0) -> None:
        self._manager._emit(self.record.job_id, "metric", {"name": name, "value": float(value), "step": step})

    def preview(self, name: str, png: bytes, step: int = 0, key: str = "") -> None:
        self._manager._emit(self.record.job_id, "preview", {"name": name, "png": png, "step": step, "key": key})


WorkFn = Callable[[JobContext], dict[str, str]]


class ThreadPerJob:
    """Runs each job on a thread of its own that ends with the job, at most `max_workers` at once.

    torch's OpenMP workers belong to the thread that started them. A pool thread kept its job's workers
    alive after the job, and libgomp, seeing more threads than cores, then stopped spinning between
    parallel regions: the next job's many small ops (text encoders) ran about 10 % slower.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._max_workers = max(1, max_workers)
        self._name = name
        self._queue: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        self._running: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._closed = False

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: shut down")
            self._queue.append((fn, args))
            self._start_waiting()

    def _start_waiting(self) -> None:  # under self._lock
        while self._queue and len(self._running) < self._max_workers:
            fn, args = self._queue.popleft()
            # Daemon: a process told to stop (Ctrl-C twice, SIGTERM past its grace) must not hang on a job
            # still loading a model; every write a job makes is atomic, so stopping mid-job loses no data.
            thread = threading.Thread(target=self._run, args=(fn, args), name=f"{self._name}-{next(self._numbers)}",
                                      daemon=True)
            self._running.add(thread)
            thread.start()

    def _run(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            fn(*args)
        except BaseException:  # JobManager._run records its own failures; this is the last resort
            log.exception("%s: job thread failed", self._name)
        finally:
            with self._lock:
                self._running.discard(threading.current_thread())
                if not self._closed:
                    self._start_waiting()

    def shutdown(self, timeout: float | None = None) -> None:
        """Drop jobs not started yet and wait for the running ones (at most `timeout` seconds in all)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            running = list(self._running)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in running:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


class JobManager:
    """Runs one service's jobs (a thread each, `max_workers` at once) and keeps their records and events."""

    def __init__(self, service: str, store: Store, work: WorkFn, *, max_workers: int = 1,
                 request_type: type | None = None) -> None:
        self.service = service
        self.store = store
        self.request_type = request_type
        self._work = work
        self._threads = ThreadPerJob(max_workers, f"{service}-job")
        self._lock = threading.Condition()
        self._records: dict[str, JobRecord] = {}
        self._events: dict[str, list[Event]] = {}
        self._contexts: dict[str, JobContext] = {}

    # -- store -------------------------------------------------------------------------------
    def _record_key(self, job_id: str) -> str:
        return f"jobs/{job_id}/record.json"

    def _persist(self, record: JobRecord) -> None:
        record.updated_at = time.time()
        try:
            self.store.put_bytes(self._record_key(record.job_id), record.to_json().encode())
        except StagetuneError as exc:  # the job goes on; its record is refreshed at the next change
            log.warning("could not save job record %s: %s", record.job_id, exc)

    def _load(self, job_id: str) -> JobRecord | None:
        key = self._record_key(job_id)
        if not self.store.exists(key):
            return None
        return self._parse(key, self.store.get_bytes(key))

    def _parse(self, key: str, data: bytes) -> JobRecord:
        try:
            return JobRecord.from_json(data.decode("utf-8"))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptError(f"job record {key} in {self.store.url} is unreadable ({type(exc).__name__}: {exc}); "
                               "delete it to forget the job", field="job_id") from None

    # -- events ------------------------------------------------------------------------------
    def _emit(self, job_id: str, kind: str, data: Any) -> None:
        with self._lock:
            events = self._events.setdefault(job_id, [])
            events.append(Event(len(events) + 1, time.time(), kind, data))
            self._lock.notify_all()

    def _set_state(self, record: JobRecord, state: JobState, **changes: Any) -> None:
        # The record is saved before its event goes out: whoever sees the event and then reads the
        # record (from any process) reads the new state. A watcher never sees one without the other.
        with self._lock:
            _count_active(self.service, record.state, state)
            record.state = state
            for name, value in changes.items():
                setattr(record, name, value)
            self._persist(record)
            self._emit(record.job_id, "job", dataclasses.replace(record))
        if state.terminal:
            metrics.JOBS.labels(self.service, state.value).inc()

    # -- API ---------------------------------------------------------------------------------
    def submit(self, request_id: str, spec: dict[str, Any]) -> JobRecord:
        """Start a job, or return the one this request already started (idempotent)."""
        if not request_id:
            request_id = uuid.uuid4().hex
        job_id = job_id_for(self.service, request_id)
        with self._lock:
            live = self._records.get(job_id)
            if live is not None and (not live.state.terminal or live.state == JobState.SUCCEEDED):
                return live
            stored = live or self._load(job_id)
            if stored is not None and stored.state == JobState.SUCCEEDED:
                self._records[job_id] = stored
                return stored
            if stored is not None and not stored.state.terminal and stored.owner == INSTANCE_ID:
                return stored
            record = JobRecord(job_id=job_id, request_id=request_id, service=self.service, spec=spec)
            if stored is not None:
                record.created_at = stored.created_at
            self._records[job_id] = record
            self._events[job_id] = []
            context = JobContext(self, record)
            self._contexts[job_id] = context
        self._persist(record)
        metrics.ACTIVE_JOBS.labels(self.service, JobState.QUEUED.value).inc()
        self._emit(job_id, "job", dataclasses.replace(record))
        self._threads.submit(self._run, context)
        return record

    def _run(self, context: JobContext) -> None:
        record = context.record
        if context.cancelled.is_set():
            self._set_state(record, JobState.CANCELLED)
            return
        self._set_state(record, JobState.RUNNING)
        try:
            outputs = self._work(context)
        except JobCancelled:
            self._set_state(record, JobState.CANCELLED, error="cancelled")
        except StagetuneError as exc:
            context.log(str(exc), "error")
            self._set_state(record, JobState.FAILED, error=str(exc), error_field=exc.field or "")
        except Exception as exc:  # noqa: BLE001 - a job's failure is reported, never kills the server
            log.error("job %s crashed:\n%s", record.job_id, traceback.format_exc())
            self._set_state(record, JobState.FAILED, error=f"{type(exc).__name__}: {exc}")
        else:
            self._set_state(record, JobState.SUCCEEDED, outputs={k: str(v) for k, v in (outputs or {}).items()})

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._records.get(job_id)
        if record is None:
            record = self._load(job_id)
        if record is None:
            raise NotFoundError(f"no such job: {job_id}", field="job_id")
        return record

    def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        context = self._contexts.get(job_id)
        if context is not None and not record.state.terminal:
            context.cancelled.set()
        return record

    def list(self) -> list[JobRecord]:
        records: dict[str, JobRecord] = {}
        for key in self.store.list("jobs/"):
            if key.endswith("/record.json") and key.split("/")[1].startswith(f"{self.service}-"):
                try:
                    record = self._parse(key, self.store.get_bytes(key))
                except (CorruptError, NotFoundError) as exc:  # one bad record must not hide every other job
                    log.warning("List skips a job: %s", exc)
                    continue
                records[record.job_id] = record
        with self._lock:
            records.update(self._records)
        return sorted(records.values(), key=lambda r: r.created_at)

    def watch(self, job_id: str, after_seq: int = 0, *, poll: float = 0.5,
              alive: Callable[[], bool] = lambda: True) -> Iterator[Event]:
        """Yield the job's events after `after_seq` until it ends (or the caller goes away)."""
        record = self.get(job_id)
        if job_id not in self._events:  # a job from an earlier process: only its final record
            yield Event(1, record.updated_at, "job", record)
            return
        seq = after_seq
        while True:
            with self._lock:
                events = self._events[job_id]
                if len(events) <= seq and not self._records[job_id].state.terminal:
                    self._lock.wait(timeout=poll)
                    events = self._events[job_id]
                new = events[seq:]
                done = self._records[job_id].state.terminal
            yield from new
            seq += len(new)
            if done and not new:
                return
            if not alive():
                return

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel every job and wait for them to stop (at most `timeout` seconds)."""
        for context in self._contexts.values():
            context.cancelled.set()
        self._threads.shutdown(timeout)

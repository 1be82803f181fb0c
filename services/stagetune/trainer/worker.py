"""One training process of a multi-process run: `python -m stagetune.trainer.worker SPEC`.

SPEC is a file (`SPEC.json`, as trainer/workers.py writes it) or `store:KEY`, an object in the store that
`STAGETUNE_STORE` names: pods of a Kubernetes training run (trainer/kube/launcher.py) share no disk with the
trainer, only the store. The trainer service starts these with torchrun's variables set; a cluster's launcher can
start them the same way. A worker trains its rank of the run in-process (`train_in_process`) with a stand-in
for the job context: rank 0's progress, log lines and metrics go to stdout as one JSON object per line, which
the supervising job relays as its own events (`relay_event`); every worker's last line says how it ended. A pod
started from a store spec also leaves them in the store, batched (`StoreEventLog`), for the launcher that
cannot read its stdout.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Marks the lines the supervisor reads; anything else a library prints to stdout is passed on as a log line.
EVENT_PREFIX = "@stagetune-event "
#: Exit code of a worker stopped by Cancel, Ctrl-C or SIGTERM after saving a checkpoint (as the CLI's).
CANCELLED_EXIT = 130


def event_line(kind: str, *values: Any) -> str:
    return EVENT_PREFIX + json.dumps({"kind": kind, "values": list(values)}, default=str)


def parse_event(line: str) -> tuple[str, list[Any]] | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    payload = json.loads(line[len(EVENT_PREFIX):])
    return str(payload["kind"]), list(payload["values"])


def relay_event(ctx: Any, kind: str, values: list[Any]) -> None:
    """A worker's event as the supervising job's own. A job's progress raises once it is cancelled (how
    in-process work stops); the workers stop themselves, after a checkpoint, so progress is then dropped."""
    if kind == "progress":
        if ctx.cancelled.is_set():
            return  # the workers are saving and stopping; nothing to show until they end
        ctx.progress(str(values[0]), int(values[1]), int(values[2]), str(values[3]))
    elif kind == "metric":
        ctx.metric(str(values[0]), float(values[1]), int(values[2]))
    elif kind == "step":
        from stagetune.core.metrics import record_train_step

        record_train_step(*values)
    elif kind == "log" and values[1] != "debug":
        ctx.log(str(values[0]), str(values[1]))


def events_key(job_id: str, seq: int) -> str:
    return f"jobs/{job_id}/worker-events/{seq:08d}.json"


class StoreEventLog:
    """Rank 0's events for a launcher that cannot read the pod's stdout, batched into numbered objects at most
    every `interval` seconds (a step's progress and metrics would otherwise be a store write each), and by a
    timer in quiet spells (model loading, validation). Each object is written once with a fixed content (a
    failed write is retried unchanged), so a reader needs no listing and no lock (`StoreEventReader`). A
    restarted rank 0 goes on after the objects already there."""

    def __init__(self, store: Any, job_id: str, *, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, timer: bool = True) -> None:
        self.store, self.job_id, self.interval, self._clock = store, job_id, interval, clock
        self._pending: list[list[Any]] = []
        self._batch: bytes | None = None  # a batch whose write failed: retried as it is
        self._seq = 0
        while store.exists(events_key(job_id, self._seq)):
            self._seq += 1
        self._last = clock()
        self._failed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if timer:
            threading.Thread(target=self._tick, name="store-events", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def add(self, kind: str, values: list[Any]) -> None:
        with self._lock:
            self._pending.append([kind, values])
            due = self._clock() - self._last >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what is pending. A store hiccup never stops training: the events wait for the next flush."""
        from stagetune.core.errors import StagetuneError

        with self._lock:
            self._last = self._clock()
            while self._batch is not None or self._pending:
                if self._batch is None:
                    self._batch = json.dumps(self._pending, default=str).encode()
                    self._pending = []
                try:
                    self.store.put_bytes(events_key(self.job_id, self._seq), self._batch, durable=False)
                except StagetuneError as exc:
                    if not self._failed:
                        logging.getLogger(__name__).warning("cannot leave progress in the store (%s); will retry", exc)
                    self._failed = True
                    return
                self._seq += 1
                self._batch = None

    def close(self) -> None:
        self._stop.set()
        self.flush()


class StoreEventReader:
    """The launcher's side of `StoreEventLog`: each call returns the events written since the last one."""

    def __init__(self, store: Any, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self._next = 0

    def clear(self) -> None:
        """Forget an earlier attempt's events (a rerun of the same job reads only its own)."""
        self.store.delete_prefix(f"jobs/{self.job_id}/worker-events/")
        self._next = 0

    def read(self) -> list[tuple[str, list[Any]]]:
        """What was written since the last call. When the store fails part-way, what was read is returned and
        the next call goes on from there (it raises only when nothing could be read)."""
        from stagetune.core.errors import StagetuneError

        events: list[tuple[str, list[Any]]] = []
        try:
            while self.store.exists(key := events_key(self.job_id, self._next)):
                events += [(str(kind), list(values)) for kind, values in json.loads(self.store.get_bytes(key))]
                self._next += 1
        except StagetuneError:
            if not events:
                raise
        return events


class WorkerContext:
    """What `train_in_process` asks of a job context. Only rank 0 speaks: the ranks train the same steps."""

    def __init__(self, request: Any, store: Any, job_id: str, *, speaks: bool,
                 sink: StoreEventLog | None = None) -> None:
        self.request = request
        self.store = store
        self.job_id = job_id
        self.cancelled = threading.Event()
        self._speaks = speaks
        self._sink = sink

    def send(self, kind: str, *values: Any) -> None:
        print(event_line(kind, *values), flush=True)
        if self._sink is not None:
            self._sink.add(kind, list(values))

    def progress(self, phase: str, done: int, total: int, unit: str = "") -> None:
        if self._speaks:
            self.send("progress", phase, done, total, unit)

    def log(self, message: str, level: str = "info") -> None:
        if self._speaks:
            self.send("log", message, level)

    def metric(self, name: str, value: float, step: int = 0) -> None:
        if self._speaks:
            self.send("metric", name, value, step)

    def record_step(self, *values: Any) -> None:
        """Prometheus' step metrics, for the job whose /metrics Prometheus scrapes."""
        if self._speaks:
            self.send("step", *values)

    def preview(self, name: str, png: bytes, step: int = 0, key: str = "") -> None:
        """The trainer sends no previews (validation does)."""

    def check_cancelled(self) -> None:
        from stagetune.core.jobs import JobCancelled

        if self.cancelled.is_set():
            raise JobCancelled("training cancelled")


#: A spec argument naming a store key rather than a file.
STORE_SPEC = "store:"


def spec_bytes(*, request: Any, store_url: str, job_id: str) -> bytes:
    return json.dumps({"request": base64.b64encode(request.SerializeToString()).decode(),
                       "store": store_url, "job_id": job_id}).encode()


def write_spec(path: Path, *, request: Any, store_url: str, job_id: str) -> Path:
    path.write_bytes(spec_bytes(request=request, store_url=store_url, job_id=job_id))
    return path


def spec_key(job_id: str) -> str:
    """Where a cluster run's spec lives, beside its job's record."""
    return f"jobs/{job_id}/worker-spec.json"


def result_key(job_id: str) -> str:
    """Where rank 0 of a cluster run leaves how it ended: its launcher cannot read the pod's stdout."""
    return f"jobs/{job_id}/worker-result.json"


def load_spec(arg: str) -> tuple[Any, Any, str, bool]:
    """(request, store, job_id, from_store) from a spec file or a `store:KEY`. A store spec is read from, and
    its run written to, the store the pod's STAGETUNE_STORE names (the trainer's store URL may carry another
    host name or credentials than the pod's)."""
    from google.protobuf.message import DecodeError

    from stagetune.core.errors import InputError, NotFoundError
    from stagetune.core.store import open_store
    from stagetune.v1 import trainer_pb2

    from_store = arg.startswith(STORE_SPEC)
    if from_store:
        store = open_store()
        key = arg[len(STORE_SPEC):]
        if not store.exists(key):
            raise NotFoundError(f"no worker spec {key} in {store.url}", field="spec")
        spec = json.loads(store.get_bytes(key))
    else:
        try:
            spec = json.loads(Path(arg).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the worker spec {arg}: {exc}", field="spec") from None
    try:
        store = store if from_store else open_store(spec["store"])
        request = trainer_pb2.StartTrainingRequest.FromString(base64.b64decode(spec["request"]))
        return request, store, str(spec["job_id"]), from_store
    except (KeyError, TypeError, ValueError, DecodeError) as exc:
        raise InputError(f"worker spec {arg} is not one the trainer wrote ({type(exc).__name__}: {exc})",
                         field="spec") from None


def main(argv: list[str] | None = None) -> int:
    from stagetune.core.config.train import config_from_json, load_train_config
    from stagetune.core.errors import StagetuneError
    from stagetune.core.jobs import JobCancelled
    from stagetune.trainer.distributed import World
    from stagetune.trainer.service import train_in_process

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stagetune.trainer.worker SPEC.json|store:KEY", file=sys.stderr)
        return 2
    try:
        request, store, job_id, from_store = load_spec(args[0])
    except StagetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    world = World.from_env()
    sink = StoreEventLog(store, job_id) if from_store and world.is_main else None
    ctx = WorkerContext(request, store, job_id, speaks=world.is_main, sink=sink)

    def record(ended: dict[str, Any]) -> None:
        if sink is not None:
            sink.close()  # the last progress and log lines before the ending the launcher waits for
            store.put_bytes(result_key(job_id), json.dumps(ended, default=str).encode())

    for signum in (signal.SIGTERM, signal.SIGINT):  # stop at the next step, all ranks together, checkpointed
        signal.signal(signum, lambda *_: ctx.cancelled.set())
    try:
        cfg = load_train_config(config_from_json(request.config_json),
                                base_dir=Path(request.base_dir) if request.base_dir else None)
        world.start()
        outputs = train_in_process(ctx, cfg, world)
    except JobCancelled:
        ctx.send("cancelled")
        record({"cancelled": True})
        return CANCELLED_EXIT
    except StagetuneError as exc:
        error = [type(exc).__name__, str(exc), getattr(exc, "field", "") or ""]
        ctx.send("error", *error)
        record({"error": error})
        return 1
    except Exception as exc:  # a bug or a library's error: its launcher says it, the traceback is the pod's log
        record({"error": ["StagetuneError", f"{type(exc).__name__}: {exc}", ""]})
        raise
    finally:
        world.stop()
    ctx.send("outputs", outputs)
    record({"outputs": outputs})
    return 0


if __name__ == "__main__":
    sys.exit(main())

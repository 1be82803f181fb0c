"""gRPC plumbing shared by the five services.

A service is a thin servicer over a `JobManager`: this module turns job records and events into
protos (`JobServicer`), maps `StagetuneError`s to status codes with a `BadRequest` detail naming the
offending field in one interceptor, counts RPCs for Prometheus, and builds servers that also serve
`grpc.health.v1` and reflection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from stagetune.core import metrics
from stagetune.core.errors import InputError, PortInUseError, StagetuneError
from stagetune.core.jobs import Event, JobContext, JobManager, JobRecord, JobState
from stagetune.core.security import MESSAGE_OPTIONS, ServerSecurity
from stagetune.core.store.base import Store
from stagetune.v1 import common_pb2

log = logging.getLogger(__name__)

_STATE_TO_PROTO = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}
_PROTO_TO_STATE = {v: k for k, v in _STATE_TO_PROTO.items()}


def job_to_proto(record: JobRecord) -> common_pb2.Job:
    job = common_pb2.Job(
        job_id=record.job_id,
        request_id=record.request_id,
        service=record.service,
        state=_STATE_TO_PROTO[record.state],
        error=record.error,
        error_field=record.error_field,
        progress=common_pb2.Progress(**dataclasses.asdict(record.progress)),
        outputs=record.outputs,
    )
    job.created_at.FromNanoseconds(int(record.created_at * 1e9))
    job.updated_at.FromNanoseconds(int(record.updated_at * 1e9))
    return job


def event_to_proto(event: Event) -> common_pb2.Event:
    out = common_pb2.Event(seq=event.seq)
    out.time.FromNanoseconds(int(event.time * 1e9))
    if event.kind == "progress":
        out.progress.CopyFrom(common_pb2.Progress(**dataclasses.asdict(event.data)))
    elif event.kind == "log":
        out.log.CopyFrom(common_pb2.LogLine(**event.data))
    elif event.kind == "metric":
        out.metric.CopyFrom(common_pb2.Metric(**event.data))
    elif event.kind == "preview":
        out.preview.CopyFrom(common_pb2.Preview(**event.data))
    elif event.kind == "job":
        out.job.CopyFrom(job_to_proto(event.data))
    return out


class JobServicer:
    """Start / Watch / Get / Cancel / List for any service: a service is its request type and work.

    `validate(request)` runs inside Start before any job exists: a bad request is answered at once with
    its status code and the offending field, and leaves nothing behind.
    """

    def __init__(self, manager: JobManager, validate: Callable[[Any], None] | None = None) -> None:
        self.manager = manager
        self.validate = validate

    def Start(self, request: Any, context: grpc.ServicerContext) -> common_pb2.Job:
        if self.validate is not None:
            self.validate(request)
        spec = json_format.MessageToDict(request, preserving_proto_field_name=True)
        spec.pop("request_id", None)
        return job_to_proto(self.manager.submit(request.request_id, spec))

    def Watch(self, request: common_pb2.WatchJobRequest, context: grpc.ServicerContext
              ) -> Iterator[common_pb2.Event]:
        _job_id(request.job_id)
        if request.after_seq < 0:
            raise InputError(f"after_seq must be >= 0, got {request.after_seq}", field="after_seq")
        for event in self.manager.watch(request.job_id, request.after_seq, alive=context.is_active):
            yield event_to_proto(event)

    def Get(self, request: common_pb2.GetJobRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        return job_to_proto(self.manager.get(_job_id(request.job_id)))

    def Cancel(self, request: common_pb2.CancelJobRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        return job_to_proto(self.manager.cancel(_job_id(request.job_id)))

    def List(self, request: common_pb2.ListJobsRequest, context: grpc.ServicerContext
             ) -> common_pb2.ListJobsResponse:
        if request.state and request.state not in _PROTO_TO_STATE:
            raise InputError(f"state {request.state} is not a JobState (1-{max(_PROTO_TO_STATE)}, or 0 for all)",
                             field="state")
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InputError(f"page_size must be 0-{MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE}), got {request.page_size}",
                             field="page_size")
        token = request.page_token
        if token and not (token.isascii() and token.isdigit()):
            raise InputError(f"page_token {token[:40]!r} is not one this server gave out", field="page_token")
        records = self.manager.list()
        if request.state:
            wanted = _PROTO_TO_STATE[request.state]
            records = [r for r in records if r.state == wanted]
        start = int(token or 0)
        size = request.page_size or DEFAULT_PAGE_SIZE
        page = records[start : start + size]
        next_token = str(start + size) if start + size < len(records) else ""
        return common_pb2.ListJobsResponse(jobs=[job_to_proto(r) for r in page], next_page_token=next_token)


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InputError("job_id is empty: give the job_id that Start returned", field="job_id")
    if len(job_id) > 200 or "/" in job_id or not job_id.isprintable():
        raise InputError(f"job_id {job_id[:60]!r} is not a job id", field="job_id")
    return job_id


_CODE_NAMES = {c.name: c for c in grpc.StatusCode}


def _status_for(exc: StagetuneError) -> status_pb2.Status:
    code = _CODE_NAMES.get(exc.grpc_code, grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(exc))
    violations = [error_details_pb2.BadRequest.FieldViolation(field=p.field, description=str(p))
                  for p in exc.problems if p.field]
    if violations:  # one per problem: a config with five mistakes names all five fields
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
        status.details.append(detail)
    return status


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, grpc.StatusCode) or code is None:
        return code
    return _CODE_NAMES.get(getattr(code, "name", ""), None)


class ErrorsAndMetricsInterceptor(grpc.ServerInterceptor):
    """Maps our errors to status codes (with the offending field) and counts every RPC."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        _, service, method = handler_call_details.method.split("/")
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    def _finish(service: str, method: str, start: float, code: grpc.StatusCode) -> None:
        metrics.GRPC_HANDLED.labels(service, method, code.name).inc()
        metrics.GRPC_SECONDS.labels(service, method).observe(time.perf_counter() - start)

    @contextlib.contextmanager
    def _observed(self, service: str, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Count the RPC; turn a `StagetuneError` into its status code with the offending field, and any
        other exception into INTERNAL with a short message (the traceback goes to the server's log, once)."""
        metrics.GRPC_STARTED.labels(service, method).inc()
        start = time.perf_counter()
        try:
            yield
        except StagetuneError as exc:
            status = rpc_status.to_status(_status_for(exc))
            self._finish(service, method, start, status.code)
            context.abort_with_status(status)
        except Exception as exc:
            aborted = _code_of(context)
            if aborted is not None and aborted is not grpc.StatusCode.OK:  # context.abort() by the handler
                self._finish(service, method, start, aborted)
                raise
            incident = uuid.uuid4().hex[:8]
            log.error("%s/%s failed (incident %s)", service, method, incident, exc_info=True)
            self._finish(service, method, start, grpc.StatusCode.INTERNAL)
            summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (incident {incident} in the "
                                                    f"server log): {summary}")
        self._finish(service, method, start, _code_of(context) or grpc.StatusCode.OK)

    def _wrap_unary(self, behaviour: Callable, service: str, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            with self._observed(service, method, context):
                return behaviour(request, context)

        return wrapped

    def _wrap_stream(self, behaviour: Callable, service: str, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._observed(service, method, context):
                yield from behaviour(request, context)

        return wrapped


@dataclasses.dataclass
class ServiceBinding:
    """One service to host: its full proto name, the generated `add_…_to_server`, and the servicer."""

    full_name: str
    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any
    manager: JobManager | None = None


def job_service(store: Store, *, name: str, servicer_base: type, add_to_server: Callable[[Any, grpc.Server], None],
                request_type: type, work: Callable[[JobContext], dict[str, str]],
                validate: Callable[[Any], None] | None = None) -> ServiceBinding:
    """A stage service: the generated servicer base, its Start request type, the work function, and the
    check that answers a bad Start request before a job exists."""
    manager = JobManager(name, store, work, request_type=request_type)
    servicer_cls = type(servicer_base.__name__.removesuffix("Servicer"), (JobServicer, servicer_base), {})
    full_name = request_type.DESCRIPTOR.file.package + "." + servicer_base.__name__.removesuffix("Servicer")
    return ServiceBinding(full_name, add_to_server, servicer_cls(manager, validate), manager)


@dataclasses.dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    bindings: Sequence[ServiceBinding]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 1.0, jobs_timeout: float | None = None) -> None:
        """Stop serving, cancel the jobs and wait for them (at most `jobs_timeout` seconds, None: until done)."""
        stop_servers([self], grace, jobs_timeout)


def stop_servers(servers: Sequence[RunningServer], grace: float = 1.0, jobs_timeout: float | None = None) -> None:
    """Stop several servers at once: the grace periods and job waits overlap instead of adding up."""
    for server in servers:
        server.health.enter_graceful_shutdown()
    stopped = [server.server.stop(grace) for server in servers]
    for event in stopped:
        event.wait()
    deadline = None if jobs_timeout is None else time.monotonic() + jobs_timeout
    for server in servers:
        for binding in server.bindings:
            if binding.manager is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                binding.manager.shutdown(left)


def start_server(bindings: Sequence[ServiceBinding], *, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16, security: ServerSecurity | None = None) -> RunningServer:
    """Start a gRPC server with health and reflection; port 0 picks a free one.

    `security` adds the bearer-token check and TLS (core/security.py); health and reflection stay open.
    """
    security = security or ServerSecurity()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorsAndMetricsInterceptor(), *security.interceptors()],
        # No SO_REUSEPORT: a second server on a taken port must fail, not share it (gRPC's default shares).
        options=[*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)],
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
        names.append(binding.full_name)
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    credentials = security.credentials()
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortInUseError(f"cannot listen for gRPC on {address}: the port is in use or the address is not this "
                             "machine's (pass --port with a free port, or 0 for any)", field="port")
    server.start()
    for binding in bindings:
        health_servicer.set(binding.full_name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d%s", ", ".join(b.full_name for b in bindings), host, bound,
             " (TLS)" if credentials else "")
    return RunningServer(server, bound, health_servicer, bindings)

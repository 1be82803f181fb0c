"""Calling a stage: start a job, follow its events, get its result or a clear error.

Used by the embedded pipeline, by the trainer to reach validation, and by tests. gRPC errors carry
the offending field in a `BadRequest` detail; they come back here as the same `StagetuneError`
subclasses the service raised, so the CLI prints one message whichever side failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stagetune.core import errors
from stagetune.v1 import common_pb2

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}

_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.StagetuneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.ConfigError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.UNAVAILABLE: errors.StoreUnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.PreconditionError,
    grpc.StatusCode.DATA_LOSS: errors.CorruptError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
}


class JobFailed(errors.StagetuneError):
    """A stage job ended FAILED or CANCELLED; the message is the service's own."""

    def __init__(self, job: common_pb2.Job) -> None:
        state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        super().__init__(f"{job.service} job {job.job_id} {state}: {job.error}", field=job.error_field or None)
        self.job = job


def field_violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of the error's BadRequest detail, in order."""
    status = rpc_status.from_call(exc) if hasattr(exc, "trailing_metadata") else None
    out: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def error_from_rpc(exc: grpc.RpcError) -> errors.StagetuneError:
    """The server's error as the same kind of `StagetuneError`, each problem with its field."""
    cls = _CODE_TO_ERROR.get(exc.code(), errors.StagetuneError)
    violations = field_violations(exc)
    error = cls(exc.details() or str(exc.code()), field=violations[0][0] if violations else None)
    if len(violations) > 1:
        error._problems = [cls(description, field=field) for field, description in violations]  # type: ignore[attr-defined]
    return error


def call(fn: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
    """A unary call whose gRPC error comes back as a StagetuneError."""
    try:
        return fn(request, **kwargs)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def follow(stub: Any, job: common_pb2.Job, on_event: Callable[[common_pb2.Event], None] | None = None
           ) -> common_pb2.Job:
    """Stream a job's events until it ends; return the final job or raise `JobFailed`."""
    final = job
    try:
        for event in stub.Watch(common_pb2.WatchJobRequest(job_id=job.job_id)):
            if on_event is not None:
                on_event(event)
            if event.HasField("job"):
                final = event.job
                if final.state in TERMINAL:
                    break
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None
    if final.state not in TERMINAL:
        final = call(stub.Get, common_pb2.GetJobRequest(job_id=job.job_id))
    if final.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise JobFailed(final)
    return final


def run_job(stub: Any, request: Any, on_event: Callable[[common_pb2.Event], None] | None = None
            ) -> common_pb2.Job:
    return follow(stub, call(stub.Start, request), on_event)

"""Errors that name the thing the user must fix.

Every error a user can cause carries the offending key, file or object, so that the gRPC layer can
map it to a status code (INVALID_ARGUMENT, NOT_FOUND, ...) with a field and the CLI can print it
without a traceback.
"""

from __future__ import annotations


class StagetuneError(Exception):
    """Base of all errors the product reports to users."""

    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(StagetuneError):
    """A config key or value is wrong, unknown or not supported."""

    grpc_code = "INVALID_ARGUMENT"


class NotSupportedError(ConfigError):
    """A key SimpleTuner knows that stagetune does not implement yet: never silently ignored."""


class InputError(StagetuneError):
    """A dataset file, model path or other input cannot be used."""

    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(StagetuneError):
    """An object, job, checkpoint or file does not exist."""

    grpc_code = "NOT_FOUND"


class StoreUnavailableError(StagetuneError):
    """The object store cannot be reached: the caller may retry."""

    grpc_code = "UNAVAILABLE"


class PreconditionError(StagetuneError):
    """The request is valid but the system is not in a state to run it."""

    grpc_code = "FAILED_PRECONDITION"

"""Errors that name the thing the user must fix.

Every error a user can cause carries the offending key, file or object, so that the gRPC layer can
map it to a status code (INVALID_ARGUMENT, NOT_FOUND, ...) with a field and the CLI can print it
without a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator


class StagetuneError(Exception):
    """Base of all errors the product reports to users."""

    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def problems(self) -> list[StagetuneError]:
        """The separate problems this error reports (several for `Problems`, or for one rebuilt from a gRPC
        status with several field violations), for one BadRequest field each."""
        return list(getattr(self, "_problems", None) or [self])


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


class UnavailableError(StagetuneError):
    """Something outside the run cannot be reached (the Hugging Face Hub, a tracker's server): the caller may
    retry; nothing the run wrote is lost."""

    grpc_code = "UNAVAILABLE"


class StoreUnavailableError(UnavailableError):
    """The object store cannot be reached: the caller may retry."""


class PreconditionError(StagetuneError):
    """The request is valid but the system is not in a state to run it."""

    grpc_code = "FAILED_PRECONDITION"


class NotWritableError(PreconditionError):
    """A folder, bucket or output the run must write to refuses writes (read-only, no permission, a file)."""


class UnauthenticatedError(StagetuneError):
    """A service refused the call: no token, or the wrong one (core/security.py)."""

    grpc_code = "UNAUTHENTICATED"


class CorruptError(StagetuneError):
    """Stored data that cannot be read back (a record or index damaged outside stagetune)."""

    grpc_code = "DATA_LOSS"


class PortInUseError(StagetuneError):
    """A server cannot listen on the port it was given."""

    grpc_code = "UNAVAILABLE"


class OutputInUseError(PreconditionError):
    """Another live run holds the output_dir's run lock."""


class RunMismatchError(PreconditionError):
    """The output_dir holds another run's checkpoints or weights: resuming or overwriting them would pass
    one run's weights off as another's, or lose them."""


class Problems(StagetuneError):
    """Several problems found in one pass, reported together: a user fixes a config in one round, not seven.

    Raise it through `Collector.raise_if_any`, which raises a lone problem as itself, so callers and tests
    that expect one error class see that class.
    """

    def __init__(self, problems: Iterable[StagetuneError], *, where: str = "") -> None:
        flat = [p for problem in problems for p in problem.problems]
        if not flat:
            raise ValueError("Problems needs at least one problem")
        codes = {p.grpc_code for p in flat}
        self.grpc_code = codes.pop() if len(codes) == 1 else "INVALID_ARGUMENT"
        heading = f"{len(flat)} problems" + (f" in {where}" if where else "") + ":"
        super().__init__(heading + "".join(f"\n  - {p}" for p in flat), field=flat[0].field)
        self._problems = flat


class ConfigProblems(Problems, ConfigError):
    """Several config problems: still a `ConfigError` for callers that catch config mistakes."""


class Collector:
    """Gathers problems from independent checks, then raises them all at once.

    ``with collector.check(): ...`` records a `StagetuneError` raised inside the block and goes on.
    """

    def __init__(self) -> None:
        self.problems: list[StagetuneError] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except StagetuneError as exc:
            self.add(exc)

    def add(self, error: StagetuneError) -> None:
        self.problems.extend(error.problems)

    def fields(self) -> set[str]:
        return {p.field for p in self.problems if p.field}

    def __bool__(self) -> bool:
        return bool(self.problems)

    def raise_if_any(self, where: str = "") -> None:
        if not self.problems:
            return
        if len(self.problems) == 1:
            raise self.problems[0]
        cls = ConfigProblems if all(isinstance(p, ConfigError) for p in self.problems) else Problems
        raise cls(self.problems, where=where)

"""Errors at the HTTP edge: one :class:`ApiError` carrying a status and the
fields both API shapes need, and the translation of me-local's exception tree
(:mod:`me_local.errors`) into it.

Client mistakes become 4xx; a busy ensemble is 503 with ``Retry-After``; only a
failure inside me-local itself (a bug, llama.cpp failing) is a 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (
    BackendError,
    ConfigError,
    ContextOverflowError,
    MeLocalError,
    ModelLoadError,
    QueueFullError,
    RequestError,
)


class ApiError(Exception):
    """An error response: HTTP status, message, OpenAI ``type``/``code``/``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or default_type(status)
        self.headers = headers or {}
        self.close = close
        """End the connection after this answer (its request was not read to the end)."""

    def __str__(self) -> str:
        return self.message


def default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "server_busy"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass(frozen=True)
class Status:
    """How one class of me-local's exceptions reaches a client."""

    status: int
    code: str | None = None
    """The error code; None: the exception's own ``code`` (a RequestError's)."""
    param: str | None = None
    """The ``param`` when the exception names none."""
    retry: bool = False
    """Send ``Retry-After`` (the ensemble is busy, or a model is not available yet)."""


STATUSES: dict[type[MeLocalError], Status] = {
    QueueFullError: Status(503, retry=True),
    ContextOverflowError: Status(400, param="messages"),
    RequestError: Status(400),
    # in a request this can only be an unknown ensemble (the config itself loaded at start-up)
    ConfigError: Status(404, "model_not_found", param="model"),
    ModelLoadError: Status(503, "model_unavailable", retry=True),
    BackendError: Status(500, "backend_error"),
    MeLocalError: Status(500, "internal_error"),
}
"""Every exception of the tree (:mod:`me_local.errors`) a request can raise, and its answer.
An exception takes the row of its nearest class (its own, else its parent's...)."""


def status_of(exc: MeLocalError) -> Status:
    for cls in type(exc).__mro__:
        row = STATUSES.get(cls)
        if row is not None:
            return row
    raise AssertionError("MeLocalError has a row")  # unreachable: MeLocalError is in the table


def from_exception(exc: BaseException, *, retry_after: int = 1) -> ApiError:
    """Translate an engine-side exception into the response a client gets: ``STATUSES``;
    anything else is a bug, answered 500 without its details (they go to the log)."""
    if isinstance(exc, ApiError):
        return exc
    if not isinstance(exc, MeLocalError):
        return ApiError(500, "internal error in me-local; see its log", code="internal_error")
    row = status_of(exc)
    request = exc if isinstance(exc, RequestError) else None
    code = row.code or (request.code if request is not None else None)
    param = (request.param if request is not None else None) or row.param
    headers = {"Retry-After": str(retry_after)} if row.retry else None
    return ApiError(row.status, exc.message, code=code, param=param, headers=headers)

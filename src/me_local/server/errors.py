"""Errors at the HTTP edge: one :class:`ApiError` carrying a status and the
fields both API shapes need, and the translation of me-local's exception tree
(:mod:`me_local.errors`) into it.

Client mistakes become 4xx; a busy ensemble is 503 with ``Retry-After``; only a
failure inside me-local itself (a bug, llama.cpp failing) is a 5xx.
"""

from __future__ import annotations

from ..engine import QueueFullError
from ..errors import BackendError, ConfigError, ContextOverflowError, MeLocalError, ModelLoadError, RequestError


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


def from_exception(exc: BaseException, *, retry_after: int = 1) -> ApiError:
    """Translate an engine-side exception into the response a client gets."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(503, exc.message, code=exc.code, headers={"Retry-After": str(retry_after)})
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, exc.message, code=exc.code, param=exc.param or "messages")
    if isinstance(exc, RequestError):
        status = 404 if exc.code in ("model_not_found",) else 400
        return ApiError(status, exc.message, code=exc.code, param=exc.param)
    if isinstance(exc, ConfigError):
        # in a request this can only be an unknown ensemble (the config itself loaded at start-up)
        return ApiError(404, exc.message, code="model_not_found", param="model")
    if isinstance(exc, ModelLoadError):
        return ApiError(503, exc.message, code="model_unavailable", headers={"Retry-After": str(retry_after)})
    if isinstance(exc, BackendError):
        return ApiError(500, exc.message, code="backend_error")
    if isinstance(exc, MeLocalError):
        return ApiError(500, exc.message, code="internal_error")
    return ApiError(500, "internal error in me-local; see its log", code="internal_error")

"""One exception tree for me-local.

Every error a user can cause is a :class:`MeLocalError`. The CLI and the HTTP
server translate it at their edge (exit status 2 and one line on stderr; a 4xx
with the API's own error shape); nothing below them prints or exits.

    MeLocalError
    ├── ConfigError          models.yaml is missing, malformed or inconsistent   (exit 2)
    │   ├── VocabMismatchError   two members of one ensemble disagree on their vocabulary
    │   └── SettingError         a setting's value does not suit a model (names the setting)
    ├── UsageError           command-line options that cannot be used as given   (exit 2)
    ├── ServiceError         the system refuses what me-local needs (port taken, platform)  (exit 2)
    ├── RequestError         a generation request is invalid (bad parameter, unknown member...)
    │   ├── ContextOverflowError the prompt does not fit the context window
    │   └── QueueFullError       the ensemble's slots and queue are full: retry later
    ├── ModelLoadError       llama.cpp could not load a model file              (exit 2)
    └── BackendError         llama.cpp failed while evaluating (decode error, KV cache full)

The HTTP status each one becomes is one table: ``me_local.server.errors.STATUSES``.
"""

from __future__ import annotations


class MeLocalError(Exception):
    """Base of every error me-local raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(MeLocalError):
    """The configuration (models.yaml or its command-line overrides) is wrong.

    The message names the file, the key and how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ""
        if file and key:
            where = f"{file}: {key}: "
        elif file:
            where = f"{file}: "
        elif key:
            where = f"{key}: "
        super().__init__(where + message)
        self.reason = message
        """The message without the file and key."""
        self.file = file
        self.key = key


class VocabMismatchError(ConfigError):
    """Members of one ensemble do not share a vocabulary."""


class SettingError(ConfigError):
    """A setting's value cannot be used with this model file (e.g. a quantized KV cache with
    a head size that is not a multiple of 32). ``setting`` names it (``kv_cache_type``), so
    the caller that knows where it was set can say so (file and key)."""

    def __init__(self, message: str, *, setting: str, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message, file=file, key=key)
        self.setting = setting


class UsageError(MeLocalError):
    """Command-line options that cannot be used as given: a value out of range (``--port``),
    or a combination me-local refuses (listening beyond this machine without an API key)."""

    exit_code = 2


class ServiceError(MeLocalError):
    """The system refuses what me-local needs to run: the port is taken, or the platform
    has no service manager me-local knows."""

    exit_code = 2


class RequestError(MeLocalError):
    """A generation request cannot be served as given (bad parameter, unknown model...)."""

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextOverflowError(RequestError):
    """The prompt (plus at least one generated token) does not fit in n_ctx."""

    def __init__(self, message: str, *, param: str | None = "prompt") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class QueueFullError(RequestError):
    """An ensemble's ``parallel`` slots are busy and ``max_queue`` requests wait already
    (or a request waited past its queue timeout): retry shortly."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="queue_full")


class ModelLoadError(MeLocalError):
    """A model file exists but llama.cpp could not load it."""

    exit_code = 2


class BackendError(MeLocalError):
    """llama.cpp failed during evaluation."""

"""One exception tree for me-local.

Every error a user can cause is a :class:`MeLocalError`. The CLI and the HTTP
server translate it at their edge (exit status 2 and one line on stderr; a 4xx
with the API's own error shape); nothing below them prints or exits.

    MeLocalError
    ├── ConfigError          models.yaml is missing, malformed or inconsistent   (exit 2)
    │   └── VocabMismatchError   two members of one ensemble disagree on their vocabulary
    ├── RequestError         a generation request is invalid (bad parameter, unknown member...)
    │   └── ContextOverflowError the prompt does not fit the context window
    ├── ModelLoadError       llama.cpp could not load a model file
    └── BackendError         llama.cpp failed while evaluating (decode error, KV cache full)
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
        self.file = file
        self.key = key


class VocabMismatchError(ConfigError):
    """Members of one ensemble do not share a vocabulary."""


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


class ModelLoadError(MeLocalError):
    """A model file exists but llama.cpp could not load it."""

    exit_code = 2


class BackendError(MeLocalError):
    """llama.cpp failed during evaluation."""

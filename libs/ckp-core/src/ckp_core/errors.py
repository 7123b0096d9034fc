"""The root exception of ckp-core: every error carries a stable code and whether a retry can help."""

from __future__ import annotations

from typing import Any


class CkpError(Exception):
    """Base of all ckp-core errors."""

    code: str = "ckp_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.details: dict[str, Any] = details or {}


class ConcurrencyError(CkpError):
    """An append lost the optimistic-concurrency race (expected sequence did not match)."""

    code = "concurrency_conflict"
    retryable = True


class InvalidInputVars(CkpError):
    """Run inputs failed validation; ``errors`` maps ``input_vars.<name>`` to messages."""

    code = "invalid_input_vars"

    def __init__(self, errors: dict[str, list[str]]) -> None:
        n = len(errors)
        super().__init__(f"{n} input variable{'s' if n != 1 else ''} failed validation")
        self.errors = errors


class CommandRefused(CkpError):
    """A command conflicts with its aggregate's state; its owner appends one ``command_rejected`` event.

    ``code`` is the stable problem code the gateway answers with; ``extra`` holds the problem's extension
    members (``current_status``, ``allowed``, ``diagnostics`` …).
    """

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail, code=code, details=extra)
        self.extra = extra

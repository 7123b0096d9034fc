"""The exception internal operations, transforms and output mappings raise (ckp.md §7.16).

Kept in its own dependency-free module so the pure execution library (``operations``, ``transforms``,
``mappings``) and the interpreter can share one exception type.
"""

from __future__ import annotations

from typing import Any

from ckp_core.events import ErrorObject
from ckp_core.expressions import ExpressionError

__all__ = ["StepError", "expression_failure", "failure"]


class StepError(Exception):
    """A step attempt, an operation or a transformation failed with an error object (§7.16).

    The library fills ``code``, ``message``, ``retryable`` and ``details``; the runtime adds the position fields
    (``node_id``, ``step_id``, ``frame``, ``attempt``) with ``error.model_copy(update=...)``.
    """

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(error.message)
        self.error = error


def failure(reason: str | None, message: str, *, code: str = "operation_failed", retryable: bool = False,
            **details: Any) -> StepError:
    """A :class:`StepError` with ``details.reason`` (when given) and further detail fields."""
    body: dict[str, Any] = {"reason": reason} if reason is not None else {}
    body.update(details)
    return StepError(ErrorObject(code=code, message=message, retryable=retryable, details=body))


def expression_failure(exc: ExpressionError, **details: Any) -> StepError:
    """The ``expression_error`` of a runtime evaluation failure: ``details {expression, position, reason}``."""
    return StepError(ErrorObject(code="expression_error", message=f"expression error: {exc}", retryable=False,
                                 details={**exc.details(), **details}))

"""Open SSE streams per principal (api.md §5.7 Limits, §6.5): at most ``LANGORCH_SSE_MAX_PER_PRINCIPAL``."""

from __future__ import annotations

from collections.abc import Callable

from langorch_gateway.problems import ApiProblem


class StreamSlots:
    """Counts the open streams of each principal in this gateway process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, principal: str) -> Callable[[], None]:
        """Take a slot or raise 429 ``too_many_streams``; returns an idempotent release (called both when the
        stream's generator ends and when the response finishes, so a stream that never started is released)."""
        if self.open.get(principal, 0) >= self.limit:
            raise ApiProblem("too_many_streams", f"{principal} already has {self.limit} open streams; close one",
                             limit=self.limit, retry_after_seconds=1)
        self.open[principal] = self.open.get(principal, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.open.get(principal, 1) - 1
            if left > 0:
                self.open[principal] = left
            else:
                self.open.pop(principal, None)

        return release

"""Retry policy: bounded exponential backoff."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Back off ``initial * 2**(attempt-1)`` s, at most ``maximum``; stop after ``max_attempts``."""

    max_attempts: int
    initial_seconds: float
    maximum_seconds: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        return float(min(self.maximum_seconds, self.initial_seconds * (2 ** min(exponent, 30))))

    def exhausted(self, attempt: int) -> bool:
        return attempt >= self.max_attempts

"""Reconnect backoff shared by both ends of the link (pure: no I/O, the caller sleeps)."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Jittered exponential backoff ("equal jitter"): half the step is fixed, half random.

    The random half spreads a fleet's reconnects after a broker restart instead of having every device retry in
    the same instant; the fixed half keeps a single device from retrying in a tight loop.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.SystemRandom()

    def next(self) -> float:
        """The next delay in seconds."""
        step = min(self.maximum, self.minimum * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        """Start again from the minimum (after a connection that lasted)."""
        self.attempt = 0

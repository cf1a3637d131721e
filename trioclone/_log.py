"""Rate-limited logging for rejections and faults.

Bad input can arrive at line rate; logging each rejection would cost more
than handling it and would flood the log.  ``Limited`` logs at most ``burst``
records per ``period`` seconds of Trio time for each topic, then one record
that says how many were suppressed.
"""

from __future__ import annotations

import logging

import trio


class Limited:
    """At most ``burst`` records per ``period`` seconds for each topic."""

    def __init__(
        self, logger: logging.Logger, burst: int = 10, period: float = 10.0
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._windows: dict[str, tuple[float, int]] = {}

    def log(self, level: int, topic: str, message: str, *args: object) -> None:
        now = trio.current_time()
        start, count = self._windows.get(topic, (now, 0))
        if now - start >= self.period:
            if count > self.burst:
                self.logger.log(
                    level, "%s: %d more suppressed", topic, count - self.burst
                )
            start, count = now, 0
        count += 1
        self._windows[topic] = (start, count)
        if count <= self.burst:
            self.logger.log(level, message, *args)

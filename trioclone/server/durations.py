"""How long something took, as a histogram: counts per upper bound.

The server records durations here whether or not a metrics endpoint runs
(recording is a bisect and two additions), and the endpoint reads them at
scrape time, so prometheus-client stays an optional extra.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

#: Upper bounds in seconds: a commit (ms) up to a large snapshot (minutes).
DEFAULT_BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Durations:
    """Observed durations: how many fell at or under each bound, their sum."""

    def __init__(self, bounds: Sequence[float] = DEFAULT_BOUNDS) -> None:
        if list(bounds) != sorted(set(bounds)) or not all(
            math.isfinite(b) for b in bounds
        ):
            raise ValueError("bounds are finite, increasing and distinct")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at or under it), ending with (inf, count)."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, math.inf), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out

"""Progress of long work, sans-IO: a count, its rate and an ETA, as one line.

``Meter`` is told how much is done and when (the time is passed in, from
Trio's clock), and renders a line such as
``load: 41,200/100,000 keys  12,300 keys/s  ETA 5 s``.  The rate is over the
last ``window`` seconds, so it follows a change of pace; the ETA is shown
only when the total is known, not yet reached, and the rate is above 0.
``due`` says when a redraw is allowed: not before ``delay`` seconds from the
start (short work shows nothing), then at most once every ``interval``.
Where the line is drawn, and whether, is the caller's business
(``trioclone.cli_progress``).
"""

from __future__ import annotations

import math
from collections import deque

#: Seconds between two redraws at most (five a second).
INTERVAL = 0.2
#: Seconds the rate is measured over.
WINDOW = 5.0
#: Seconds of work before anything is drawn.
DELAY = 0.5
#: Times this close count as equal (a ticker every ``interval`` seconds adds
#: them up in floating point).
EPSILON = 1e-6


class Meter:
    """How far one piece of work has gone; ``record`` it, then render it."""

    def __init__(
        self,
        label: str,
        total: int | None,
        start: float,
        *,
        unit: str = "keys",
        window: float = WINDOW,
        interval: float = INTERVAL,
        delay: float = DELAY,
    ) -> None:
        self.label = label
        #: How much there is to do, if known.
        self.total = total
        self.unit = unit
        self.start = start
        self.window = window
        self.interval = interval
        self.delay = delay
        #: The last count recorded, its time, and the failures so far.
        self.done = 0
        self.now = start
        self.failed = 0
        # (time, count), oldest first, at least ``interval / 2`` apart
        self._samples: deque[tuple[float, int]] = deque([(start, 0)])
        self._drawn_at: float | None = None

    def record(self, done: int, now: float, *, failed: int = 0) -> None:
        """``done`` finished (``failed`` of the work failed) at ``now``.

        A count that went down (the work started over) forgets the samples
        before it: the rate is measured from there.
        """
        if done < self.done:
            self._samples.clear()
        self.done, self.now, self.failed = done, now, failed
        samples = self._samples
        if not samples or now - samples[-1][0] >= self.interval / 2:
            samples.append((now, done))
        # keep one sample at or before the window's start, none older
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    def rate(self) -> float | None:
        """Units a second over the recent window; None before any time passed."""
        if not self._samples:
            return None
        since, then = self._samples[0]
        if self.now <= since:
            return None
        return (self.done - then) / (self.now - since)

    def eta(self) -> float | None:
        """Seconds left at the recent rate, if the total is known."""
        rate = self.rate()
        if self.total is None or not rate or rate <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) / rate

    def line(self) -> str:
        """The progress as one line (no line break)."""
        count = f"{self.done:,}"
        if self.total is not None and self.done <= self.total:
            count += f"/{self.total:,}"
        parts = [f"{self.label}: {count} {self.unit}"]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:,.0f} {self.unit}/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        return "  ".join(parts)

    def summary(self) -> str:
        """The whole work in one line: count, time taken, mean rate."""
        took = self.now - self.start
        text = f"{self.label}: {self.done:,} {self.unit} in {took:.1f} s"
        if took > 0:
            text += f", {self.done / took:,.0f} {self.unit}/s"
        if self.failed:
            text += f", {self.failed:,} failed"
        return text

    # -- redraws ---------------------------------------------------------------

    def due(self, now: float) -> bool:
        """May the line be drawn at ``now``?  Not before ``delay`` seconds
        of work, then not within ``interval`` of the last draw."""
        if self._drawn_at is None:
            return now - self.start >= self.delay - EPSILON
        return now - self._drawn_at >= self.interval - EPSILON

    def drawn(self, now: float) -> None:
        """The line was drawn at ``now``."""
        self._drawn_at = now

    @property
    def shown(self) -> bool:
        """The line was drawn at least once."""
        return self._drawn_at is not None


def duration(seconds: float) -> str:
    """``5 s``, ``2 min 05 s``, ``1 h 03 min``: to the nearest second, and
    at least ``1 s`` above 0 (an ETA of 0.2 s is ``1 s``)."""
    whole = round(seconds) if seconds >= 0.5 else math.ceil(max(seconds, 0.0))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"

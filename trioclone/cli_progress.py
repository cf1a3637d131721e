"""Progress of ``trioclone load`` and ``trioclone dump`` on a terminal.

A ``Meter`` (``trioclone.progress``) is drawn on stderr, redrawn in place
with a carriage return at most five times a second, and cleared at the end,
leaving a one-line summary.  Nothing is drawn when stderr is not a terminal,
with ``--quiet``, or for work done within half a second.  Stdout is never
touched: what ``dump`` prints there is data.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import TextIO

import trio
import zmq

from trioclone.client.agent import CloneClient
from trioclone.client.status import ask_all
from trioclone.endpoints import Endpoints
from trioclone.progress import Meter

#: Erase from the cursor to the end of the line (ANSI, every terminal).
CLEAR_TO_END = "\x1b[K"
#: Seconds to wait for the servers' key count (``dump``'s total).
STATUS_TIMEOUT = 2.0

#: How much is done, and how much of it failed.
Sample = Callable[[], tuple[int, int]]


def wanted(args: argparse.Namespace) -> bool:
    """Progress is drawn for this command: it has ``--quiet`` (``load``,
    ``dump``), which was not given, and stderr is a terminal."""
    return getattr(args, "quiet", True) is False and sys.stderr.isatty()


def terminal_width(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` is, 80 if it does not say."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 80
    return columns or 80


class ProgressLine:
    """A meter drawn on one line of a terminal ``stream``."""

    def __init__(self, meter: Meter, stream: TextIO, width: int = 80) -> None:
        self.meter = meter
        self.stream = stream
        self.width = max(width - 1, 10)  # a full line would wrap, then \r fails

    def update(self, done: int, now: float, *, failed: int = 0) -> None:
        """Record the count; redraw if the meter says a redraw is due."""
        self.meter.record(done, now, failed=failed)
        if self.meter.due(now):
            self.stream.write("\r" + self.meter.line()[: self.width] + CLEAR_TO_END)
            self.stream.flush()
            self.meter.drawn(now)

    def finish(self, done: int, now: float, *, failed: int = 0) -> None:
        """The work ended: clear the line and leave the summary, if the line
        was ever drawn (short work shows nothing at all)."""
        self.meter.record(done, now, failed=failed)
        if self.meter.shown:
            self.stream.write("\r" + CLEAR_TO_END + self.meter.summary() + "\n")
            self.stream.flush()


async def redraw(line: ProgressLine, sample: Sample) -> None:
    """Sample and redraw every ``interval`` seconds, until cancelled."""
    while True:
        done, failed = sample()
        line.update(done, trio.current_time(), failed=failed)
        await trio.sleep(line.meter.interval)


@contextmanager
def in_background(
    nursery: trio.Nursery, task: Callable[[], Awaitable[None]]
) -> Iterator[None]:
    """``task`` runs in ``nursery`` while the body runs, and is cancelled
    when it ends (whatever ``nursery`` runs still)."""
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await task()

    nursery.start_soon(run)
    try:
        yield
    finally:
        scope.cancel()


@contextmanager
def shown(
    args: argparse.Namespace,
    nursery: trio.Nursery,
    meter: Meter,
    sample: Sample,
) -> Iterator[None]:
    """While the body runs, ``meter`` is redrawn from ``sample`` by a task in
    ``nursery``, if progress is ``wanted``; then the line is cleared."""
    if not wanted(args):
        yield
        return
    line = ProgressLine(meter, sys.stderr, terminal_width(sys.stderr))
    try:
        with in_background(nursery, partial(redraw, line, sample)):
            yield
    finally:
        done, failed = sample()
        line.finish(done, trio.current_time(), failed=failed)


@contextmanager
def snapshot_shown(
    args: argparse.Namespace,
    clone: CloneClient,
    servers: list[Endpoints],
    subtree: str,
) -> Iterator[None]:
    """The snapshot a client is receiving, while the body waits for it
    (for a command that sets ``progress``: its label).

    The count is the keys received so far (``clone.snapshot_progress``).
    The total is best-effort: the key count in the status reply of the
    server the client syncs from (``trioclone status``), asked once.  With
    a prefix (a subtree: the status counts the whole map), or if the status
    request fails, the line shows the count and rate without a total or ETA.
    """
    label = getattr(args, "progress", None)
    if label is None or not wanted(args):
        yield
        return
    meter = Meter(f"{label} (snapshot)", None, trio.current_time())
    sizes: dict[str, int] = {}

    def sample() -> tuple[int, int]:
        if clone.server is not None:
            meter.total = sizes.get(clone.server)
        received = clone.snapshot_progress
        if received is None:  # none in progress: the snapshot went live, or
            # the client waits to ask again
            received = len(clone.view(subtree)) if clone.synced else 0
        return received, 0

    async def ask_sizes() -> None:
        timeout = min(args.timeout, STATUS_TIMEOUT)
        try:
            results = await ask_all(servers, timeout, None, args.curve)
        except zmq.ZMQError:
            return  # best-effort: no total
        for result in results:
            keys = (result.status or {}).get("keys")
            if isinstance(keys, int):
                sizes[str(result.server)] = keys

    with ExitStack() as stack:
        stack.enter_context(shown(args, clone.nursery, meter, sample))
        if not subtree:
            stack.enter_context(in_background(clone.nursery, ask_sizes))
        yield


@contextmanager
def lines_shown(
    args: argparse.Namespace, label: str, total: int
) -> Iterator[Callable[[int], None]]:
    """Lines written to stdout, counted by calling the function yielded with
    the count so far (cheap: it looks at the clock once in 1,000 lines).
    Drawn only when stdout is not a terminal: there, the lines show it."""
    if not wanted(args) or sys.stdout.isatty():
        yield lambda written: None
        return
    line = ProgressLine(
        Meter(label, total, trio.current_time(), unit="lines"),
        sys.stderr,
        terminal_width(sys.stderr),
    )
    latest = 0

    def advance(written: int) -> None:
        nonlocal latest
        latest = written
        if written % 1000 == 0:
            line.update(written, trio.current_time())

    try:
        yield advance
    finally:
        line.finish(latest, trio.current_time())

"""Progress on a terminal (trioclone/cli_progress.py), under the autojump
clock: redraws at most five a second, none for short work, none unless
stderr is a terminal or with ``--quiet``, the line cleared at the end; and
the client's count of snapshot keys received (``snapshot_progress``)."""

from __future__ import annotations

import io
import itertools
import re
import sys
from argparse import Namespace

import pytest
import trio
from trio.testing import MockClock

from trioclone.cli_progress import (
    CLEAR_TO_END,
    ProgressLine,
    lines_shown,
    redraw,
    shown,
    snapshot_shown,
)
from trioclone.client.agent import CloneClient
from trioclone.core.chp import KVMsg, encode_kvmsg, kthxbai
from trioclone.core.client import ClientCore
from trioclone.endpoints import Endpoints
from trioclone.progress import Meter


class Terminal(io.StringIO):
    """A stream that says it is a terminal, and when each write came."""

    def __init__(self, tty: bool = True) -> None:
        super().__init__()
        self.tty = tty
        self.times: list[float] = []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.times.append(trio.current_time())
        return super().write(text)


def draws(text: str) -> list[str]:
    """The lines drawn in place (each starts with a carriage return)."""
    return [part.removesuffix(CLEAR_TO_END) for part in text.split("\r")[1:]]


async def test_redraws_come_at_most_five_a_second_after_half_a_second(
    autojump_clock: MockClock,
) -> None:
    start = trio.current_time()
    terminal = Terminal()
    line = ProgressLine(Meter("load", 20_000, start), terminal)

    def sample() -> tuple[int, int]:  # 1,000 keys a virtual second
        return round(1_000 * (trio.current_time() - start)), 0

    with trio.move_on_after(10.05):
        await redraw(line, sample)
    times = [t - start for t in terminal.times]
    assert times[0] >= 0.5
    assert all(b - a >= 0.2 - 1e-6 for a, b in itertools.pairwise(times))
    assert 45 <= len(times) <= 48  # 9.5 s at five a second
    last = draws(terminal.getvalue())[-1]
    assert last == "load: 10,000/20,000 keys  1,000 keys/s  ETA 10 s"


async def test_updates_far_more_often_are_drawn_five_times_a_second(
    autojump_clock: MockClock,
) -> None:
    start = trio.current_time()
    terminal = Terminal()
    line = ProgressLine(Meter("dump", 50_000, start, unit="lines"), terminal)
    for n in range(1, 501):  # a hundred updates a second for 5 s
        await trio.sleep(0.01)
        line.update(n * 10, trio.current_time())
    times = [t - start for t in terminal.times]
    assert times[0] >= 0.5 - 1e-6
    assert all(b - a >= 0.2 - 1e-6 for a, b in itertools.pairwise(times))
    assert 22 <= len(times) <= 23  # 4.5 s at five a second
    for drawn in draws(terminal.getvalue()):
        pattern = r"dump: [\d,]+/50,000 lines  1,000 lines/s  ETA \d+ s"
        assert re.fullmatch(pattern, drawn), drawn


def progress_args(quiet: bool = False) -> Namespace:
    return Namespace(quiet=quiet, progress="dump", timeout=5.0, curve=None)


@pytest.mark.parametrize(
    ("tty", "quiet", "drawn"),
    [(True, False, True), (True, True, False), (False, False, False)],
)
async def test_progress_is_drawn_only_on_a_terminal_and_never_with_quiet(
    autojump_clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
    tty: bool,
    quiet: bool,
    drawn: bool,
) -> None:
    stderr = Terminal(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    start = trio.current_time()
    done = 0
    async with trio.open_nursery() as nursery:
        with shown(
            progress_args(quiet), nursery, Meter("load", 30, start), lambda: (done, 1)
        ):
            await trio.sleep(0.05)  # (no tie with the redraws, every 0.2 s)
            for _ in range(30):
                await trio.sleep(0.1)
                done += 1
            await trio.sleep(0.05)
    text = stderr.getvalue()
    if not drawn:
        assert text == ""
        return
    # first at 0.6 s: 5 done (from 0.15 s on), 25 to go at 5 / 0.6 s
    assert draws(text)[0] == "load: 5/30 keys  8 keys/s  ETA 3 s  1 failed"
    # cleared at the end, leaving the summary on a line of its own
    summary = "load: 30 keys in 3.1 s, 10 keys/s, 1 failed"
    assert text.endswith(f"\r{CLEAR_TO_END}{summary}\n")


async def test_short_work_shows_nothing(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    async with trio.open_nursery() as nursery:
        meter = Meter("load", 3, trio.current_time())
        with shown(progress_args(), nursery, meter, lambda: (3, 0)):
            await trio.sleep(0.4)
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("stdout_tty", [False, True])
async def test_lines_written_are_counted_unless_stdout_is_a_terminal(
    autojump_clock: MockClock,
    monkeypatch: pytest.MonkeyPatch,
    stdout_tty: bool,
) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(sys, "stdout", Terminal(tty=stdout_tty))
    with lines_shown(progress_args(), "dump", 5_000) as written:
        for number in range(1, 5_001):  # 1,000 lines a second, no await
            autojump_clock.jump(0.001)
            written(number)
    text = sys.stderr.getvalue()
    if stdout_tty:
        assert text == ""  # the lines themselves show it
        return
    assert draws(text)[:2] == [
        "dump: 1,000/5,000 lines  1,000 lines/s  ETA 4 s",
        "dump: 2,000/5,000 lines  1,000 lines/s  ETA 3 s",
    ]
    assert text.endswith("dump: 5,000 lines in 5.0 s, 1,000 lines/s\n")


def kv(key: bytes, sequence: int, body: bytes) -> list[bytes]:
    return encode_kvmsg(KVMsg(key, sequence, b"", {}, body))


def hand_fed_client(subtree: bytes = b"") -> tuple[ClientCore, CloneClient]:
    """A client whose core the test feeds: no sockets, no agent."""
    core = ClientCore(1, [subtree])
    server = Endpoints.parse("tcp://127.0.0.1:5556")
    return core, CloneClient(core, [server], sockets=lambda: None)  # type: ignore[arg-type,return-value]


def test_snapshot_progress_counts_the_keys_of_the_snapshot_being_received() -> None:
    core, clone = hand_fed_client()
    assert clone.snapshot_progress is None  # not asked yet
    core.poll(0.0)  # connect, ask for the snapshot
    assert clone.snapshot_progress == 0
    core.on_reply(kv(b"/a", 1, b"1"), 0.0)
    core.on_reply(kv(b"/b", 2, b"2"), 0.0)
    core.on_reply(kv(b"/a", 3, b"again"), 0.0)  # one key, counted once
    assert clone.snapshot_progress == 2
    core.poll(1.0)  # no more reply in time: the client backs off
    assert clone.snapshot_progress is None
    core.poll(1.5)  # and asks again: counted from 0
    assert clone.snapshot_progress == 0
    core.on_reply(kv(b"/a", 3, b"1"), 1.5)
    core.on_reply(kthxbai(3, b""), 1.5)  # complete: it went live
    assert clone.snapshot_progress is None
    assert len(clone.view()) == 1


async def test_a_prefix_snapshot_shows_count_and_rate_without_a_total(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status counts the whole map: with a prefix, no total is asked
    for, so there is no ETA."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    core, clone = hand_fed_client(b"/p/")
    core.poll(trio.current_time())
    async with trio.open_nursery() as nursery:
        clone.nursery = nursery
        servers = [Endpoints.parse("tcp://127.0.0.1:5556")]
        with snapshot_shown(progress_args(), clone, servers, "/p/"):
            for n in range(20):  # 100 keys a second
                await trio.sleep(0.01)
                core.on_reply(kv(b"/p/%03d" % n, n + 1, b"v"), trio.current_time())
            await trio.sleep(0.5)
    text = sys.stderr.getvalue()
    assert draws(text)[0] == "dump (snapshot): 20 keys  33 keys/s"
    assert "ETA" not in text

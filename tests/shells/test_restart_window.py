"""Found by review: the window on disk."""

from __future__ import annotations

from pathlib import Path

from tests.core.test_server_core import (
    _uuid,
    exchange_hugz,
    heartbeat,
    kvset,
    run,
    split_pair,
)
from tests.shells.test_datadir import WALL, reopen
from trioclone.core.bstar import BinaryStar
from trioclone.server.datadir import DataDir


def test_a_window_hand_over_in_the_same_commit_ages_a_fresh_uuid(
    tmp_path: Path,
) -> None:
    """The winner of a long split replaces U50 with U51 (a client's write)
    and, in the same collector batch (one flush), takes the loser's window
    hand-over, whose UUIDs are ~490 s old.  DataDir._write keeps one row per
    commit with the time of the LAST journal entry (added[-1]), assuming
    journal times only grow: U50 goes to disk as ~490 s old."""
    primary, backup = split_pair(journal=True)
    data = DataDir(tmp_path)
    data.flush(primary, 10.0, WALL + 10.0)
    backup.collect(kvset(b"/x", b"one", _uuid(40)), 11.0)
    backup.collect(kvset(b"/x", b"two", _uuid(41)), 11.5)  # U40 in its window
    primary.collect(kvset(b"/k", b"old", _uuid(50)), 12.0)
    data.flush(primary, 12.0, WALL + 12.0)
    # The split heals at 500: the backup steps down, hands over.
    exchange_hugz(primary, backup, 500.0)
    heartbeat(primary, backup, 500.0)
    run(backup, 500.0)
    # A client write lands in the same collector batch, just before.
    assert primary.collect(kvset(b"/k", b"new", _uuid(51)), 500.0) is not None
    for frames in backup.relays:
        primary.collect(frames, 500.0)
    data.flush(primary, 500.0, WALL + 500.0)
    rows = data._db.execute(
        f"SELECT at - ?, length(uuids)/16 FROM applied{data._current} ORDER BY rowid",
        (WALL,),
    ).fetchall()
    print("window rows (at - WALL, uuids):", rows)
    data.close()  # killed
    again = reopen(tmp_path, 501.0, WALL + 501.0, bstar=BinaryStar(True, 501.0))
    again.poll(501.0)  # first housekeeping (not active yet: evicts)
    print("U50 remembered after restart:", _uuid(50) in again.applied)
    # U50 was replaced 1 s ago: within the 120 s horizon a resend must be a repeat
    assert _uuid(50) in again.applied


def test_the_aged_uuid_lets_a_resend_undo_a_newer_write(tmp_path: Path) -> None:
    primary, backup = split_pair(journal=True)
    data = DataDir(tmp_path)
    data.flush(primary, 10.0, WALL + 10.0)
    backup.collect(kvset(b"/x", b"one", _uuid(40)), 11.0)
    backup.collect(kvset(b"/x", b"two", _uuid(41)), 11.5)
    primary.collect(kvset(b"/k", b"old", _uuid(50)), 499.5)  # sent at 499.5
    data.flush(primary, 499.5, WALL + 499.5)
    exchange_hugz(primary, backup, 500.0)
    heartbeat(primary, backup, 500.0)
    run(backup, 500.0)
    assert primary.collect(kvset(b"/k", b"new", _uuid(51)), 500.0) is not None
    for frames in backup.relays:
        primary.collect(frames, 500.0)
    data.flush(primary, 500.0, WALL + 500.0)
    data.close()
    again = reopen(tmp_path, 501.0, WALL + 501.0, bstar=BinaryStar(True, 501.0))
    again.poll(501.0)
    assert again.on_vote(504.0) is not None  # peer gone: a client's vote
    run(again, 504.0)
    # the writer of "old" (sent at 499.5, never saw it confirmed: the
    # server was killed) resends it within its 30 s write horizon
    resent = again.collect(kvset(b"/k", b"old", _uuid(50)), 505.0)
    print(
        "resend published:",
        resent is not None,
        "value now:",
        again.store.get(b"/k").body,
    )
    assert again.store.get(b"/k").body == b"new"

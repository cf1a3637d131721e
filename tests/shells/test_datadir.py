"""The map on disk (server/datadir.py): what it keeps, what it refuses, and
what a server restarted from it does."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import zmq

from tests.core.test_server_core import (
    ACTIVES,
    OURS,
    U1,
    U2,
    U3,
    U4,
    _drain,
    _transfer,
    _uuid,
    actions,
    active_core,
    exchange_hugz,
    heartbeat,
    kvpub,
    kvset,
    new_core,
    passive_core,
    run,
    split_pair,
    state,
    sync,
    take_over,
)
from tests.shells.test_standalone import standalone
from trioclone.core.bstar import BinaryStar, State
from trioclone.core.chp import hugz, kthxbai
from trioclone.core.replica import Request
from trioclone.core.server import Role, ServerCore
from trioclone.server.datadir import FILE, DataDir, DataDirError, Kept

Context = zmq.Context[Any]
WALL = 1_800_000_000.0  # the wall clock when the tests' first server ran


def reopen(folder: Path, now: float, wall: float, **options: object) -> ServerCore:
    """A new server's core, loaded from ``folder`` (then closed)."""
    core = new_core(journal=True, **options)
    data = DataDir(folder)
    try:
        data.load(core, now, wall)
    finally:
        data.close()
    return core


def on_disk(folder: Path) -> tuple[int, list[bytes]]:
    """The sequence and keys of the map committed in ``folder``, read as
    another process would while its server runs."""
    with sqlite3.connect(f"file:{folder / FILE}?mode=ro", uri=True) as db:
        current, sequence = db.execute("SELECT current, sequence FROM meta").fetchone()
        keys = [row[0] for row in db.execute(f"SELECT key FROM kv{current}")]
    return sequence, sorted(keys)


def kept(folder: Path, *writes: list[bytes]) -> None:
    """An active server's map after ``writes`` (at 0.0), kept in ``folder``."""
    core = active_core(journal=True)
    data = DataDir(folder)
    data.load(core, 0.0, WALL)
    for frames in writes:
        core.collect(frames, 0.0)
    data.flush(core, 0.0, WALL)
    data.close()


def killed_after(
    folder: Path, *, heard: list[list[bytes]], unheard: list[list[bytes]]
) -> ServerCore:
    """A durable primary (its map in ``folder``) whose backup synced
    ``heard``; it then applied ``unheard``, which never reached the backup,
    and was killed.  Returns the backup, still passive."""
    primary = new_core(bstar=BinaryStar(True, 0.0), journal=True)
    data = DataDir(folder)
    data.load(primary, 0.0, WALL)
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    for frames in heard:
        primary.collect(frames, 0.5)
    backup = new_core(bstar=BinaryStar(False, 0.0))
    backup.on_peer_state(state(State.ACTIVE), 0.0)
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 1.0)][:-1]
    sync(backup, primary.store.sequence, snapshot, 1.0, lineage=OURS)
    for frames in unheard:
        primary.collect(frames, 2.0)
    data.flush(primary, 2.0, WALL + 2.0)
    data.close()
    return backup


def test_the_map_comes_back_with_its_sequence_lineage_window_and_deadlines(
    tmp_path: Path,
) -> None:
    core = active_core(journal=True)
    data = DataDir(tmp_path)
    assert data.load(core, 0.0, WALL) is None  # nothing kept yet
    core.collect(kvset(b"/a", b"1", U1), 1.0)
    core.collect(kvset(b"/a", b"2", U2), 1.0)  # U1 goes to the window
    core.collect(kvset(b"/t", b"x", U3, {"ttl": "30"}), 1.0)
    data.flush(core, 1.0, WALL + 1.0)
    data.close()

    # 10 s later by the wall clock, on a clock that started elsewhere
    again = new_core(journal=True)
    data = DataDir(tmp_path)
    assert data.load(again, 500.0, WALL + 11.0) == Kept(OURS, 3, 2, 1, True)
    data.close()
    again.start(500.0)
    assert again.role is Role.ACTIVE and again.lineage == OURS and not again.fresh
    assert again.store.get(b"/a").body == b"2"
    assert again.store.deadline(b"/t") == pytest.approx(520.0)
    assert again.collect(kvset(b"/a", b"1", U1), 500.0) is None  # a repeat
    assert again.collect(kvset(b"/a", b"2", U2), 500.0) is None
    published = again.collect(kvset(b"/b", b"new", U4), 500.0)
    assert published is not None and published[1] == (4).to_bytes(8, "big")


def test_a_key_that_expired_while_down_is_expired_at_the_start(tmp_path: Path) -> None:
    kept(tmp_path, kvset(b"/t", b"x", U1, {"ttl": "5"}), kvset(b"/kept", b"y", U2))
    again = reopen(tmp_path, 3.0, WALL + 60.0)
    again.start(3.0)
    deletes = again.expire(3.0)
    assert [frames[0] for frames in deletes] == [b"/t"]
    assert b"/t" not in again.store and b"/kept" in again.store
    assert deletes[0][1] == (3).to_bytes(8, "big")  # a fresh sequence


def test_each_flush_writes_only_what_changed_and_a_delete_leaves_no_row(
    tmp_path: Path,
) -> None:
    core = active_core(journal=True)
    data = DataDir(tmp_path)
    data.load(core, 0.0, WALL)
    for n in range(50):
        core.collect(kvset(b"/k%d" % n, b"v", _uuid(100 + n)), 0.0)
    data.flush(core, 0.0, WALL)
    statements: list[str] = []
    data._db.set_trace_callback(statements.append)
    core.collect(kvset(b"/k1", b"", _uuid(200)), 1.0)  # a delete
    data.flush(core, 1.0, WALL + 1.0)
    data.flush(core, 1.0, WALL + 1.0)  # nothing changed: nothing written
    assert statements.count("COMMIT") == 1
    assert sum("kv" in s for s in statements) == 1  # the one delete
    data.close()
    again = reopen(tmp_path, 0.0, WALL)
    assert len(again.store) == 49 and b"/k1" not in again.store


def test_a_passive_keeps_its_copy_and_a_resync_replaces_it_whole(
    tmp_path: Path,
) -> None:
    snapshot = [kvpub(b"/old-%d" % n, n + 1, uuid=_uuid(n + 1)) for n in range(20)]
    core = passive_core(20, snapshot, journal=True)
    data = DataDir(tmp_path)
    data.flush(core, 0.0, WALL)
    core.on_update(kvpub(b"/streamed", 21, uuid=_uuid(50)), 0.5)
    data.flush(core, 0.5, WALL)
    sequence, keys = on_disk(tmp_path)
    assert sequence == 21 and len(keys) == 21

    # A gap in the stream: the passive syncs again, from another map state.
    core.on_update(kvpub(b"/after-gap", 30, uuid=_uuid(51)), 1.0)
    assert actions(core)[-1] == Request(b"")
    core.on_reply(kvpub(b"/new", 31, uuid=_uuid(52)), 1.0)
    data.flush(core, 1.0, WALL + 1.0)  # written ahead, not yet the map
    assert on_disk(tmp_path) == (sequence, keys)
    core.on_reply(kthxbai(31, b"", {"lineage": ACTIVES}), 1.0)
    assert actions(core) == [Request(b"\x00history")]
    core.on_reply(kthxbai(31, b"\x00history", {"lineage": ACTIVES}), 1.0)
    run(core, 1.0)
    data.flush(core, 1.0, WALL + 1.0)
    data.close()
    copy = reopen(tmp_path, 0.0, WALL, bstar=BinaryStar(False, 0.0))
    assert sorted(copy.store.keys()) == [b"/new"] and copy.store.sequence == 31
    assert copy.lineage == ACTIVES and not copy.own_writes
    assert copy.branch == 31  # all of it came from the peer


def test_a_restarted_active_hands_over_what_its_peer_never_heard(
    tmp_path: Path,
) -> None:
    """Asynchronous replication: the active confirmed writes the passive had
    not received when the active was killed.  Restarted from disk, it finds
    its peer active and hands them over; each yields to a write the peer
    made to its key after taking over (so after it)."""
    backup = killed_after(
        tmp_path,
        heard=[kvset(b"/heard", b"h", U1)],
        unheard=[kvset(b"/unheard", b"p", U2), kvset(b"/both", b"old", U3)],
    )

    assert backup.on_vote(10.0) is not None and backup.role is Role.ACTIVE
    run(backup, 10.0)
    assert backup.collect(kvset(b"/both", b"new", U4), 11.0) is not None

    restarted = new_core(bstar=BinaryStar(True, 20.0), journal=True)
    data = DataDir(tmp_path)
    kept = data.load(restarted, 20.0, WALL + 20.0)
    data.close()
    assert kept is not None and kept.active and restarted.own_writes
    exchange_hugz(restarted, backup, 20.0)
    restarted.on_peer_state(state(State.ACTIVE), 20.0)
    assert restarted.role is Role.PASSIVE
    run(restarted, 20.0)
    assert restarted.relays
    for frames in restarted.relays:
        backup.collect(frames, 20.5)
    assert backup.store.get(b"/unheard").body == b"p"
    assert backup.store.get(b"/both").body == b"new"
    assert backup.store.get(b"/heard").body == b"h"
    assert backup.stats["handoff_superseded"] == 1
    assert backup.collect(kvset(b"/both", b"old", U3), 21.0) is None  # a repeat


def test_a_server_killed_while_handing_over_hands_over_again(tmp_path: Path) -> None:
    """A split heals: the backup steps down and hands over what it accepted;
    killed before the primary has it, it still holds it as its own."""
    primary, backup = split_pair(backup_options={"journal": True})
    data = DataDir(tmp_path)
    data.flush(backup, 10.0, WALL + 10.0)
    backup.collect(kvset(b"/b-only", b"b", _uuid(21)), 11.0)
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    assert backup.role is Role.PASSIVE and backup.own_writes
    data.flush(backup, 20.0, WALL + 20.0)  # the step-down, before any step
    run(backup, 20.0)
    assert backup.relays and backup.own_writes
    data.flush(backup, 20.0, WALL + 20.0)
    data.close()  # killed: the primary never got the hand-over
    again = reopen(tmp_path, 30.0, WALL + 30.0, bstar=BinaryStar(False, 30.0))
    assert again.own_writes
    exchange_hugz(again, primary, 30.0)
    again.on_peer_state(state(State.ACTIVE), 30.0)
    run(again, 30.0)
    for frames in again.relays:
        primary.collect(frames, 30.5)
    assert primary.store.get(b"/b-only").body == b"b"


def test_a_restarted_passive_hands_nothing_over(tmp_path: Path) -> None:
    core = passive_core(1, [kvpub(b"/a", 1)], journal=True)
    data = DataDir(tmp_path)
    data.flush(core, 0.0, WALL)
    data.close()
    again = reopen(tmp_path, 5.0, WALL + 5.0, bstar=BinaryStar(False, 5.0))
    again.on_peer_state(state(State.ACTIVE), 5.0)
    run(again, 5.0)
    assert again.role is Role.PASSIVE and not again.relays


def test_a_restarted_passive_taking_over_keeps_what_it_heard_of_its_map(
    tmp_path: Path,
) -> None:
    """The history its copy belongs to is kept too: the active's HUGZ name
    it, so what the stream carries is for this map, even before a sync."""
    core = passive_core(1, [kvpub(b"/a", 1)], journal=True)
    data = DataDir(tmp_path)
    data.flush(core, 0.0, WALL)
    data.close()
    again = reopen(tmp_path, 5.0, WALL + 5.0, bstar=BinaryStar(False, 5.0))
    again.on_peer_state(state(State.ACTIVE), 5.0)
    again.poll(5.0)  # connects, asks for a snapshot that will not come
    again.on_update(hugz(1, {"lineage": ACTIVES}), 5.1)
    again.on_update(kvpub(b"/b", 2, uuid=U2), 5.2)
    take_over(again, 10.0)  # the active died before the snapshot came
    assert again.store.get(b"/b") is not None and again.store.sequence == 2


def test_a_map_on_disk_that_is_not_the_peers_stops_the_server(tmp_path: Path) -> None:
    kept(tmp_path, kvset(b"/ours", b"o", U1))
    again = reopen(tmp_path, 0.0, WALL, bstar=BinaryStar(False, 0.0))
    again.on_peer_state(state(State.ACTIVE), 0.0)
    again.poll(0.0)
    assert actions(again)[-1] == Request(b"")
    again.on_reply(kvpub(b"/theirs", 7), 0.0)
    again.on_reply(kthxbai(7, b"", {"lineage": ACTIVES}), 0.0)  # not fresh
    assert again.conflict is not None and OURS in again.conflict
    assert sorted(again.store.keys()) == [b"/ours"]


def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b"this is not SQLite " * 100)
    with pytest.raises(DataDirError, match=str(tmp_path / FILE)):
        DataDir(tmp_path)
    assert (tmp_path / FILE).read_bytes().startswith(b"this is not")  # untouched


def test_a_corrupt_record_is_refused_and_nothing_is_loaded(tmp_path: Path) -> None:
    kept(tmp_path, kvset(b"/a", b"1", U1))
    with sqlite3.connect(tmp_path / FILE) as db:
        db.execute("UPDATE kv0 SET record = x'0000'")
    data = DataDir(tmp_path)
    with pytest.raises(DataDirError, match="is corrupt"):
        data.load(new_core(journal=True), 0.0, WALL)
    data.close()


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / FILE) as db:
        db.execute("CREATE TABLE something (x)")
    with pytest.raises(DataDirError, match="cannot be opened"):
        DataDir(tmp_path)


def test_one_folder_serves_one_server_at_a_time(tmp_path: Path) -> None:
    first = DataDir(tmp_path)
    with pytest.raises(DataDirError, match="in use by another server"):
        DataDir(tmp_path)
    first.close()
    DataDir(tmp_path).close()


def test_reset_starts_empty(tmp_path: Path) -> None:
    kept(tmp_path, kvset(b"/a", b"1", U1))
    data = DataDir(tmp_path, reset=True)
    assert data.load(new_core(journal=True), 0.0, WALL) is None
    data.close()


def test_an_unknown_fsync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="fsync"):
        DataDir(tmp_path, "sometimes")


def test_the_window_on_disk_forgets_what_the_window_forgot(tmp_path: Path) -> None:
    core = active_core(journal=True, applied_horizon=10.0)
    data = DataDir(tmp_path)
    data.load(core, 0.0, WALL)
    core.collect(kvset(b"/a", b"1", U1), 0.0)
    core.collect(kvset(b"/a", b"2", U2), 0.0)  # U1 replaced at 0
    data.flush(core, 0.0, WALL)
    core.collect(kvset(b"/a", b"3", U3), 30.0)  # U2 replaced at 30
    core.poll(30.0)  # housekeeping: U1 is past the horizon
    data.flush(core, 30.0, WALL + 30.0)
    data.close()
    again = reopen(tmp_path, 30.0, WALL + 30.0)
    assert U2 in again.applied and U1 not in again.applied


async def test_nothing_is_published_before_it_is_on_disk(
    tmp_path: Path, context: Context, autojump_clock: trio.testing.MockClock
) -> None:
    """Every KVPUB the server sends is already committed, in one commit per
    batch of writes drained: a reader of the file sees it at the moment it
    is published."""
    seen: list[bool] = []

    def on_disk(frames: Sequence[bytes]) -> None:
        if frames[0] == b"HUGZ":
            return
        with sqlite3.connect(f"file:{tmp_path / FILE}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT count(*) FROM kv0 WHERE key = ?", (frames[0],))
            seen.append(rows.fetchone()[0] == 1)

    async with standalone(context, data_dir=str(tmp_path)) as served:
        served.server.publisher.observer = on_disk
        data = served.server.data
        assert data is not None
        statements: list[str] = []
        data._db.set_trace_callback(statements.append)
        writer = served.sockets.open(zmq.PUB, connect=[served.endpoints.collector])
        await trio.sleep(0.5)
        for n in range(100):
            writer.try_send(kvset(b"/w%d" % n, b"v", _uuid(300 + n)))
        await trio.sleep(1.0)
        assert served.sequence == 100
        assert statements.count("COMMIT") < 10  # a group commit per batch
    assert seen == [True] * 100

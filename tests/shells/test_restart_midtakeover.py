"""Found by review: a server killed mid-takeover persists a stale branch."""

from __future__ import annotations

from pathlib import Path

from tests.core.test_server_core import (
    OURS,
    U1,
    U2,
    U3,
    _drain,
    _transfer,
    exchange_hugz,
    kvset,
    new_core,
    run,
    state,
    sync,
)
from tests.shells.test_datadir import WALL
from trioclone.core.bstar import BinaryStar, State
from trioclone.core.server import Role
from trioclone.server.datadir import DataDir


def test_killed_mid_takeover_hands_over_its_whole_map(tmp_path: Path) -> None:
    a = new_core(bstar=BinaryStar(True, 0.0), journal=True)
    da = DataDir(tmp_path / "a")
    da.load(a, 0.0, WALL)
    a.on_peer_state(state(State.BACKUP), 0.0)
    run(a, 0.0)
    a.collect(kvset(b"/k", b"doomed", U1), 0.5)
    a.collect(kvset(b"/l", b"kept", U2), 0.5)
    b = new_core(bstar=BinaryStar(False, 0.0), journal=True)
    db = DataDir(tmp_path / "b")
    db.load(b, 0.0, WALL)
    b.on_peer_state(state(State.ACTIVE), 0.0)
    snapshot = [f[1:] for f in _drain(_transfer(a, b""), 1.0)][:-1]
    sync(b, a.store.sequence, snapshot, 1.0, lineage=OURS)
    db.flush(b, 1.0, WALL + 1.0)
    assert a.collect(kvset(b"/k", b"", U3), 2.0) is not None  # confirmed delete
    da.flush(a, 2.0, WALL + 2.0)
    da.close()  # A killed; B never heard the delete

    assert b.on_vote(10.0) is not None and b.role is Role.ACTIVE
    db.flush(b, 10.0, WALL + 10.0)  # the shell's _after, before the first step
    row = db._db.execute(
        "SELECT sequence, branch, active, history FROM meta"
    ).fetchone()
    print("B's meta mid-takeover:", row)
    db.close()  # B killed before its takeover's first step

    a2 = new_core(bstar=BinaryStar(True, 300.0), journal=True)
    da = DataDir(tmp_path / "a")
    da.load(a2, 300.0, WALL + 300.0)
    a2.poll(300.0)  # the shell's first housekeeping (waiting: evicts)
    b2 = new_core(bstar=BinaryStar(False, 300.0), journal=True)
    db = DataDir(tmp_path / "b")
    db.load(b2, 300.0, WALL + 300.0)
    print("B restarted: own_writes", b2.own_writes, "branch", b2.branch)
    b2.on_peer_state(state(State.PRIMARY), 300.0)
    a2.on_peer_state(state(State.BACKUP), 300.0)
    assert a2.role is Role.ACTIVE
    run(a2, 300.0)
    exchange_hugz(a2, b2, 300.5)
    b2.on_peer_state(state(State.ACTIVE), 301.0)
    run(b2, 301.0)
    print("B hands over:", [f[0] for f in b2.relays if f[0] != b"\x00history"])
    for frames in b2.relays:
        a2.collect(frames, 301.5)
    print("A stats:", dict(a2.stats))
    assert b"/k" not in a2.store  # the confirmed delete holds

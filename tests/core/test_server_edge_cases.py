"""ServerCore in cases that could lose a published write, apply
one twice, or crash.  Literal times, no sockets."""

from __future__ import annotations

import contextlib

import pytest

from tests.core.test_server_core import (
    OURS,
    U1,
    U2,
    U3,
    _drain,
    _transfer,
    _uuid,
    exchange_hugz,
    heartbeat,
    kvpub,
    kvset,
    new_core,
    passive_core,
    run,
    state,
    sync,
    take_over,
)
from trioclone.core.bstar import BinaryStar, State
from trioclone.core.chp import KVMsg, decode_kvmsg, encode_kvmsg
from trioclone.core.server import STEP, Role, ServerCore
from trioclone.errors import RemoteProtocolError


def test_a_pending_write_the_active_applied_after_the_one_we_heard_survives():
    """Two clients write /k nearly at once: X (v0, U1), then Y (v1, U2).  Both
    KVSETs reach the passive's collector before the active's copies, so both
    are held at "heard sequence" 10.  The active applies U1 as 11 and U2 as
    12 and publishes both; Y sees 12 (its write confirmed).  The passive
    hears 11 and the active dies with 12 in flight.  The passive heard every
    update up to 11 without a gap, so U2, unmatched, was not applied at or
    below 11: it is replayed, and Y's confirmed write holds."""
    core = passive_core(10)
    core.collect(kvset(b"/k", b"v0", U1), 1.0)
    core.collect(kvset(b"/k", b"v1", U2), 1.0)
    core.on_update(kvpub(b"/k", 11, b"v0", U1), 1.1)
    take_over(core, 5.0)
    assert core.stats["pending_superseded"] == 0
    assert core.store.get(b"/k").body == b"v1"


def test_a_split_longer_than_the_window_horizon_applies_no_write_twice():
    """The window of replaced writes is not evicted by age while the peer is
    not heard following (a split), however long the split lasts.

    X writes /k=v1 (U1): the primary applies it; the backup holds it, and
    the link breaks before the primary's copy reaches it.  The backup takes
    over and replays U1.  On the primary's side, Z writes /k=v2 (U2): U1 is
    replaced.  The split lasts 200 s (more than the 120 s horizon).  When it
    heals the backup hands U1 over: the primary must still know it, and not
    apply it a second time over v2."""
    primary = new_core(bstar=BinaryStar(True, 0.0))
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    primary.collect(kvset(b"/shared", b"before", U3), 0.5)
    backup = new_core(bstar=BinaryStar(False, 0.0))
    backup.on_peer_state(state(State.ACTIVE), 0.0)
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 1.0)][:-1]
    sync(backup, 1, snapshot, 1.0, lineage=OURS)
    heartbeat(primary, backup, 1.0)  # the primary hears its peer PASSIVE
    assert primary.role is Role.ACTIVE and backup.role is Role.PASSIVE
    # X's write: applied by the primary, held by the backup.
    assert primary.collect(kvset(b"/k", b"v1", U1), 2.0) is not None
    assert backup.collect(kvset(b"/k", b"v1", U1), 2.0) is None
    # The link breaks; a client votes for the backup, which replays U1.
    assert backup.on_vote(10.0) is not None and backup.role is Role.ACTIVE
    run(backup, 10.0)
    assert backup.store.get(b"/k").body == b"v1"
    # On the primary's island, Z replaces v1.
    assert primary.collect(kvset(b"/k", b"v2", U2), 11.0) is not None
    for t in range(12, 201):
        primary.poll(float(t))
        backup.poll(float(t))
    # The link heals.
    exchange_hugz(primary, backup, 200.0)
    heartbeat(primary, backup, 200.0)
    assert (primary.role, backup.role) == (Role.ACTIVE, Role.PASSIVE)
    run(backup, 200.0)
    relays, backup.relays = backup.relays, []
    published = [p for f in relays if (p := primary.collect(f, 200.1)) is not None]
    assert [decode_kvmsg(f).key for f in published] == [], "U1 applied twice"
    assert primary.store.get(b"/k").body == b"v2"


def test_a_restarted_backup_that_never_synced_never_wins_over_the_map():
    """The backup restarts, hears one update on the stream and is cut off
    before its snapshot completes; a client on its island votes for it.  The
    map it serves is founded anew (fresh), even though the stream made its
    sequence non-zero: when the link heals, the primary's full map wins, and
    nothing of it (a write without a UUID, which no hand-over carries) is
    lost."""
    primary = new_core(bstar=BinaryStar(True, 0.0))
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    for n in range(5):
        primary.collect(kvset(b"/map/%d" % n, b"v", _uuid(50 + n)), 1.0)
    primary.collect(kvset(b"/anon", b"raw client", b""), 1.0)  # CHP allows it
    backup = ServerCore(bstar=BinaryStar(False, 100.0), new_lineage=lambda: "c" * 32)
    backup.on_peer_state(state(State.ACTIVE), 100.0)
    backup.poll(100.0)  # subscribes and asks for a snapshot
    update = primary.collect(kvset(b"/late", b"l", _uuid(60)), 100.5)
    assert update is not None
    backup.on_update(update, 100.5)  # heard on the stream; no snapshot yet
    # The link breaks; a client on the backup's island votes for it.
    assert backup.on_vote(110.0) is not None and backup.role is Role.ACTIVE
    run(backup, 110.0)
    assert backup.stats["unsynced_takeovers"] == 1
    assert len(backup.store) == 1  # one key of the map's seven
    # The link heals.
    exchange_hugz(primary, backup, 120.0)
    heartbeat(primary, backup, 120.0)
    winner, loser = (primary, backup) if primary.active else (backup, primary)
    run(loser, 120.0)
    for frames in loser.relays:
        winner.collect(frames, 120.1)
    assert b"/anon" in winner.store, (
        f"the {'primary' if winner is primary else 'backup'} won with "
        f"{len(winner.store)} keys; the map's write without a UUID is gone"
    )


@pytest.mark.parametrize("branch", ["\u00b2", "1" * 5000], ids=["superscript", "long"])
def test_a_peer_hugz_with_a_strange_branch_is_a_rejection_not_a_crash(branch):
    """A branch property that ``str.isdigit()`` accepts but ``int()`` does not
    ("²", more than 4300 digits) is ignored, not a crash of the server."""
    core = new_core(bstar=BinaryStar(True, 0.0))
    frames = encode_kvmsg(
        KVMsg(b"HUGZ", 5, b"", {"lineage": "x" * 32, "branch": branch}, b"")
    )
    with contextlib.suppress(RemoteProtocolError):  # a logged rejection is fine
        core.on_peer_hugz(frames, 1.0)


def test_a_hand_over_step_is_bounded_by_the_records_it_looks_at():
    """A hand-over step looks at no more than ``limit`` records, the ones it
    passes over (at or below the branch point) included: on a big map most
    records are, and one step must not walk them all."""
    primary = new_core(bstar=BinaryStar(True, 0.0))
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    for n in range(20_000):
        primary.collect(kvset(b"/k/%06d" % n, b"v", _uuid(1000 + n)), 0.5)
    backup = new_core(bstar=BinaryStar(False, 0.0))
    backup.on_peer_state(state(State.ACTIVE), 0.0)
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 1.0)][:-1]
    sync(backup, primary.store.sequence, snapshot, 1.0, lineage=OURS)
    assert backup.on_vote(10.0) is not None and backup.role is Role.ACTIVE
    run(backup, 10.0)
    backup.collect(kvset(b"/island", b"i", _uuid(7)), 11.0)
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    assert backup.role is Role.PASSIVE and backup.busy
    store, looked = backup.store, []
    sequence_of = store.sequence_of
    store.sequence_of = lambda key: looked.append(key) or sequence_of(key)  # type: ignore[method-assign]
    backup.step(20.0)  # one step of the default size
    assert len(looked) <= 4 * STEP, f"one step looked at {len(looked)} records"


def test_a_founder_that_steps_down_resends_its_island_writes_until_applied():
    """The primary founded the map and yields without a claim when the split
    heals, handing over its whole map; a write its island's client saw
    confirmed must be resent until the winner applies it, however many
    records were handed over (hand-overs are not bounded by --pending-size),
    when the first sends are lost."""
    primary = new_core(bstar=BinaryStar(True, 0.0), pending_size=1000)
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    for n in range(2000):
        primary.collect(kvset(b"/k/%04d" % n, b"old", _uuid(10_000 + n)), 0.5)
    backup = new_core(bstar=BinaryStar(False, 0.0))
    backup.on_peer_state(state(State.ACTIVE), 0.0)
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 1.0)][:-1]
    sync(backup, primary.store.sequence, snapshot, 1.0, lineage=OURS)
    assert backup.on_vote(10.0) is not None and backup.role is Role.ACTIVE
    run(backup, 10.0)
    # The primary's island: a client updates an old key, confirmed.
    assert primary.collect(kvset(b"/k/0000", b"new", _uuid(99)), 11.0) is not None
    # Heal: the heartbeat is heard before the first HUGZ claim.
    heartbeat(primary, backup, 20.0)
    assert (primary.role, backup.role) == (Role.PASSIVE, Role.ACTIVE)
    run(primary, 20.0)
    primary.relays.clear()  # the first sends are lost
    for t in range(21, 30):
        primary.poll(float(t))
    for frames in primary.relays:
        backup.collect(frames, 30.0)
    assert backup.store.get(b"/k/0000").body == b"new", (
        f"never resent ({primary.pending.dropped} hand-overs pushed out)"
    )

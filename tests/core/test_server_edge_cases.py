"""ServerCore in cases that could lose a published write, apply
one twice, or crash.  Literal times, no sockets."""

from __future__ import annotations

import pytest

from tests.core.test_server_core import (
    ACTIVES,
    OURS,
    U1,
    U2,
    U3,
    _drain,
    _transfer,
    _uuid,
    actions,
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
from trioclone.core.bstar import BinaryStar, State
from trioclone.core.chp import HISTORY, KVMsg, decode_kvmsg, encode_kvmsg
from trioclone.core.pending import EXPIRE_STEP, Pending
from trioclone.core.replica import Request
from trioclone.core.server import STEP, Role, ServerCore


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
    map it serves is founded anew (fresh): when the link heals, the
    primary's full map wins, and
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
    # what its stream carried before a HUGZ named the map is not taken in
    assert len(backup.store) == 0
    # The link heals.
    exchange_hugz(primary, backup, 120.0)
    heartbeat(primary, backup, 120.0)
    winner, loser = (
        (primary, backup) if primary.role is Role.ACTIVE else (backup, primary)
    )
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
    before = (core.lineage, core.branch, core.role, core.fresh, core.bstar.state)
    core.on_peer_hugz(frames, 1.0)
    assert (
        core.lineage,
        core.branch,
        core.role,
        core.fresh,
        core.bstar.state,
    ) == before


def test_a_hand_over_step_is_bounded_by_the_records_it_looks_at():
    """A hand-over step looks at no more than ``limit`` records, the ones it
    passes over (at or below the branch point) included: on a big map most
    records are, and one step must not walk them all."""
    primary, backup = split_pair(
        [kvset(b"/k/%06d" % n, b"v", _uuid(1000 + n)) for n in range(20_000)]
    )
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
    primary, backup = split_pair(
        [kvset(b"/k/%04d" % n, b"old", _uuid(10_000 + n)) for n in range(2000)],
        pending_size=1000,
    )
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


FOUNDED = "c" * 32  # the lineage a restarted primary founds


def _restarted_primary(now: float) -> ServerCore:
    """The primary restarted empty and, cut off from the backup, took a
    client's vote: it serves a map it just founded (fresh)."""
    # made a heartbeat earlier: it takes the vote at once
    restarted = ServerCore(
        bstar=BinaryStar(True, now - 1.0), new_lineage=lambda: FOUNDED
    )
    assert restarted.on_vote(now + 2.0) is not None
    assert restarted.role is Role.ACTIVE
    run(restarted, now + 2.0)
    assert restarted.fresh and restarted.lineage == FOUNDED
    return restarted


def test_a_snapshot_of_a_fresh_map_that_beats_its_first_hugz_is_not_adopted():
    """The passive holds the map.  The primary restarts empty and takes a vote
    while the link is cut: a fresh map.  When the link heals, the passive's
    snapshot request is answered within milliseconds, before the restarted
    primary's first HUGZ: the KTHXBAI itself says the map is fresh, so the
    passive keeps its own map (and takes over) rather than adopt it."""
    backup = passive_core(5, (kvpub(b"/kept", 5, b"k", U1),))
    restarted = _restarted_primary(10.0)
    # The old active went silent: the passive connects again and asks.
    backup.poll(100.0)
    assert actions(backup)[-1] == Request(b"")
    # The link heals; the reply arrives before any HUGZ of the new primary.
    backup.on_reply(restarted.kthxbai(b""), 100.1)  # it says: fresh
    assert backup.role is Role.ACTIVE  # refused, and took over instead
    run(backup, 100.1)
    assert backup.lineage == ACTIVES and backup.store.get(b"/kept") is not None, (
        f"the passive adopted the fresh map {backup.lineage}: "
        f"{len(backup.store)} keys, /kept lost"
    )


def test_a_seizing_passive_does_not_confirm_the_fresh_maps_writes_in_its_own():
    """The passive refuses the fresh map and takes over.  While it asked for
    the snapshot it heard the fresh map's stream: W (sequence 1 of the fresh
    map) is in its backlog, and its collector holds the client's copy of W.
    That backlog belongs to another map: taking over must not fold it into
    its own (where W's sequence 1 would look "already in the snapshot" and
    W would be matched and remembered as applied).  When the fresh side
    steps down and hands W over, W is applied."""
    backup = passive_core(5, (kvpub(b"/kept", 5, b"k", U1),))
    restarted = _restarted_primary(10.0)
    write = kvset(b"/w", b"w", U2)
    published = restarted.collect(write, 12.5)  # confirmed to its writer
    assert published is not None and decode_kvmsg(published).sequence == 1
    backup.collect(write, 12.5)  # the writer sends to both collectors
    # The link heals: the passive hears the new primary's claim and stream.
    backup.on_peer_hugz(restarted.hugz(), 13.0)
    backup.on_update(restarted.hugz(), 13.0)  # a new lineage: a reset
    assert actions(backup) == [Request(b"")]
    backup.on_update(published, 13.0)  # (held in the backlog while syncing)
    backup.on_reply(restarted.kthxbai(b""), 13.1)
    assert backup.role is Role.ACTIVE  # it keeps its map: dual actives follow
    run(backup, 13.1)
    heartbeat(restarted, backup, 14.0)
    exchange_hugz(restarted, backup, 14.0)
    heartbeat(restarted, backup, 15.0)
    assert (restarted.role, backup.role) == (Role.PASSIVE, Role.ACTIVE)
    run(restarted, 15.0)
    for frames in restarted.relays:
        backup.collect(frames, 15.1)
    assert backup.store.get(b"/w") is not None, (
        f"W lost: pending {len(backup.pending)}, in the window "
        f"{U2 in backup.applied}, duplicates {backup.stats['duplicates']}"
    )


def test_a_write_skipped_as_superseded_is_not_applied_by_its_resend():
    """X (U1) writes /k; the passive holds it at heard sequence 10.  The
    active applies it as 11 (the passive misses 11: a gap) and then Y's
    write to /k as 12, which the passive hears.  The active dies.  The
    takeover rightly skips U1 (past a gap, a later write to /k wins).  X
    missed its confirmation too and resends U1 to the new active: that
    resend must be a repeat, not bring back X's value over Y's."""
    core = passive_core(10)
    core.collect(kvset(b"/k", b"x", U1), 1.0)
    core.on_update(kvpub(b"/k", 12, b"y", U2), 1.1)  # 11 was missed
    take_over(core, 5.0)
    assert core.stats["pending_superseded"] == 1
    assert core.store.get(b"/k").body == b"y"
    core.collect(kvset(b"/k", b"x", U1), 6.0)  # X's resend after its failover
    assert core.store.get(b"/k").body == b"y", "a resend undid a later write"


def test_a_hand_over_replayed_at_a_later_takeover_is_published_as_a_client_wrote_it():
    """The backup steps down after a split and hands /b-only over; the
    primary dies before any copy of it arrives.  The backup, synced from the
    primary's map (which lacks /b-only), takes over again and replays the
    hand-over: it must be published and stored as the client wrote it, not
    with the peer-to-peer ``lineage`` property and the old sequence frame
    the hand-over carried."""
    primary, backup = split_pair()
    backup.collect(kvset(b"/b-only", b"b", _uuid(21), {"colour": "red"}), 11.0)
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    assert (primary.role, backup.role) == (Role.ACTIVE, Role.PASSIVE)
    run(backup, 20.0)
    assert [decode_kvmsg(f).key for f in backup.relays] == [b"/b-only"]
    backup.relays.clear()  # lost on the way: the primary never applies it
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 21.0)][:-1]
    history = [f[1:] for f in _drain(_transfer(primary, HISTORY), 21.0)][:-1]
    sync(
        backup, primary.store.sequence, snapshot, 21.0, history, lineage=primary.lineage
    )
    assert len(backup.pending) == 1  # still waiting for the primary's copy
    published = take_over(backup, 22.0)  # the primary dies
    assert [f[0] for f in published] == [b"/b-only"]
    assert decode_kvmsg(published[0]).properties == {"colour": "red"}
    assert backup.store.get(b"/b-only").properties == {"colour": "red"}


def test_every_hand_over_is_resent_before_it_expires():
    """A split that heals: the backup accepted N writes while active and
    hands them over.  The first send is lost (the relay PUB reconnects to
    the primary's collector after the heartbeat link is back), so the
    resends carry them: a hand-over ages out only once it was sent several
    times, however many there are (resends go out 4096 a second)."""
    primary = ServerCore(
        bstar=BinaryStar(True, 0.0), pending_age=5.0, new_lineage=lambda: "f" * 32
    )
    from tests.core.test_server_core import sync

    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    backup = ServerCore(
        bstar=BinaryStar(False, 0.0), pending_age=5.0, new_lineage=lambda: "f" * 32
    )
    backup.on_peer_state(state(State.ACTIVE), 0.0)
    sync(backup, 0, [], 1.0, lineage=primary.lineage)
    assert backup.on_vote(10.0) is not None and backup.role is Role.ACTIVE
    run(backup, 10.0)
    count = 20_000
    for n in range(count):
        backup.collect(kvset(b"/b/%d" % n, b"b", _uuid(1000 + n)), 11.0)
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    assert (primary.role, backup.role) == (Role.ACTIVE, Role.PASSIVE)
    run(backup, 20.0)
    assert len(backup.relays) == count
    backup.relays.clear()  # the first send is lost
    resent: set[bytes] = set()
    for t in range(21, 31):
        backup.poll(float(t))
        resent.update(bytes(f[2]) for f in backup.relays)
        backup.relays.clear()
    unsent = count - len(resent)
    assert unsent == 0, (
        f"{unsent} of {count} hand-overs dropped (pending_dropped "
        f"{backup.pending.dropped}) without being resent once"
    )


def test_a_gap_right_after_a_snapshot_at_zero_still_supersedes():
    """As test_takeover_skips_a_pending_write_a_later_one_overwrote_past_a_gap,
    but the gap is the first update after the snapshot: the passive synced
    an empty map (sequence 0), missed update 1 (X's U1 on /k) and heard Y's
    U2 on /k at 2.  A contiguity of 0 is a contiguity, not "nothing heard":
    U1 is not replayed over Y's confirmed write."""
    core = passive_core(0)
    core.collect(kvset(b"/k", b"old", U1), 1.0)  # held at 0
    core.on_update(kvpub(b"/k", 2, b"new", U2), 1.2)  # 1 was missed
    assert core.replica is not None and core.replica.contiguous == 0
    assert take_over(core, 2.0) == [], "U1 replayed over a later write"
    assert core.store.get(b"/k").body == b"new"


def test_expiring_hand_overs_is_bounded_work_per_call():
    """Hand-overs are bounded by age, not size, so a long split can leave as
    many as the keys written on the losing side, all reaching their age at
    once: dropping them is bounded work per call, like the window's
    eviction."""
    pending = Pending(max_age=30.0)
    count = 200_000
    for n in range(count):
        uuid = _uuid(10_000 + n)
        pending.hold(uuid, [b"/b/%d" % n, b"", uuid, b"", b"v"], 0.0, 0, relay=True)
    for t in (1.0, 2.0):  # sent three times in all: each may now age out
        assert len(pending.due(t, 1.0, limit=count)) == count
    dropped = [pending.expire(31.0) for _ in range(5)]
    assert dropped == [
        EXPIRE_STEP,
        EXPIRE_STEP,
        EXPIRE_STEP,
        count - 3 * EXPIRE_STEP,
        0,
    ]
    assert len(pending) == 0

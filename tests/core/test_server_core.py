"""Synchronous tests for the sans-IO server core (trioclone.core.server) and
the snapshot transfer (trioclone.core.snapshot).

Everything goes through public methods; time is always a literal ``now``.
A passive core here is the backup of a pair that heard its peer ACTIVE; its
replica of the active is fed with ``on_reply`` (snapshot socket) and
``on_update`` (stream), and asks for connections and requests through
``core.replica.actions``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest

from trioclone.core.bstar import BinaryStar, State
from trioclone.core.chp import (
    HISTORY,
    HUGZ,
    KTHXBAI,
    SEQUENCE,
    KVMsg,
    decode_history,
    decode_kvmsg,
    encode_kvmsg,
    encode_properties,
    history_batch,
    hugz,
    kthxbai,
)
from trioclone.core.replica import Connect, Phase, Request
from trioclone.core.server import RULE_RESERVED, Role, ServerCore
from trioclone.core.snapshot import SKIP, KeyIndex, Transfer
from trioclone.core.store import Store
from trioclone.errors import RemoteProtocolError

Frames = list[bytes]


def _uuid(n: int) -> bytes:
    return n.to_bytes(16, "big")


U1, U2, U3, U4 = (_uuid(n) for n in range(1, 5))
ACTIVES = "a" * 32  # the lineage of the active these passives follow
OURS = "f" * 32  # the lineage a core founds


def kvset(
    key: bytes,
    body: bytes = b"v",
    uuid: bytes = U1,
    props: Mapping[str, str] | None = None,
    sequence: int = 0,
) -> Frames:
    """A client's KVSET."""
    return encode_kvmsg(KVMsg(key, sequence, uuid, props or {}, body))


def kvpub(
    key: bytes,
    sequence: int,
    body: bytes = b"v",
    uuid: bytes = U1,
    props: Mapping[str, str] | None = None,
) -> Frames:
    """An update on the active's stream (also the shape of a KVSYNC)."""
    return encode_kvmsg(KVMsg(key, sequence, uuid, props or {}, body))


def seq(frames: Sequence[bytes]) -> int:
    return int(SEQUENCE.unpack(frames[1])[0])


def state(which: State) -> Frames:
    return [b"%d" % which]


def new_core(**options: object) -> ServerCore:
    return ServerCore(new_lineage=lambda: OURS, **options)  # type: ignore[arg-type]


def active_core(now: float = 0.0, **options: object) -> ServerCore:
    core = new_core(**options)
    core.start(now)
    assert core.role is Role.ACTIVE and not core.busy
    assert core.lineage == OURS and core.fresh
    return core


def actions(core: ServerCore) -> list[object]:
    """What the passive's replica asked for since the last call."""
    assert core.replica is not None
    taken, core.replica.actions = core.replica.actions, []
    return taken


def run(core: ServerCore, now: float) -> list[Frames]:
    """Do the core's pending work in steps; what it published."""
    published: list[Frames] = []
    for _ in range(10_000):
        if not core.busy:
            return published
        published += core.step(now, limit=7)
    raise AssertionError("the work never ended")


def sync(
    core: ServerCore,
    sequence: int,
    snapshot: Sequence[Frames] = (),
    now: float = 0.0,
    history: Sequence[Frames] = (),
    lineage: str = ACTIVES,
) -> None:
    """Answer the replica's requests: the whole map, then the window."""
    core.poll(now)
    assert actions(core)[-1] == Request(b"")
    for frames in snapshot:
        core.on_reply(frames, now)
    core.on_reply(kthxbai(sequence, b"", {"lineage": lineage}), now)
    assert actions(core) == [Request(HISTORY)]
    for frames in history:
        core.on_reply(frames, now)
    core.on_reply(kthxbai(sequence, HISTORY, {"lineage": lineage}), now)
    run(core, now)
    assert core.synced


def passive_core(
    sequence: int = 0,
    snapshot: Sequence[Frames] = (),
    now: float = 0.0,
    *,
    history: Sequence[Frames] = (),
    **options: object,
) -> ServerCore:
    """The backup of a pair, synced from a snapshot ending at ``sequence``."""
    core = new_core(bstar=BinaryStar(False, now), **options)
    core.on_peer_state(state(State.ACTIVE), now)
    assert core.role is Role.PASSIVE
    sync(core, sequence, snapshot, now, history)
    assert core.lineage == ACTIVES and not core.fresh
    return core


def take_over(core: ServerCore, now: float) -> list[Frames]:
    """The peer restarted (PEER_PRIMARY): the passive becomes active."""
    core.on_peer_state(state(State.PRIMARY), now)
    assert core.role is Role.ACTIVE
    return run(core, now)


# --------------------------------------------------------------------------
# Active: client updates
# --------------------------------------------------------------------------


def test_collect_publishes_with_next_sequence() -> None:
    core = active_core()
    sets = [
        kvset(b"/a", b"one", U1, {"owner": "x"}),
        kvset(b"/b", b"two", U2),
        kvset(b"/a", b"three", U3),
    ]
    published = [core.collect(frames, 1.0) for frames in sets]
    for number, (sent, pub) in enumerate(zip(sets, published, strict=True), 1):
        assert pub is not None
        assert len(pub) == 5
        assert seq(pub) == number
        assert pub[0] == sent[0]
        assert pub[2:] == sent[2:]  # UUID, properties, body kept
    assert core.store.sequence == 3
    assert len(core.store) == 2
    assert core.store.get(b"/a") == KVMsg(b"/a", 3, U3, {}, b"three")
    assert core.store.get(b"/b") == KVMsg(b"/b", 2, U2, {}, b"two")
    assert core.stats["updates"] == 3


def test_collect_ignores_the_clients_sequence() -> None:
    core = active_core()
    pub = core.collect(kvset(b"/a", sequence=99), 0.0)
    assert pub is not None
    assert seq(pub) == 1


def test_collect_keeps_properties_verbatim() -> None:
    core = active_core()
    frames = [b"/a", bytes(8), U1, b"b=2\na=1=x", b"body"]  # no final newline
    pub = core.collect(frames, 0.0)
    assert pub == [b"/a", SEQUENCE.pack(1), U1, b"b=2\na=1=x", b"body"]
    stored = core.store.get(b"/a")
    assert stored is not None
    assert dict(stored.properties) == {"b": "2", "a": "1=x"}


@pytest.mark.parametrize(
    ("props", "published", "deadline"),
    [
        (b"ttl=5\n", b"ttl=5\n", 15.0),
        (b"ttl=2.5\n", b"ttl=2.5\n", 12.5),
        (b"", b"", None),
        # ttl=0 means "never" (trioclone's client sends it for the Guide's C
        # servers): stored and published in the canonical form, without it
        (b"ttl=0\n", b"", None),
        (b"owner=x\nttl=0\n", b"owner=x\n", None),
        (b"ttl=0.000\nowner=x\n", b"owner=x\n", None),
    ],
)
def test_collect_ttl_becomes_a_deadline(
    props: bytes, published: bytes, deadline: float | None
) -> None:
    core = active_core()
    pub = core.collect([b"/a", bytes(8), U1, props, b"v"], 10.0)
    assert pub == [b"/a", SEQUENCE.pack(1), U1, published, b"v"]
    assert core.store.deadline(b"/a") == deadline
    stored = core.store.get(b"/a")
    assert stored is not None
    assert ("ttl" in stored.properties) == (deadline is not None)


def test_collect_delete() -> None:
    core = active_core()
    core.collect(kvset(b"/a", b"v", U1, {"ttl": "5"}), 0.0)
    pub = core.collect(kvset(b"/a", b"", U2), 1.0)
    assert pub == [b"/a", SEQUENCE.pack(2), U2, b"", b""]
    assert b"/a" not in core.store
    assert len(core.store) == 0
    assert core.store.deadline(b"/a") is None
    assert core.expire(100.0) == []  # no delete for a key already gone


def test_collect_duplicate_uuid_is_dropped() -> None:
    core = active_core()
    assert core.collect(kvset(b"/a", b"one", U1), 0.0) is not None
    assert core.collect(kvset(b"/a", b"two", U1), 1.0) is None
    assert core.stats["duplicates"] == 1
    assert core.store.sequence == 1
    assert core.store.get(b"/a") == KVMsg(b"/a", 1, U1, {}, b"one")


def test_a_superseded_write_resent_is_still_a_repeat() -> None:
    core = active_core()
    core.collect(kvset(b"/a", b"one", U1), 0.0)
    core.collect(kvset(b"/a", b"two", U2), 0.0)  # U1 is superseded
    assert core.collect(kvset(b"/a", b"one", U1), 1.0) is None  # a late resend
    core.collect(kvset(b"/a", b"", U3), 0.0)  # deleted: no record holds U3
    assert core.collect(kvset(b"/a", b"", U3), 1.0) is None
    assert core.stats["duplicates"] == 2
    assert core.store.sequence == 3
    assert b"/a" not in core.store


def test_a_resend_within_the_horizon_is_a_repeat_after_any_number_of_writes() -> None:
    """The window is sized by time: a count of writes never pushes a UUID out
    (the old window held the last 100,000 UUIDs, whatever their age)."""
    core = active_core(applied_horizon=60.0)
    core.collect(kvset(b"/k", b"first", U1), 0.0)
    core.collect(kvset(b"/k", b"second", U2), 0.0)  # U1 replaced at 0.0
    for n in range(150_000):  # other writers, overwriting one key
        core.collect(kvset(b"/busy", b"%d" % n, _uuid(1000 + n)), 30.0)
    assert core.collect(kvset(b"/k", b"first", U1), 60.0) is None  # a resend
    assert core.store.get(b"/k").body == b"second"
    assert core.applied.evicted_early == 0
    core.poll(62.0)  # housekeeping: past the horizon the window lets go
    assert U1 not in core.applied


def test_the_window_memory_bound_evicts_early_and_counts_it() -> None:
    core = active_core(applied_limit=10)
    for n in range(20):
        core.collect(kvset(b"/k", b"%d" % n, _uuid(100 + n)), 0.0)
    assert len(core.applied) == 10
    assert core.applied.evicted_early == 9
    assert core.status()["window_evicted_early"] == 9


def test_many_keys_written_once_cost_no_window_space() -> None:
    core = active_core()
    for i in range(1000):
        core.collect(kvset(b"/k/%d" % i, b"v", bytes([i % 256, i // 256]) * 8), 0.0)
    assert len(core.applied) == 0  # each UUID is held by its key's record


def test_collect_empty_uuid_is_never_a_duplicate() -> None:
    """The rule for empty UUIDs: the active applies each one it receives."""
    core = active_core()
    first = core.collect(kvset(b"/a", b"one", b""), 0.0)
    second = core.collect(kvset(b"/a", b"two", b""), 0.0)
    assert first is not None
    assert second is not None
    assert (seq(first), seq(second)) == (1, 2)
    assert core.stats["duplicates"] == 0


def _state(core: ServerCore) -> tuple[object, ...]:
    store = core.store
    return (
        store.sequence,
        len(store),
        store.keys(),
        len(core.pending),
        len(core.applied),
        dict(core.stats),
        core.role,
        core.synced,
    )


@pytest.mark.parametrize("active", [True, False], ids=["active", "passive"])
@pytest.mark.parametrize("key", [HUGZ, KTHXBAI, b"/a/\x00HUGZ"])
def test_collect_reserved_keys_are_rejected(active: bool, key: bytes) -> None:
    core = active_core() if active else passive_core(3, (kvpub(b"/a", 3),))
    before = _state(core)
    with pytest.raises(RemoteProtocolError) as info:
        core.collect(kvset(key, b"x", U2), 1.0)
    assert info.value.rule == RULE_RESERVED
    assert _state(core) == before
    assert U2 not in core.applied
    if active:  # the UUID was not remembered: a real update with it applies
        assert core.collect(kvset(b"/b", b"x", U2), 1.0) is not None


MALFORMED = {
    "4 frames": [b"/a", bytes(8), U1, b""],
    "6 frames": [b"/a", bytes(8), U1, b"", b"v", b"extra"],
    "no frames": [],
    "empty key": [b"", bytes(8), U1, b"", b"v"],
    "short sequence": [b"/a", bytes(7), U1, b"", b"v"],
    "long sequence": [b"/a", bytes(9), U1, b"", b"v"],
    "short uuid": [b"/a", bytes(8), b"12345", b"", b"v"],
    "long uuid": [b"/a", bytes(8), bytes(17), b"", b"v"],
    "property without =": [b"/a", bytes(8), U1, b"noequals\n", b"v"],
    "property without name": [b"/a", bytes(8), U1, b"=x\n", b"v"],
    "properties not utf-8": [b"/a", bytes(8), U1, b"a=\xff\n", b"v"],
    "ttl not a number": [b"/a", bytes(8), U1, b"ttl=soon\n", b"v"],
    "ttl negative": [b"/a", bytes(8), U1, b"ttl=-1\n", b"v"],
    "ttl infinite": [b"/a", bytes(8), U1, b"ttl=inf\n", b"v"],
    "ttl nan": [b"/a", bytes(8), U1, b"ttl=nan\n", b"v"],
}


@pytest.mark.parametrize("active", [True, False], ids=["active", "passive"])
@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_collect_malformed_changes_nothing(active: bool, frames: list[bytes]) -> None:
    if active:
        core = active_core()
        core.collect(kvset(b"/x", b"x", U4), 0.0)
    else:
        core = passive_core(3, (kvpub(b"/x", 3, uuid=U4),))
        core.collect(kvset(b"/y", b"y", U3), 0.0)
    before = _state(core)
    with pytest.raises(RemoteProtocolError):
        core.collect(frames, 1.0)
    assert _state(core) == before


# --------------------------------------------------------------------------
# Active: TTL expiry
# --------------------------------------------------------------------------


def test_expire_at_the_exact_deadline() -> None:
    core = active_core()
    core.collect(kvset(b"/a", props={"ttl": "5"}), 10.0)  # deadline 15.0
    assert core.expire(14.999) == []
    assert b"/a" in core.store
    assert core.expire(15.0) == [[b"/a", SEQUENCE.pack(2), b"", b"", b""]]
    assert b"/a" not in core.store
    assert core.store.sequence == 2
    assert core.stats["expired"] == 1
    assert core.expire(100.0) == []


def test_expire_several_in_deadline_order_with_fresh_sequences() -> None:
    core = active_core()
    core.collect(kvset(b"/late", uuid=U1, props={"ttl": "9"}), 0.0)
    core.collect(kvset(b"/early", uuid=U2, props={"ttl": "3"}), 0.0)
    core.collect(kvset(b"/keep", uuid=U3), 0.0)
    deletes = core.expire(50.0)
    assert deletes == [
        [b"/early", SEQUENCE.pack(4), b"", b"", b""],
        [b"/late", SEQUENCE.pack(5), b"", b"", b""],
    ]
    assert core.store.keys() == [b"/keep"]
    assert core.stats["expired"] == 2


def test_mass_expiry_comes_out_a_bounded_step_at_a_time() -> None:
    core = active_core()
    for n in range(1000):
        core.collect(kvset(b"/k/%d" % n, uuid=_uuid(10 + n), props={"ttl": "5"}), 0.0)
    steps = []
    for _ in range(100):
        if not (deletes := core.expire(5.0, limit=300)):
            break
        steps.append(len(deletes))
    else:
        raise AssertionError("the expiry never ended")
    assert steps == [300, 300, 300, 100]
    assert len(core.store) == 0
    assert core.store.sequence == 2000


def test_rewrite_without_ttl_cancels_the_deadline() -> None:
    core = active_core()
    core.collect(kvset(b"/a", uuid=U1, props={"ttl": "5"}), 0.0)
    core.collect(kvset(b"/a", uuid=U2), 1.0)
    assert core.expire(100.0) == []
    assert b"/a" in core.store


@pytest.mark.parametrize(
    ("takeover", "early", "deadline"),
    [(12.0, 14.999, 15.0), (20.0, None, 20.0)],
    ids=["takeover-before-deadline", "takeover-after-deadline"],
)
def test_passive_never_expires_but_keeps_deadlines(
    takeover: float, early: float | None, deadline: float
) -> None:
    # Defect 4 of the reference: its passive ran the TTL flusher too.
    core = passive_core(0)
    core.on_update(kvpub(b"/a", 1, props={"ttl": "5"}), 10.0)
    assert core.store.deadline(b"/a") == 15.0
    assert core.expire(15.0) == []
    assert core.expire(1000.0) == []
    assert b"/a" in core.store
    assert core.sequence == 1
    assert core.stats["expired"] == 0
    # The mirrored stream keeps going in order: no sequence was skipped.
    core.on_update(kvpub(b"/b", 2, uuid=U2), 11.0)
    assert actions(core) == []
    assert take_over(core, takeover) == []
    if early is not None:
        assert core.expire(early) == []
    assert core.expire(deadline) == [[b"/a", SEQUENCE.pack(3), b"", b"", b""]]
    assert b"/a" not in core.store


def test_passive_keeps_deadlines_from_the_snapshot() -> None:
    core = passive_core(4, (kvpub(b"/a", 4, props={"ttl": "5"}),), now=10.0)
    assert core.store.deadline(b"/a") == 15.0
    assert core.expire(30.0) == []
    take_over(core, 12.0)
    assert core.expire(14.999) == []
    assert core.expire(15.0) == [[b"/a", SEQUENCE.pack(5), b"", b"", b""]]


# --------------------------------------------------------------------------
# Passive: the pending list and takeover
# --------------------------------------------------------------------------


def test_passive_collect_holds_and_publishes_nothing() -> None:
    core = passive_core(5, (kvpub(b"/x", 5, uuid=U4),))
    assert core.collect(kvset(b"/a", uuid=U1), 1.0) is None
    assert len(core.pending) == 1
    assert core.sequence == 5
    assert core.store.keys() == [b"/x"]


def test_passive_never_holds_a_write_without_a_uuid() -> None:
    """The rule for empty UUIDs: applied by the active only, never replayed."""
    core = passive_core(0)
    assert core.collect(kvset(b"/a", b"1", b""), 1.0) is None
    assert len(core.pending) == 0
    assert core.stats["anonymous_not_held"] == 1
    core.on_update(kvpub(b"/a", 1, b"1", b""), 1.1)  # the active applied it
    assert take_over(core, 2.0) == []  # so a takeover does not apply it again
    assert core.store.sequence == 1


def test_mirror_of_the_actives_copy_clears_pending() -> None:
    core = passive_core(5)
    core.collect(kvset(b"/a", b"mine", U1), 1.0)
    core.collect(kvset(b"/b", b"other", U2), 1.0)
    core.on_update(kvpub(b"/a", 6, b"mine", U1), 1.1)
    assert len(core.pending) == 1
    assert core.store.get(b"/a") == KVMsg(b"/a", 6, U1, {}, b"mine")
    published = take_over(core, 2.0)
    assert [frames[0] for frames in published] == [b"/b"]


def test_actives_copy_first_makes_the_clients_copy_a_duplicate() -> None:
    core = passive_core(5)
    core.on_update(kvpub(b"/a", 6, b"v", U1), 1.0)
    assert core.collect(kvset(b"/a", b"v", U1), 1.1) is None
    assert len(core.pending) == 0
    assert core.stats["duplicates"] == 1
    assert take_over(core, 2.0) == []
    assert core.store.sequence == 6


def test_takeover_publishes_pending_in_order_with_fresh_sequences() -> None:
    # Defect 5 of the reference: it applied the pending list but did not
    # publish it.
    core = passive_core(10, (kvpub(b"/old", 10, uuid=U4),))
    sets = [
        kvset(b"/a", b"1", U1, {"ttl": "7"}),
        kvset(b"/b", b"2", U2),
        kvset(b"/c", b"3", U3, {"ttl": "0"}),
    ]
    for frames in sets:
        core.collect(frames, 1.0)
    core.on_update(kvpub(b"/b", 11, b"2", U2), 1.5)  # the active had /b
    published = take_over(core, 3.0)
    assert published == [
        [b"/a", SEQUENCE.pack(12), U1, sets[0][3], b"1"],
        [b"/c", SEQUENCE.pack(13), U3, b"", b"3"],  # ttl=0: canonical
    ]
    assert core.role is Role.ACTIVE
    assert len(core.pending) == 0
    assert core.store.sequence == 13
    assert core.store.get(b"/a") == KVMsg(b"/a", 12, U1, {"ttl": "7"}, b"1")
    assert core.store.deadline(b"/a") == 10.0  # ttl counts from takeover
    assert core.store.get(b"/b") == KVMsg(b"/b", 11, U2, {}, b"2")
    assert core.stats["takeover_applied"] == 2
    # The map's lineage is inherited, and its branch point is where it forked.
    assert (core.lineage, core.fresh, core.branch) == (ACTIVES, False, 11)


def test_pending_is_applied_once() -> None:
    core = passive_core(0)
    core.collect(kvset(b"/a", b"1", U1), 1.0)
    assert len(take_over(core, 2.0)) == 1
    # A client resending after the failover is a duplicate, not a new update.
    assert core.collect(kvset(b"/a", b"1", U1), 3.0) is None
    assert core.stats["duplicates"] == 1
    assert core.store.sequence == 1


def test_takeover_replays_a_pending_write_the_stream_did_not_show_applied() -> None:
    """Both writes of /k were held, close together (two clients: the active
    may have had them in the other order); the passive heard only U2, at 1,
    with no gap before it.  So U1 was not applied up to 1: either never (its
    writer resends it anyway) or after U2, with the active dead before we
    heard it.  Replayed after U2, it keeps the active's order."""
    core = passive_core(0)
    old, new = kvset(b"/k", b"old", U1), kvset(b"/k", b"new", U2)
    core.collect(old, 1.0)
    core.collect(new, 1.1)
    core.on_update(kvpub(b"/k", 1, b"new", U2), 1.2)
    assert len(core.pending) == 1
    assert [f[4] for f in take_over(core, 2.0)] == [b"old"]
    assert core.store.get(b"/k").body == b"old"
    assert core.stats["pending_superseded"] == 0


def test_takeover_never_replays_a_write_over_one_that_reached_us_after_it() -> None:
    """Found by the simulation: U1 reached the passive, then, more than
    ORDER_SKEW later, U2 (so U2 was sent after U1); the active applied U2
    (heard at 1, no gap) and never U1.  So U1 was lost on the way (or held
    from a map that was lost with both servers): replayed after U2 it would
    undo a newer, confirmed write.  It is not replayed, and not remembered
    as applied: a resend from its writer still applies."""
    core = passive_core(0)
    old, new = kvset(b"/k", b"old", U1), kvset(b"/k", b"new", U2)
    core.collect(old, 1.0)
    core.collect(new, 2.5)
    core.on_update(kvpub(b"/k", 1, b"new", U2), 2.6)
    assert take_over(core, 3.0) == []
    assert core.store.get(b"/k").body == b"new"
    assert core.stats["pending_superseded"] == 1
    assert core.collect(old, 3.0) is not None  # its writer resends it


def test_takeover_never_replays_a_write_over_a_delete_that_reached_us_after_it() -> (
    None
):
    """As above, with a delete: the key has no record to date it by."""
    core = passive_core(0)
    core.collect(kvset(b"/k", b"old", U1), 1.0)
    core.collect(kvset(b"/k", b"", U2), 2.5)
    core.on_update(kvpub(b"/k", 1, b"", U2), 2.6)
    assert take_over(core, 3.0) == []
    assert b"/k" not in core.store


def test_an_update_heard_while_backing_off_between_sync_attempts_survives_the_takeover() -> (
    None
):
    """Found by the simulation: a sync attempt timed out, and while the
    replica waited to try again its connection still carried the stream.
    What it heard then was dropped; the active died: lost."""
    core = passive_core(5)
    core.on_update(kvpub(b"/a", 7, b"a", uuid=_uuid(70)), 1.0)  # 6 was missed
    assert core.replica is not None and core.replica.phase is Phase.SYNCING
    core.poll(6.5)  # no snapshot in time: back off
    assert core.replica.phase is Phase.INITIAL
    core.on_update(hugz(7, {"lineage": ACTIVES}), 7.0)  # still the active's map
    core.on_update(kvpub(b"/k", 8, b"heard", uuid=_uuid(71)), 7.1)
    take_over(core, 7.2)
    assert core.store.get(b"/k").body == b"heard"
    assert core.store.sequence == 8


def test_takeover_skips_a_pending_write_a_later_one_overwrote_past_a_gap() -> None:
    """The passive missed update 2 (a gap), then heard U2 write /k at 3.  U1
    may be update 2, applied before U2: the later write wins, U1 is not
    replayed over it."""
    core = passive_core(0)
    core.on_update(kvpub(b"/other", 1, b"o", U3), 1.0)
    core.collect(kvset(b"/k", b"old", U1), 1.0)  # held at 1
    core.on_update(kvpub(b"/k", 3, b"new", U2), 1.2)  # 2 was missed
    assert take_over(core, 2.0) == []
    assert core.store.get(b"/k").body == b"new"
    assert core.stats["pending_superseded"] == 1


def test_a_long_takeover_replays_in_steps_and_queues_new_writes() -> None:
    core = passive_core(0)
    for n in range(20):
        core.collect(kvset(b"/p/%d" % n, b"%d" % n, _uuid(100 + n)), 1.0)
    core.on_peer_state(state(State.PRIMARY), 2.0)
    assert core.busy and not core.serving
    first = core.step(2.0, limit=7)
    assert [seq(f) for f in first] == list(range(1, 8))
    # A client writes meanwhile: it queues behind the pending list.
    assert core.collect(kvset(b"/p/3", b"new", _uuid(999)), 2.0) is None
    assert core.expire(100.0) == []  # nothing expires before the takeover ends
    rest = run(core, 2.0)
    assert [f[0] for f in rest][-1] == b"/p/3" and rest[-1][4] == b"new"
    assert [seq(f) for f in rest] == list(range(8, 22))
    assert core.serving and core.store.get(b"/p/3").body == b"new"


@pytest.mark.parametrize(("takeover", "applied"), [(39.999, 1), (40.0, 0)])
def test_pending_older_than_max_age_is_dropped(takeover: float, applied: int) -> None:
    core = passive_core(0, pending_age=30.0)
    core.collect(kvset(b"/a"), 10.0)
    core.poll(takeover)  # housekeeping drops what is too old
    assert len(take_over(core, takeover)) == applied
    assert core.pending.dropped == 1 - applied
    assert (b"/a" in core.store) is bool(applied)


def test_pending_is_bounded_by_size() -> None:
    core = passive_core(0, pending_size=2)
    for n, key in enumerate((b"/a", b"/b", b"/c"), 1):
        core.collect(kvset(key, uuid=_uuid(n)), 1.0)
    assert len(core.pending) == 2
    assert core.pending.dropped == 1
    assert [frames[0] for frames in take_over(core, 2.0)] == [b"/b", b"/c"]


# --------------------------------------------------------------------------
# Case 1: an update published by the active is never lost at takeover,
# whatever the sync attempts did
# --------------------------------------------------------------------------


def _resyncing(core: ServerCore) -> None:
    """The passive missed an update (a gap): it asks for a new snapshot."""
    core.on_update(kvpub(b"/gap", 7, b"G", _uuid(7)), 1.0)
    assert actions(core) == [Request(b"")]
    assert not core.synced


@pytest.mark.parametrize("failure", ["timeout", "bad reply", "two attempts"])
def test_an_update_mirrored_during_a_failed_sync_survives_the_takeover(
    failure: str,
) -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U4),))
    core.collect(kvset(b"/x", b"X", U1), 1.0)  # a client's copy, held
    _resyncing(core)
    core.on_update(kvpub(b"/x", 8, b"X", U1), 1.1)  # the active's copy
    core.on_update(kvpub(b"/ttl", 9, b"", _uuid(9)), 1.2)  # a TTL delete
    if failure == "timeout":
        core.poll(1.0 + 5.0)  # no reply within sync_timeout: back off, retry
        core.poll(7.0)
        assert actions(core) == [Connect(0), Request(b"")]
    elif failure == "bad reply":
        with pytest.raises(RemoteProtocolError):
            core.on_reply([b"garbage"], 1.3)
        core.poll(6.3)
        core.poll(7.0)
        assert actions(core) == [Connect(0), Request(b"")]
    else:  # a second attempt gets half a snapshot, then nothing
        core.poll(6.0)
        core.poll(7.0)
        assert actions(core) == [Connect(0), Request(b"")]
        core.on_reply(kvpub(b"/a", 5, b"A", U4), 7.1)
        core.on_reply(kvpub(b"/x", 8, b"X", U1), 7.1)
        core.poll(12.1)  # a second failure in a row: twice the back-off
        core.poll(13.1)
        assert actions(core) == [Connect(0), Request(b"")]
    assert len(core.pending) == 1  # not matched: the copy is not in our map
    # The active dies before any attempt completes; a client votes.
    published = take_over(core, 20.0)
    assert core.store.get(b"/x") == KVMsg(b"/x", 8, U1, {}, b"X")
    assert core.store.get(b"/gap") == KVMsg(b"/gap", 7, _uuid(7), {}, b"G")
    assert core.store.sequence == 9
    assert published == []  # already published by the old active
    # The client resends /x after failing over: a repeat, applied once.
    assert core.collect(kvset(b"/x", b"X", U1), 21.0) is None
    assert core.stats["unsynced_takeovers"] == 0


def test_a_takeover_mid_catch_up_uses_the_new_snapshot_and_its_backlog() -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U4),))
    _resyncing(core)
    for n in range(8, 3000):  # a long backlog while the snapshot comes
        core.on_update(kvpub(b"/s/%d" % n, n, b"%d" % n, _uuid(n)), 1.0)
    core.on_reply(kvpub(b"/a", 5, b"A", U4), 1.0)
    core.on_reply(kvpub(b"/gap", 7, b"G", _uuid(7)), 1.0)
    core.on_reply(kthxbai(7, b"", {"lineage": ACTIVES}), 1.0)
    core.on_reply(kthxbai(7, HISTORY), 1.0)
    replica = core.replica
    assert replica is not None and replica.busy  # the backlog is being applied
    assert replica.phase is Phase.SYNCING
    assert core.replica.stats["syncs"] == 1  # not yet the second
    take_over(core, 2.0)
    assert core.store.sequence == 2999
    assert len(core.store) == 2 + 2992
    assert core.stats["unsynced_takeovers"] == 0


def test_backlog_newer_than_the_snapshot_is_applied_after_it() -> None:
    core = passive_core(0)
    _resyncing(core)
    # The active's stream, heard while the snapshot is on its way.
    stream = [
        kvpub(b"/s19", 19, b"19", _uuid(19)),
        kvpub(b"/s20", 20, b"20", _uuid(20)),
        kvpub(b"/s21", 21, b"21", _uuid(21)),
        kvpub(b"/snap", 22, b"new", _uuid(22)),
        kvpub(b"/gone", 23, b"", _uuid(23)),
    ]
    for frames in stream:
        core.on_update(frames, 1.0)
    assert core.sequence == 0  # nothing applied yet
    core.on_reply(kvpub(b"/snap", 5, b"old", _uuid(5)), 1.0)
    core.on_reply(kvpub(b"/gone", 6, b"here", _uuid(6)), 1.0)
    core.on_reply(kthxbai(20, b"", {"lineage": ACTIVES}), 1.0)
    core.on_reply(kthxbai(20, HISTORY), 1.0)
    run(core, 1.0)
    assert core.synced and actions(core) == [Request(HISTORY)]
    assert core.store.keys() == [b"/snap", b"/s21"]
    assert core.store.get(b"/snap") == KVMsg(b"/snap", 22, _uuid(22), {}, b"new")
    assert core.sequence == 23
    # The stream goes on where the backlog ended.
    core.on_update(kvpub(b"/next", 24, uuid=_uuid(24)), 2.0)
    assert core.sequence == 24 and actions(core) == []


def test_failed_sync_leaves_the_previous_store() -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U1),))
    good = core.store
    _resyncing(core)
    core.on_reply(kvpub(b"/partial", 8, b"P", U3), 1.0)
    assert core.store is good
    core.poll(6.0)  # the active died mid-snapshot: after a back-off, the
    core.poll(7.0)  # next try starts afresh
    assert actions(core) == [Connect(0), Request(b"")]
    assert core.store is good
    assert core.store.keys() == [b"/a"]
    core.on_reply(kvpub(b"/c", 10, b"C", U4), 7.5)
    core.on_reply(kthxbai(10, b"", {"lineage": ACTIVES}), 7.5)
    core.on_reply(kthxbai(10, HISTORY), 7.5)
    run(core, 7.5)
    assert core.store.keys() == [b"/c"]  # nothing of the first try leaks
    assert core.sequence == 10


def test_takeover_after_a_partial_snapshot_keeps_pending_updates() -> None:
    # UUIDs of a snapshot match pending updates only once it is complete: the
    # last good store lacks them if the active dies mid-snapshot.
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U4),))
    core.collect(kvset(b"/x", b"X", U1), 1.0)  # the active applied it as 6
    _resyncing(core)  # the passive missed KVPUB 6, saw 7
    core.on_reply(kvpub(b"/x", 6, b"X", U1), 1.5)
    assert len(core.pending) == 1
    # The active dies before KTHXBAI; the passive takes over.
    published = take_over(core, 5.0)
    assert published == [[b"/x", SEQUENCE.pack(8), U1, b"", b"X"]]
    assert core.store.get(b"/x") == KVMsg(b"/x", 8, U1, {}, b"X")
    assert core.collect(kvset(b"/x", b"X", U1), 6.0) is None  # resend: duplicate


def test_snapshot_uuids_match_pending() -> None:
    core = passive_core(0)
    core.collect(kvset(b"/a", uuid=U1), 0.0)
    _resyncing(core)
    core.on_reply(kvpub(b"/a", 1, uuid=U1), 1.5)
    assert len(core.pending) == 1  # only a complete snapshot matches
    core.on_reply(kthxbai(7, b"", {"lineage": ACTIVES}), 1.5)
    core.on_reply(kthxbai(7, HISTORY), 1.5)
    run(core, 1.5)
    assert len(core.pending) == 0
    assert core.collect(kvset(b"/a", uuid=U1), 1.6) is None  # resend: duplicate


# --------------------------------------------------------------------------
# Case 3: the window is replicated, so a resend of a write replaced before
# the passive synced is still a repeat after a takeover
# --------------------------------------------------------------------------


def test_the_window_comes_with_the_snapshot_and_survives_the_takeover() -> None:
    active = active_core()
    active.collect(kvset(b"/k", b"old", U1), 0.0)
    active.collect(kvset(b"/k", b"new", U2), 1.0)  # U1 replaced at 1.0
    snapshot = [f[1:] for f in _drain(_transfer(active, b""), 2.0)][:-1]
    history = [f[1:] for f in _drain(_transfer(active, HISTORY), 2.0)][:-1]
    assert [decode_kvmsg(h).key for h in history] == [HISTORY]
    passive = passive_core(2, snapshot, now=100.0, history=history)
    assert U1 in passive.applied
    take_over(passive, 110.0)
    # The writer of U1 missed its confirmation and resends after failing
    # over: it must not bring back the value a later write replaced.
    assert passive.collect(kvset(b"/k", b"old", U1), 111.0) is None
    assert passive.store.get(b"/k").body == b"new"
    # The ages came along: U1 was replaced 1 s before the snapshot.
    assert passive.applied.export(110.0) == [(11.0, [U1])]


def test_a_history_batch_must_be_whole_uuids() -> None:
    core = new_core(bstar=BinaryStar(False, 0.0))
    core.on_peer_state(state(State.ACTIVE), 0.0)
    core.poll(0.0)
    core.on_reply(kthxbai(0, b"", {"lineage": ACTIVES}), 0.0)
    bad = history_batch([b"x" * 15], 1.0)
    with pytest.raises(RemoteProtocolError):
        core.on_reply(bad, 0.0)


# --------------------------------------------------------------------------
# Passive: the mirrored stream
# --------------------------------------------------------------------------


def test_mirror_in_order_applies() -> None:
    core = passive_core(5)
    core.on_update(kvpub(b"/a", 6, b"A", U1), 1.0)
    core.on_update(kvpub(b"/a", 7, b"", U2), 1.0)  # delete
    core.on_update(kvpub(b"/b", 8, b"B", U3), 1.0)
    assert core.store.keys() == [b"/b"]
    assert core.sequence == 8
    assert actions(core) == []


def test_the_mirrored_stream_fills_the_window_as_the_active_does() -> None:
    active, passive = active_core(), passive_core(0)
    writes = [(b"/a", b"A", U1), (b"/a", b"B", U2), (b"/a", b"", U3), (b"/b", b"", U4)]
    for now, (key, body, uuid) in enumerate(writes, 1):
        published = active.collect(kvset(key, body, uuid), float(now))
        assert published is not None
        passive.on_update(published, float(now))
    assert passive.sequence == active.sequence == 4
    assert passive.store.keys() == active.store.keys() == []
    assert passive.applied.export(10.0) == active.applied.export(10.0)
    assert active.applied.export(10.0) == [(8.0, [U1]), (7.0, [U2, U3]), (6.0, [U4])]


def test_mirror_gap_asks_for_resync() -> None:
    core = passive_core(5)
    core.on_update(kvpub(b"/a", 7, b"A", U1), 1.0)
    assert actions(core) == [Request(b"")]


def test_mirror_of_an_old_sequence_is_ignored() -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U1),))
    core.on_update(kvpub(b"/a", 5, b"again", U2), 1.0)
    assert core.store.get(b"/a") == KVMsg(b"/a", 5, U1, {}, b"A")
    assert core.sequence == 5 and actions(core) == []


@pytest.mark.parametrize(("sequence", "resync"), [(5, False), (6, True)])
def test_hugz_with_a_newer_sequence_asks_for_resync(
    sequence: int, resync: bool
) -> None:
    core = passive_core(5)
    core.on_update(hugz(sequence, {"lineage": ACTIVES}), 1.0)
    assert actions(core) == ([Request(b"")] if resync else [])
    assert core.sequence == 5


def test_a_new_lineage_on_the_actives_stream_is_a_reset() -> None:
    core = passive_core(5, (kvpub(b"/a", 5),))
    core.on_update(hugz(5, {"lineage": ACTIVES}), 1.0)
    core.on_update(hugz(9, {"lineage": "b" * 32}), 2.0)
    assert actions(core) == [Request(b"")]
    assert core.replica is not None and core.replica.stats["resets"] == 1


def test_mirror_while_active_is_ignored() -> None:
    core = active_core()
    core.collect(kvset(b"/a", b"A", U1), 0.0)
    before = _state(core)
    core.on_update(kvpub(b"/a", 2, b"theirs", U2), 1.0)
    core.on_update(kvpub(b"/b", 9, b"B", U3), 1.0)
    core.on_update(hugz(50), 1.0)
    core.on_reply(kthxbai(9, b""), 1.0)
    assert _state(core) == before
    assert core.store.get(b"/a") == KVMsg(b"/a", 1, U1, {}, b"A")
    assert core.collect(kvset(b"/b", b"B", U3), 2.0) is not None  # not "seen"


def test_a_reply_outside_a_sync_is_ignored() -> None:
    core = passive_core(5, (kvpub(b"/a", 5),))
    before = _state(core)
    core.on_reply(kvpub(b"/b", 9, uuid=U2), 1.0)
    core.on_reply(kthxbai(9, b""), 1.0)
    assert _state(core) == before


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_stream_or_snapshot_message_is_rejected(
    frames: list[bytes],
) -> None:
    core = passive_core(5, (kvpub(b"/a", 5),))
    before = _state(core)
    with pytest.raises(RemoteProtocolError):
        core.on_update(frames, 1.0)
    assert _state(core) == before
    _resyncing(core)
    with pytest.raises(RemoteProtocolError):
        core.on_reply(frames, 1.0)


def test_hugz_and_kthxbai_carry_the_sequence_and_the_lineage() -> None:
    core = active_core()
    core.collect(kvset(b"/a"), 0.0)
    assert core.hugz() == [
        b"HUGZ",
        SEQUENCE.pack(1),
        b"",
        b"lineage=" + b"f" * 32 + b"\n",
        b"",
    ]
    assert core.kthxbai(b"/a/") == [
        b"KTHXBAI",
        SEQUENCE.pack(1),
        b"",
        b"lineage=" + b"f" * 32 + b"\ncount=0\n",  # /a/ is tracked from now
        b"/a/",
    ]
    pair = passive_core(3)
    take_over(pair, 1.0)
    assert decode_kvmsg(pair.hugz()).properties == {
        "lineage": ACTIVES,
        "branch": "3",
    }


@pytest.mark.parametrize(
    "backlog", [(7,), (6, 8)], ids=["after-snapshot", "inside-backlog"]
)
def test_gap_in_the_backlog_asks_for_resync(backlog: tuple[int, ...]) -> None:
    # A message lost between KTHXBAI and the backlog, or inside the backlog,
    # must not be skipped silently: the replica syncs again.
    core = new_core(bstar=BinaryStar(False, 0.0))
    core.on_peer_state(state(State.ACTIVE), 0.0)
    core.poll(0.0)
    assert actions(core) == [Connect(0), Request(b"")]
    for sequence in backlog:
        core.on_update(kvpub(b"/k%d" % sequence, sequence, uuid=_uuid(sequence)), 1.0)
    core.on_reply(kthxbai(5, b"", {"lineage": ACTIVES}), 1.0)
    core.on_reply(kthxbai(5, HISTORY), 1.0)
    run(core, 1.0)
    assert actions(core) == [Request(HISTORY), Request(b"")]
    assert core.replica is not None and core.replica.stats["gaps"] == 1
    assert core.sequence == backlog[-1]  # applied meanwhile, gap or not


# --------------------------------------------------------------------------
# Case 6: splits that heal
# --------------------------------------------------------------------------


def exchange_hugz(a: ServerCore, b: ServerCore, now: float) -> None:
    """Each hears the other's HUGZ (its claim), as over their publishers."""
    a_hugz, b_hugz = a.hugz(), b.hugz()
    a.on_peer_hugz(b_hugz, now)
    b.on_peer_hugz(a_hugz, now)


def heartbeat(a: ServerCore, b: ServerCore, now: float) -> None:
    assert a.bstar is not None and b.bstar is not None
    a_state, b_state = a.bstar.state, b.bstar.state
    a.on_peer_state(state(b_state), now)
    b.on_peer_state(state(a_state), now)


def split_pair(
    writes: list[list[bytes]] | None = None,
    backup_options: Mapping[str, object] | None = None,
    **primary_options: object,
) -> tuple[ServerCore, ServerCore]:
    """A pair that split: the backup took over, both accept writes.

    Before the split the primary applied ``writes`` (by default /shared) and
    the backup synced them."""
    if writes is None:
        writes = [kvset(b"/shared", b"before", U1)]
    primary = new_core(bstar=BinaryStar(True, 0.0), **primary_options)
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    for frames in writes:
        primary.collect(frames, 0.5)
    backup = new_core(bstar=BinaryStar(False, 0.0), **(backup_options or {}))
    backup.on_peer_state(state(State.ACTIVE), 0.0)
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 1.0)][:-1]
    sync(backup, primary.store.sequence, snapshot, 1.0, lineage=OURS)
    assert backup.lineage == primary.lineage == OURS
    # The link between them breaks; a client votes for the backup.
    assert backup.on_vote(10.0) is not None and backup.role is Role.ACTIVE
    run(backup, 10.0)
    return primary, backup


def test_a_healed_split_hands_the_losers_writes_to_the_winner() -> None:
    primary, backup = split_pair()
    assert backup.branch == 1
    # Each side's clients write meanwhile; one client reached both.
    primary.collect(kvset(b"/p-only", b"p", _uuid(20)), 11.0)
    backup.collect(kvset(b"/b-only", b"b", _uuid(21)), 11.0)
    backup.collect(kvset(b"/shared", b"", _uuid(22)), 11.5)  # a client's delete
    both = kvset(b"/both", b"x", _uuid(23))
    primary.collect(both, 12.0)
    backup.collect(both, 12.0)
    # Two clients wrote one key, each on its own side: the loser's value is
    # handed over after the split, so it is applied last and wins.
    primary.collect(kvset(b"/conflict", b"west", _uuid(24)), 12.5)
    backup.collect(kvset(b"/conflict", b"east", _uuid(25)), 12.6)
    # The link heals: each hears the other's HUGZ, then its heartbeat.
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    assert (primary.role, backup.role) == (Role.ACTIVE, Role.PASSIVE)
    # The backup hands over what it accepted while active, and keeps it.
    run(backup, 20.0)
    relays, backup.relays = backup.relays, []
    window, *records = relays
    assert sorted(decode_kvmsg(f).key for f in records) == [
        b"/b-only",
        b"/both",
        b"/conflict",
        b"/shared",
    ]
    # First, the UUIDs it replaced while active (less the deletes it hands
    # over, which must still apply).
    uuids, _age = decode_history(decode_kvmsg(window))
    assert uuids == [U1] and decode_kvmsg(window).properties["lineage"] == OURS
    assert len(backup.pending) == 4
    published = [p for f in relays if (p := primary.collect(f, 20.1)) is not None]
    assert primary.stats["handoff_window"] == 1
    # /both was applied by the winner already: not twice.
    assert sorted(f[0] for f in published) == [b"/b-only", b"/conflict", b"/shared"]
    assert primary.stats["duplicates"] == 1
    assert b"/shared" not in primary.store  # the confirmed delete holds
    assert primary.store.get(b"/b-only").body == b"b"
    assert primary.store.get(b"/conflict").body == b"east"
    # The published copies are what the loser waits for: its resync matches
    # them (and /both, which the winner holds) so nothing is resent for ever.
    snapshot = [f[1:] for f in _drain(_transfer(primary, b""), 21.0)][:-1]
    history = [f[1:] for f in _drain(_transfer(primary, HISTORY), 21.0)][:-1]
    sync(backup, primary.store.sequence, snapshot, 21.0, history, lineage=OURS)
    assert len(backup.pending) == 0
    assert len(backup.relays) == 5  # resent once (a second passed), window first
    backup.relays.clear()
    backup.poll(30.0)
    assert backup.relays == []


def heal(primary: ServerCore, backup: ServerCore, now: float) -> None:
    """The split heals: the backup steps down and its hand-over reaches the
    primary."""
    exchange_hugz(primary, backup, now)
    heartbeat(primary, backup, now)
    run(backup, now)
    for frames in backup.relays:
        primary.collect(frames, now + 0.1)


def test_a_late_copy_of_a_write_the_loser_replaced_is_a_repeat_at_the_winner() -> None:
    """Found by the simulation (seed 30): a client cut off from the primary
    wrote twice through the backup; its connection to the primary still
    held both writes and delivered them after the split healed.  The first,
    replaced on the backup, must not come back at the winner."""
    primary, backup = split_pair()
    first, second = kvset(b"/k", b"one", _uuid(40)), kvset(b"/k", b"two", _uuid(41))
    backup.collect(first, 11.0)
    backup.collect(second, 11.5)
    heal(primary, backup, 20.0)
    assert primary.store.get(b"/k").body == b"two"
    assert primary.collect(first, 21.0) is None  # the late copies arrive
    assert primary.collect(second, 21.0) is None
    assert primary.store.get(b"/k").body == b"two"


def test_a_ttl_expiry_on_the_loser_is_handed_over_as_a_delete() -> None:
    """Found by the simulation (seed 23): the loser's TTL value expired;
    a late copy of an older write to the key reached the winner first, and
    nothing deleted it again."""
    primary, backup = split_pair()
    older = kvset(b"/k", b"old", _uuid(42))
    backup.collect(older, 11.0)
    backup.collect(kvset(b"/k", b"brief", _uuid(43), {"ttl": "1"}), 11.5)
    assert [f[0] for f in backup.expire(13.0)] == [b"/k"]
    assert primary.collect(older, 14.0) is not None  # late, on the winner
    heal(primary, backup, 20.0)
    assert b"/k" not in primary.store


def test_an_expiry_hand_over_spares_a_write_made_on_the_winner_after_the_fork() -> None:
    """The loser's TTL value expired; then a client wrote the key on the
    winner and was confirmed.  The expiry is older: the write stays."""
    primary, backup = split_pair()
    backup.collect(kvset(b"/k", b"brief", _uuid(43), {"ttl": "1"}), 11.5)
    assert [f[0] for f in backup.expire(13.0)] == [b"/k"]
    assert primary.collect(kvset(b"/k", b"newer", _uuid(44)), 14.0) is not None
    heal(primary, backup, 20.0)
    assert primary.store.get(b"/k").body == b"newer"
    assert primary.stats["handoff_superseded"] == 1


@pytest.mark.parametrize("where", ["standalone", "passive", "other lineage", "too big"])
def test_a_window_hand_over_is_taken_only_from_the_peer_of_an_active(
    where: str,
) -> None:
    primary, backup = split_pair()
    core, lineage, count = primary, OURS, 1
    if where == "standalone":
        core = new_core()
        core.start(0.0)
        lineage = core.lineage or ""
    elif where == "passive":
        exchange_hugz(primary, backup, 20.0)
        heartbeat(primary, backup, 20.0)  # the backup steps down
        core = backup
    elif where == "other lineage":
        lineage = "e" * 32
    else:
        count = 4097
    batch = history_batch([_uuid(50 + i % 100) for i in range(count)], 1.0)
    props = encode_properties({"age": "1", "lineage": lineage})
    forged = [HISTORY, SEQUENCE.pack(1), b"", props, batch[4]]
    before = len(core.applied)
    with pytest.raises(RemoteProtocolError):
        core.collect(forged, 20.0)
    assert len(core.applied) == before


def test_no_client_may_write_the_history_key() -> None:
    core = new_core()
    core.start(0.0)
    with pytest.raises(RemoteProtocolError):
        core.collect(kvset(HISTORY, b"x", _uuid(60)), 1.0)
    assert HISTORY not in core.store


def test_a_window_hand_over_that_is_malformed_changes_nothing() -> None:
    primary, _backup = split_pair()
    bad = [HISTORY, SEQUENCE.pack(1), b"", encode_properties({"lineage": OURS}), b"x"]
    before = len(primary.applied)
    with pytest.raises(RemoteProtocolError):
        primary.collect(bad, 20.0)
    assert len(primary.applied) == before


def test_the_winner_drops_hand_overs_it_had_from_the_peer() -> None:
    """A write the winner mirrored before it took over comes back as a
    hand-over with a sequence at or below its branch point: dropped, even
    when the window no longer holds its UUID."""
    _primary, backup = split_pair()
    # (U4 stands for a write the window forgot: neither stored nor held.)
    handed = encode_kvmsg(KVMsg(b"/shared", 1, U4, {"lineage": OURS}, b"before"))
    assert U4 not in backup.applied and backup.store.uuid_of(b"/shared") != U4
    assert backup.collect(handed, 11.0) is None
    assert backup.stats["handoff_known"] == 1
    assert backup.store.get(b"/shared").body == b"before"
    newer = encode_kvmsg(KVMsg(b"/new", 2, _uuid(30), {"lineage": OURS}, b"n"))
    published = backup.collect(newer, 11.0)
    assert published == [b"/new", SEQUENCE.pack(2), _uuid(30), b"", b"n"]
    assert backup.store.get(b"/new").properties == {}  # stored canonical


def test_an_empty_restarted_server_never_wins_over_the_map() -> None:
    """The primary restarts empty while the backup holds the map; a partition
    and a vote make it active too.  When the link heals, the backup stays."""
    _, backup = split_pair()
    backup.collect(kvset(b"/kept", b"k", _uuid(40)), 11.0)
    restarted = ServerCore(bstar=BinaryStar(True, 29.0), new_lineage=lambda: "c" * 32)
    assert restarted.on_vote(32.0) is not None  # peer silent: it takes the vote
    run(restarted, 32.0)
    assert restarted.role is Role.ACTIVE and restarted.fresh
    restarted.collect(kvset(b"/new", b"n", _uuid(41)), 33.0)
    exchange_hugz(restarted, backup, 40.0)
    heartbeat(restarted, backup, 40.0)
    assert (restarted.role, backup.role) == (Role.PASSIVE, Role.ACTIVE)
    run(restarted, 40.0)
    relays = restarted.relays
    assert [decode_kvmsg(f).key for f in relays] == [b"/new"]
    for frames in relays:
        backup.collect(frames, 40.1)
    assert sorted(backup.store.keys()) == [b"/kept", b"/new", b"/shared"]


def test_without_claims_a_fresh_map_yields_at_once() -> None:
    """The primary founded the map (fresh); the backup holds a copy.  With no
    HUGZ heard either way, the fresh side steps down at the first heartbeat
    and the held side stays: nothing decides against the map."""
    primary, backup = split_pair()
    assert primary.fresh and not backup.fresh
    heartbeat(primary, backup, 20.0)
    assert (primary.role, backup.role) == (Role.PASSIVE, Role.ACTIVE)
    for beat in range(1, 5):  # the backup now hears PASSIVE: settled
        heartbeat(primary, backup, 20.0 + beat)
        assert (primary.role, backup.role) == (Role.PASSIVE, Role.ACTIVE)


def test_without_claims_two_held_maps_wait_then_the_primary_wins() -> None:
    primary, backup = split_pair()
    primary.fresh = False  # as if it had synced its map from the backup once
    for beat in range(2):
        heartbeat(primary, backup, 20.0 + beat)
        assert (primary.role, backup.role) == (Role.ACTIVE, Role.ACTIVE)
    heartbeat(primary, backup, 22.0)
    assert (primary.role, backup.role) == (Role.ACTIVE, Role.PASSIVE)
    assert primary.bstar is not None and primary.bstar.faults["dual actives"] == 1


def test_a_stale_claim_counts_as_none() -> None:
    primary, backup = split_pair()
    primary.fresh = False
    exchange_hugz(primary, backup, 10.0)  # heard long before the link heals
    heartbeat(primary, backup, 20.0)
    assert (primary.role, backup.role) == (Role.ACTIVE, Role.ACTIVE)


# --------------------------------------------------------------------------
# Snapshot transfer
# --------------------------------------------------------------------------


def _transfer(core: ServerCore, subtree: bytes, identity: bytes = b"id") -> Transfer:
    if subtree == HISTORY:
        return Transfer(
            identity, core.store, [], core.kthxbai(subtree), 0.0, core.history(2.0)
        )
    return Transfer(
        identity, core.store, core.store.keys(subtree), core.kthxbai(subtree), 0.0
    )


def _store() -> Store:
    store = Store()
    store.put(b"/a/1", 1, U1, b"owner=x\n", b"one", None, 0.0)
    store.put(b"/b/2", 2, U2, b"", b"two", None, 0.0)
    store.put(b"/a/3", 3, U3, b"", b"three", None, 0.0)
    store.sequence = 3
    return store


END = kthxbai(3, b"", {"lineage": OURS})


def _drain(transfer: Transfer, now: float) -> list[list[bytes]]:
    sent: list[list[bytes]] = []
    for _ in range(100_000):
        if (frames := transfer.peek(now)) is None:
            return sent
        sent.append(frames)
        transfer.advance(now)
    raise AssertionError("the transfer never ended")


def test_transfer_sends_kvsyncs_then_the_end() -> None:
    store = _store()
    transfer = Transfer(b"\x00id", store, store.keys(), END, 0.0)
    assert not transfer.done
    sent = _drain(transfer, 1.0)
    assert sent == [
        [b"\x00id", b"/a/1", SEQUENCE.pack(1), U1, b"owner=x\n", b"one"],
        [b"\x00id", b"/b/2", SEQUENCE.pack(2), U2, b"", b"two"],
        [b"\x00id", b"/a/3", SEQUENCE.pack(3), U3, b"", b"three"],
        [b"\x00id", *END],
    ]
    assert all(decode_kvmsg(frames[1:]) for frames in sent)
    assert transfer.done
    assert transfer.sent == 4
    assert transfer.peek(2.0) is None


def test_transfer_of_an_empty_key_list() -> None:
    transfer = Transfer(b"id", Store(), [], END, 0.0)
    assert _drain(transfer, 0.0) == [[b"id", *END]]


def test_transfer_skips_deleted_and_sends_changed_values() -> None:
    store = _store()
    transfer = Transfer(b"id", store, store.keys(), END, 0.0)
    store.remove(b"/b/2")
    store.put(b"/a/3", store.next_sequence(), U4, b"", b"newer", None, 0.0)
    sent = _drain(transfer, 1.0)
    assert sent == [
        [b"id", b"/a/1", SEQUENCE.pack(1), U1, b"owner=x\n", b"one"],
        [b"id", b"/a/3", SEQUENCE.pack(4), U4, b"", b"newer"],
        [b"id", *END],
    ]


def test_transfer_peek_without_advance_repeats_and_records_idleness() -> None:
    store = _store()
    transfer = Transfer(b"id", store, store.keys(), END, 0.0)
    first = transfer.peek(1.0)
    assert first is not None
    assert first[1] == b"/a/1"
    store.remove(b"/a/1")  # already taken: the retry sends the same message
    assert transfer.peek(2.0) == first
    assert transfer.sent == 0 and transfer.idle_since == 0.0
    transfer.advance(3.0)
    assert transfer.idle_since == 3.0
    second = transfer.peek(3.0)
    assert second is not None and second[1] == b"/b/2"
    transfer.advance(3.0)
    transfer.peek(3.0)
    transfer.advance(4.0)
    last = transfer.peek(4.0)  # the end repeats too until it is sent
    assert last == [b"id", *END]
    assert transfer.peek(4.0) == last
    assert not transfer.done
    transfer.advance(5.0)
    assert transfer.done
    assert transfer.peek(5.0) is None


def test_transfer_sends_remaining_ttl() -> None:
    store = Store()
    store.put(b"/t", 1, U1, b"ttl=10\nowner=x\n", b"v", 10.0, 0.0)
    store.sequence = 1
    sent = _drain(Transfer(b"id", store, store.keys(), END, 0.0), 4.0)
    msg = decode_kvmsg(sent[0][1:])
    assert msg.ttl == 6.0
    assert msg.properties["owner"] == "x"


def test_history_transfer_sends_the_window_in_batches() -> None:
    core = active_core()
    for n in range(5000):
        core.collect(kvset(b"/k", b"%d" % n, _uuid(10 + n)), 1.0)
    sent = _drain(_transfer(core, HISTORY), 2.0)
    assert [f[1] for f in sent] == [HISTORY, HISTORY, KTHXBAI]
    batches = [decode_kvmsg(f[1:]) for f in sent[:-1]]
    assert [len(b.body) // 16 for b in batches] == [4096, 4999 - 4096]
    assert {b.properties["age"] for b in batches} == {"1"}


def test_the_backlog_is_bounded_and_an_overflow_is_a_gap() -> None:
    """A snapshot slower than the stream: the oldest updates waiting for it
    are dropped (counted), and the gap they leave makes the passive sync
    again rather than skip them."""
    core = passive_core(0, backlog_limit=10)
    _resyncing(core)  # stream update 7 waits; a snapshot is on its way
    for n in range(8, 30):
        core.on_update(kvpub(b"/k/%d" % n, n, b"v", _uuid(n)), 1.0)
    assert core.replica is not None
    assert core.replica.stats["backlog_dropped"] == 13
    core.on_reply(kthxbai(9, b"", {"lineage": ACTIVES}), 1.5)
    core.on_reply(kthxbai(9, HISTORY), 1.5)
    run(core, 1.5)
    assert actions(core) == [Request(HISTORY), Request(b"")]  # 10..19 missing
    assert core.sequence == 29


def test_a_transfer_looks_at_a_bounded_number_of_deleted_keys_per_peek() -> None:
    """After a mass expiry most of a key list may be gone: one ``peek`` never
    scans all of it, so the server stays responsive."""
    store = Store()
    for n in range(2000):
        store.put(b"/k/%04d" % n, n + 1, _uuid(n), b"", b"v", None, 0.0)
    store.sequence = 2000
    transfer = Transfer(b"id", store, store.keys(), END, 0.0)
    for n in range(1999):  # all but the last are deleted meanwhile
        store.remove(b"/k/%04d" % n)
    peeks = 0
    for _ in range(2000):
        if transfer.peek(1.0) is not None:
            break
        peeks += 1
        assert not transfer.done and transfer.examined == peeks * SKIP
    else:
        raise AssertionError("peek never came to the last key")
    assert peeks == 1999 // SKIP and transfer.examined == 2000
    assert transfer.peek(1.0)[1] == b"/k/1999"
    transfer.advance(1.0)
    assert transfer.peek(1.0) == [b"id", *END]


def test_confirming_a_long_backlog_is_done_in_steps_too() -> None:
    """Confirming what a new snapshot holds (pending copies matched) is
    bounded work per step, like applying the backlog."""
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U4),))
    for n in range(3000):
        core.collect(kvset(b"/p/%d" % n, b"v", _uuid(100 + n)), 1.0)
    _resyncing(core)
    for n in range(3000):  # the active's copies, all in the new snapshot
        core.on_update(kvpub(b"/p/%d" % n, 8 + n, b"v", _uuid(100 + n)), 1.0)
    core.on_reply(kthxbai(3007, b"", {"lineage": ACTIVES}), 1.0)
    core.on_reply(kthxbai(3007, HISTORY), 1.0)
    assert core.busy and len(core.pending) == 3000  # nothing live yet
    sizes = []
    for _ in range(10_000):
        if not core.busy:
            break
        core.step(1.0, limit=500)
        sizes.append(len(core.pending))
    else:
        raise AssertionError("the work never ended")
    drops = [a - b for a, b in itertools.pairwise([3000, *sizes])]
    assert sizes[-1] == 0 and len(sizes) > 4
    assert max(drops) <= 500 + 1024  # a step, and the first batch at go-live


def test_a_founder_is_fresh_only_until_its_peer_copied_its_map() -> None:
    primary = new_core(bstar=BinaryStar(True, 0.0))
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    assert primary.fresh
    assert primary.on_request(0.5, from_peer=True) == (True, None)  # not a vote
    assert primary.on_request(0.5, from_peer=True, subtree=b"") == (True, None)
    assert primary.fresh  # the peer's map is not complete before its window
    assert primary.on_request(0.6, from_peer=True, subtree=HISTORY) == (True, None)
    assert not primary.fresh
    # A passive answers no peer request and counts none as a vote.
    passive = passive_core(0)
    assert passive.on_request(100.0, from_peer=True) == (False, None)
    assert passive.on_request(100.0, from_peer=True, subtree=HISTORY) == (
        False,
        None,
    )
    assert passive.role is Role.PASSIVE


def test_peer_synced_is_what_a_peers_history_request_does() -> None:
    """The shell may still say it itself (the older way): the same rule."""
    primary = new_core(bstar=BinaryStar(True, 0.0))
    primary.on_peer_state(state(State.BACKUP), 0.0)
    run(primary, 0.0)
    primary.peer_synced()
    assert not primary.fresh
    assert primary.on_request(0.6, from_peer=True, subtree=HISTORY) == (True, None)
    assert not primary.fresh
    # A client's HISTORY request is a vote, and says nothing of the peer.
    client = new_core(bstar=BinaryStar(True, 0.0))
    client.on_peer_state(state(State.BACKUP), 0.0)
    run(client, 0.0)
    answer, outcome = client.on_request(0.6, subtree=HISTORY)
    assert answer and outcome is not None and outcome.accepted
    assert client.fresh


def test_the_passive_never_adopts_a_map_founded_over_the_one_it_holds() -> None:
    """The primary restarted empty and, cut off from the backup, got a
    client's vote: it serves a fresh map.  The backup, which holds the old
    one, would throw it away by syncing: instead it takes over, so dual
    actives follow, which the held map wins."""
    backup = passive_core(5, (kvpub(b"/kept", 5, b"k", U1),))
    restarted = ServerCore(bstar=BinaryStar(True, 9.0), new_lineage=lambda: "c" * 32)
    assert restarted.on_vote(12.0) is not None and restarted.role is Role.ACTIVE
    run(restarted, 12.0)
    backup.on_peer_hugz(restarted.hugz(), 12.5)
    backup.on_update(restarted.hugz(), 12.5)  # a new lineage: a reset
    assert actions(backup) == [Request(b"")]
    backup.on_reply(restarted.kthxbai(b""), 12.6)
    assert backup.role is Role.ACTIVE
    assert backup.bstar is not None
    assert backup.bstar.faults["the peer serves a map it founded after ours"] == 1
    assert any("founded empty after ours" in text for _, text in backup.notices)
    run(backup, 12.6)
    assert backup.store.get(b"/kept").body == b"k" and backup.lineage == ACTIVES
    heartbeat(restarted, backup, 13.0)  # the link heals
    exchange_hugz(restarted, backup, 13.0)
    heartbeat(restarted, backup, 14.0)
    assert (restarted.role, backup.role) == (Role.PASSIVE, Role.ACTIVE)


def test_sibling_subtrees_asked_together_share_one_bounded_scan() -> None:
    store = Store()
    for n in range(3000):
        key = b"/svc/%d/%04d" % (n % 3, n)
        store.put(key, n + 1, _uuid(n), b"", b"v", None, 0.0)
    store.sequence = 3000
    index = KeyIndex(store.keys(b""))
    sources = [index.source(b"/svc/%d/" % n) for n in range(3)]
    assert len({id(scan) for _, scan in sources}) == 1  # one pass for all
    again = index.source(b"/svc/1/")  # the same subtree: the same keys
    assert again[0] is sources[1][0]
    transfers = [
        Transfer(b"id%d" % n, store, keys, END, 0.0, None, scan)
        for n, (keys, scan) in enumerate(sources)
    ]
    sent: list[list[bytes]] = [[], [], []]
    for _ in range(100_000):
        if all(t.done for t in transfers):
            break
        for n, transfer in enumerate(transfers):
            before = transfer.examined
            frames = transfer.peek(1.0)
            assert transfer.examined - before <= SKIP  # bounded per peek
            if frames is not None:
                sent[n].append(frames[1])
                transfer.advance(1.0)
    else:
        raise AssertionError("the transfers never ended")
    for n in range(3):
        assert sent[n][:-1] == [b"/svc/%d/%04d" % (n, k) for k in range(n, 3000, 3)]
        assert sent[n][-1] == KTHXBAI
    # a sibling asked once the scan began gets a scan of its own
    late_keys, late_scan = index.source(b"/svc/9/")
    assert late_scan is not sources[0][1] and late_keys == []
    assert index.source(b"")[1] is None  # the whole map: no scan needed

"""Synchronous tests for the sans-IO server core (trioclone.core.server) and
the snapshot transfer (trioclone.core.snapshot).

Everything goes through public methods; time is always a literal ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from trioclone.core.chp import (
    HUGZ,
    KTHXBAI,
    SEQUENCE,
    KVMsg,
    decode_kvmsg,
    encode_kvmsg,
    hugz,
    kthxbai,
)
from trioclone.core.server import ServerCore
from trioclone.core.snapshot import Transfer
from trioclone.core.store import Store
from trioclone.errors import RemoteProtocolError


def _uuid(n: int) -> bytes:
    return n.to_bytes(16, "big")


U1, U2, U3, U4 = (_uuid(n) for n in range(1, 5))


def kvset(
    key: bytes,
    body: bytes = b"v",
    uuid: bytes = U1,
    props: Mapping[str, str] | None = None,
    sequence: int = 0,
) -> list[bytes]:
    """A client's KVSET."""
    return encode_kvmsg(KVMsg(key, sequence, uuid, props or {}, body))


def kvpub(
    key: bytes,
    sequence: int,
    body: bytes = b"v",
    uuid: bytes = U1,
    props: Mapping[str, str] | None = None,
) -> list[bytes]:
    """An update on the active's stream (also the shape of a KVSYNC)."""
    return encode_kvmsg(KVMsg(key, sequence, uuid, props or {}, body))


def seq(frames: list[bytes]) -> int:
    return int(SEQUENCE.unpack(frames[1])[0])


def active_core(now: float = 0.0) -> ServerCore:
    core = ServerCore()
    assert core.become_active(now) == []
    assert core.active
    return core


def passive_core(
    sequence: int = 0, snapshot: tuple[list[bytes], ...] = (), now: float = 0.0
) -> ServerCore:
    """A passive core synced from a snapshot ending with KTHXBAI ``sequence``."""
    core = ServerCore()
    core.begin_sync()
    for frames in snapshot:
        assert core.load(frames, now) is False
    assert core.load(kthxbai(sequence, b""), now) is True
    assert core.synced
    assert not core.active
    return core


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
    ("ttl", "deadline"), [("5", 15.0), ("2.5", 12.5), ("0", None), (None, None)]
)
def test_collect_ttl_becomes_a_deadline(
    ttl: str | None, deadline: float | None
) -> None:
    core = active_core()
    props = {"ttl": ttl} if ttl is not None else {}
    sent = kvset(b"/a", props=props)
    pub = core.collect(sent, 10.0)
    assert pub is not None
    assert pub[3] == sent[3]  # the relative ttl goes out as received
    assert core.store.deadline(b"/a") == deadline


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


def test_many_keys_written_once_cost_no_window_space() -> None:
    core = active_core()
    for i in range(1000):
        core.collect(kvset(b"/k/%d" % i, b"v", bytes([i % 256, i // 256]) * 8), 0.0)
    assert len(core.applied) == 0  # each UUID is held by its key's record


def test_collect_empty_uuid_is_never_a_duplicate() -> None:
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
        core.active,
        core.synced,
    )


@pytest.mark.parametrize("active", [True, False], ids=["active", "passive"])
@pytest.mark.parametrize("key", [HUGZ, KTHXBAI])
def test_collect_reserved_keys_are_rejected(active: bool, key: bytes) -> None:
    core = active_core() if active else passive_core(3, (kvpub(b"/a", 3),))
    before = _state(core)
    with pytest.raises(RemoteProtocolError):
        core.collect(kvset(key, b"x", U2), 1.0)
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
    assert core.mirror(kvpub(b"/a", 1, props={"ttl": "5"}), 10.0) is False
    assert core.store.deadline(b"/a") == 15.0
    assert core.expire(15.0) == []
    assert core.expire(1000.0) == []
    assert b"/a" in core.store
    assert core.store.sequence == 1
    assert core.stats["expired"] == 0
    # The mirrored stream keeps going in order: no sequence was skipped.
    assert core.mirror(kvpub(b"/b", 2, uuid=U2), 16.0) is False
    assert core.become_active(takeover) == []
    if early is not None:
        assert core.expire(early) == []
    assert core.expire(deadline) == [[b"/a", SEQUENCE.pack(3), b"", b"", b""]]
    assert b"/a" not in core.store


def test_passive_keeps_deadlines_from_the_snapshot() -> None:
    core = passive_core(4, (kvpub(b"/a", 4, props={"ttl": "5"}),), now=10.0)
    assert core.store.deadline(b"/a") == 15.0
    assert core.expire(30.0) == []
    core.become_active(12.0)
    assert core.expire(14.999) == []
    assert core.expire(15.0) == [[b"/a", SEQUENCE.pack(5), b"", b"", b""]]


# --------------------------------------------------------------------------
# Passive: the pending list and takeover
# --------------------------------------------------------------------------


def test_passive_collect_holds_and_publishes_nothing() -> None:
    core = passive_core(5, (kvpub(b"/x", 5, uuid=U4),))
    assert core.collect(kvset(b"/a", uuid=U1), 1.0) is None
    assert len(core.pending) == 1
    assert core.store.sequence == 5
    assert core.store.keys() == [b"/x"]


def test_mirror_of_the_actives_copy_clears_pending() -> None:
    core = passive_core(5)
    core.collect(kvset(b"/a", b"mine", U1), 1.0)
    core.collect(kvset(b"/b", b"other", U2), 1.0)
    assert core.mirror(kvpub(b"/a", 6, b"mine", U1), 1.1) is False
    assert len(core.pending) == 1
    assert core.store.get(b"/a") == KVMsg(b"/a", 6, U1, {}, b"mine")
    published = core.become_active(2.0)
    assert [frames[0] for frames in published] == [b"/b"]


def test_actives_copy_first_makes_the_clients_copy_a_duplicate() -> None:
    core = passive_core(5)
    assert core.mirror(kvpub(b"/a", 6, b"v", U1), 1.0) is False
    assert core.collect(kvset(b"/a", b"v", U1), 1.1) is None
    assert len(core.pending) == 0
    assert core.stats["duplicates"] == 1
    assert core.become_active(2.0) == []
    assert core.store.sequence == 6


def test_become_active_publishes_pending_in_order_with_fresh_sequences() -> None:
    # Defect 5 of the reference: it applied the pending list but did not
    # publish it.
    core = passive_core(10, (kvpub(b"/old", 10, uuid=U4),))
    sets = [
        kvset(b"/a", b"1", U1, {"ttl": "7"}),
        kvset(b"/b", b"2", U2),
        kvset(b"/c", b"3", U3),
    ]
    for frames in sets:
        core.collect(frames, 1.0)
    core.mirror(kvpub(b"/b", 11, b"2", U2), 1.5)  # the active had /b
    published = core.become_active(3.0)
    assert published == [
        [b"/a", SEQUENCE.pack(12), U1, sets[0][3], b"1"],
        [b"/c", SEQUENCE.pack(13), U3, b"", b"3"],
    ]
    assert core.active
    assert len(core.pending) == 0
    assert core.store.sequence == 13
    assert core.store.get(b"/a") == KVMsg(b"/a", 12, U1, {"ttl": "7"}, b"1")
    assert core.store.deadline(b"/a") == 10.0  # ttl counts from takeover
    assert core.store.get(b"/b") == KVMsg(b"/b", 11, U2, {}, b"2")
    assert core.stats["takeover_applied"] == 2


def test_pending_is_applied_once() -> None:
    core = passive_core(0)
    core.collect(kvset(b"/a", b"1", U1), 1.0)
    assert len(core.become_active(2.0)) == 1
    # A client resending after the failover is a duplicate, not a new update.
    assert core.collect(kvset(b"/a", b"1", U1), 3.0) is None
    assert core.stats["duplicates"] == 1
    assert core.store.sequence == 1
    assert core.become_active(4.0) == []  # already active: nothing again
    assert core.store.sequence == 1


def test_pending_anonymous_updates_are_applied_at_takeover() -> None:
    core = passive_core(0)
    core.collect(kvset(b"/a", b"1", b""), 1.0)  # no UUID: cannot be matched
    core.collect(kvset(b"/b", b"2", b""), 1.0)
    core.mirror(kvpub(b"/a", 1, b"1", b""), 1.1)  # /a written after it arrived
    published = core.become_active(2.0)
    # /a: superseded by a later write of the active (here, itself): not twice.
    assert published == [[b"/b", SEQUENCE.pack(2), b"", b"", b"2"]]
    assert core.stats["pending_superseded"] == 1


def test_takeover_never_replays_a_pending_write_a_later_one_overwrote() -> None:
    core = passive_core(0)
    old, new = kvset(b"/k", b"old", U1), kvset(b"/k", b"new", U2)
    core.collect(old, 1.0)  # its copy from the active was missed
    core.collect(new, 1.1)
    core.mirror(kvpub(b"/k", 1, b"new", U2), 1.2)  # only the newer one seen
    assert len(core.pending) == 1
    assert core.become_active(2.0) == []
    assert core.store.get(b"/k").body == b"new"


@pytest.mark.parametrize(("takeover", "applied"), [(39.999, 1), (40.0, 0)])
def test_become_active_drops_pending_older_than_max_age(
    takeover: float, applied: int
) -> None:
    core = ServerCore(pending_age=30.0)
    core.begin_sync()
    core.load(kthxbai(0, b""), 0.0)
    core.collect(kvset(b"/a"), 10.0)
    assert len(core.become_active(takeover)) == applied
    assert core.pending.dropped == 1 - applied
    assert (b"/a" in core.store) is bool(applied)


def test_pending_is_bounded_by_size() -> None:
    core = ServerCore(pending_size=2)
    core.begin_sync()
    core.load(kthxbai(0, b""), 0.0)
    for n, key in enumerate((b"/a", b"/b", b"/c"), 1):
        core.collect(kvset(key, uuid=_uuid(n)), 1.0)
    assert len(core.pending) == 2
    assert core.pending.dropped == 1
    assert [frames[0] for frames in core.become_active(2.0)] == [b"/b", b"/c"]


# --------------------------------------------------------------------------
# Passive: snapshot sync and the mirrored stream
# --------------------------------------------------------------------------


def test_become_passive_then_snapshot_replaces_the_store() -> None:
    core = active_core()
    core.collect(kvset(b"/mine", uuid=U1), 0.0)
    core.collect(kvset(b"/also-mine", uuid=U2), 0.0)
    core.become_passive()
    assert not core.active
    assert not core.synced
    # Until the snapshot is complete the last good copy stays.
    assert core.load(kvpub(b"/x", 7, b"x", U3, {"ttl": "4"}), 5.0) is False
    assert core.store.keys() == [b"/mine", b"/also-mine"]
    assert core.load(kvpub(b"/y", 9, b"y", U4), 5.0) is False
    assert core.load(kthxbai(20, b""), 5.0) is True
    assert core.synced
    assert core.store.keys() == [b"/x", b"/y"]
    assert core.store.sequence == 20
    assert core.store.get(b"/x") == KVMsg(b"/x", 7, U3, {"ttl": "4"}, b"x")
    assert core.store.deadline(b"/x") == 9.0
    assert core.stats["syncs"] == 1
    # Collected updates now wait for the active.
    assert core.collect(kvset(b"/z", uuid=_uuid(9)), 6.0) is None
    assert core.expire(100.0) == []


def test_snapshot_from_store_frames() -> None:
    source = Store()
    source.put(b"/a", 3, U1, b"owner=x\n", b"A", None, 0.0)
    source.put(b"/b", 5, U2, b"", b"B", 10.0, 0.0)
    source.sequence = 5
    core = passive_core(source.sequence, tuple(source.snapshot(b"", 4.0)), now=4.0)
    assert core.store.get(b"/a") == source.get(b"/a")
    assert core.store.get(b"/b", 4.0) == source.get(b"/b", 4.0)
    assert core.store.deadline(b"/b") == 10.0
    assert core.store.sequence == 5


def test_snapshot_uuids_match_pending() -> None:
    core = passive_core(0)
    core.collect(kvset(b"/a", uuid=U1), 0.0)
    core.begin_sync()
    core.load(kvpub(b"/a", 1, uuid=U1), 0.5)
    assert len(core.pending) == 1  # only a complete snapshot matches
    core.load(kthxbai(1, b""), 0.5)
    assert len(core.pending) == 0
    assert core.collect(kvset(b"/a", uuid=U1), 0.6) is None  # resend: duplicate


def test_backlog_newer_than_the_snapshot_is_applied_after_it() -> None:
    core = passive_core(0)
    core.begin_sync()
    # The active's stream, heard while the snapshot is on its way.
    stream = [
        kvpub(b"/s19", 19, b"19", _uuid(19)),
        kvpub(b"/s20", 20, b"20", _uuid(20)),
        kvpub(b"/s21", 21, b"21", _uuid(21)),
        kvpub(b"/snap", 22, b"new", _uuid(22)),
        kvpub(b"/gone", 23, b"", _uuid(23)),
    ]
    for frames in stream:
        assert core.mirror(frames, 1.0) is False
    assert core.store.sequence == 0  # nothing applied yet
    assert core.load(kvpub(b"/snap", 5, b"old", _uuid(5)), 1.0) is False
    assert core.load(kvpub(b"/gone", 6, b"here", _uuid(6)), 1.0) is False
    assert core.load(kthxbai(20, b""), 1.0) is True
    assert core.resync_wanted is False
    assert core.store.keys() == [b"/snap", b"/s21"]
    assert core.store.get(b"/snap") == KVMsg(b"/snap", 22, _uuid(22), {}, b"new")
    assert core.store.sequence == 23
    # The stream goes on where the backlog ended.
    assert core.mirror(kvpub(b"/next", 24, uuid=_uuid(24)), 2.0) is False
    assert core.store.sequence == 24


def test_failed_sync_leaves_the_previous_store() -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U1),))
    good = core.store
    core.begin_sync()
    core.mirror(kvpub(b"/b", 9, b"B", U2), 1.0)  # backlog of the failed try
    core.load(kvpub(b"/partial", 8, b"P", U3), 1.0)
    assert core.store is good
    # The active died mid-snapshot; the next try starts afresh.
    core.begin_sync()
    assert core.store is good
    assert core.store.keys() == [b"/a"]
    assert core.store.sequence == 5
    assert core.load(kvpub(b"/c", 10, b"C", U4), 2.0) is False
    assert core.load(kthxbai(10, b""), 2.0) is True
    assert core.store.keys() == [b"/c"]  # nothing of the first try leaks
    assert core.store.sequence == 10


def test_become_active_mid_sync_keeps_the_last_good_copy_and_backlog() -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U1),))
    core.begin_sync()
    core.mirror(kvpub(b"/old", 4, b"stale", U2), 1.0)
    core.mirror(kvpub(b"/b", 6, b"B", U3), 1.0)
    core.load(kvpub(b"/partial", 6, b"P", U4), 1.0)
    core.collect(kvset(b"/c", b"C", _uuid(9)), 1.0)
    published = core.become_active(3.0)
    assert published == [[b"/c", SEQUENCE.pack(7), _uuid(9), b"", b"C"]]
    assert core.store.keys() == [b"/a", b"/b", b"/c"]
    assert core.synced


def test_mirror_in_order_applies() -> None:
    core = passive_core(5)
    assert core.mirror(kvpub(b"/a", 6, b"A", U1), 1.0) is False
    assert core.mirror(kvpub(b"/a", 7, b"", U2), 1.0) is False  # delete
    assert core.mirror(kvpub(b"/b", 8, b"B", U3), 1.0) is False
    assert core.store.keys() == [b"/b"]
    assert core.store.sequence == 8
    assert core.stats["gaps"] == 0


def test_mirror_gap_asks_for_resync() -> None:
    core = passive_core(5)
    assert core.mirror(kvpub(b"/a", 7, b"A", U1), 1.0) is True
    assert core.stats["gaps"] == 1


def test_mirror_of_an_old_sequence_is_ignored() -> None:
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U1),))
    assert core.mirror(kvpub(b"/a", 5, b"again", U2), 1.0) is False
    assert core.mirror(kvpub(b"/a", 3, b"older", U3), 1.0) is False
    assert core.store.get(b"/a") == KVMsg(b"/a", 5, U1, {}, b"A")
    assert core.store.sequence == 5


@pytest.mark.parametrize(("sequence", "resync"), [(4, False), (5, False), (6, True)])
def test_hugz_with_a_newer_sequence_asks_for_resync(
    sequence: int, resync: bool
) -> None:
    core = passive_core(5)
    assert core.mirror(hugz(sequence), 1.0) is resync
    assert core.store.sequence == 5


def test_hugz_before_the_snapshot_is_ignored() -> None:
    core = ServerCore()
    core.begin_sync()
    assert core.mirror(hugz(100), 1.0) is False


def test_mirror_while_active_is_ignored() -> None:
    core = active_core()
    core.collect(kvset(b"/a", b"A", U1), 0.0)
    before = _state(core)
    assert core.mirror(kvpub(b"/a", 2, b"theirs", U2), 1.0) is False
    assert core.mirror(kvpub(b"/b", 9, b"B", U3), 1.0) is False
    assert core.mirror(hugz(50), 1.0) is False
    assert _state(core) == before
    assert core.store.get(b"/a") == KVMsg(b"/a", 1, U1, {}, b"A")
    assert core.collect(kvset(b"/b", b"B", U3), 2.0) is not None  # not "seen"


def test_load_outside_a_sync_is_ignored() -> None:
    core = passive_core(5, (kvpub(b"/a", 5),))
    before = _state(core)
    assert core.load(kvpub(b"/b", 9, uuid=U2), 1.0) is False
    assert core.load(kthxbai(9, b""), 1.0) is False
    assert _state(core) == before
    active = active_core()
    active.begin_sync()  # ignored while active
    assert active.load(kvpub(b"/b", 9, uuid=U2), 1.0) is False
    assert active.load(kthxbai(9, b""), 1.0) is False
    assert len(active.store) == 0


def test_hugz_inside_a_snapshot_is_rejected() -> None:
    core = ServerCore()
    core.begin_sync()
    with pytest.raises(RemoteProtocolError):
        core.load(hugz(3), 1.0)
    assert not core.synced


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_stream_or_snapshot_message_is_rejected(
    frames: list[bytes],
) -> None:
    core = passive_core(5, (kvpub(b"/a", 5),))
    before = _state(core)
    with pytest.raises(RemoteProtocolError):
        core.mirror(frames, 1.0)
    assert _state(core) == before
    core.begin_sync()
    with pytest.raises(RemoteProtocolError):
        core.load(frames, 1.0)


def test_hugz_and_kthxbai_helpers_carry_the_sequence() -> None:
    core = active_core()
    core.collect(kvset(b"/a"), 0.0)
    assert core.hugz() == hugz(1)
    assert core.kthxbai(b"/a/") == kthxbai(1, b"/a/")


@pytest.mark.parametrize(
    "backlog", [(7,), (6, 8)], ids=["after-snapshot", "inside-backlog"]
)
def test_gap_in_the_backlog_asks_for_resync(backlog: tuple[int, ...]) -> None:
    # A message lost between KTHXBAI and the backlog, or inside the backlog,
    # must not be skipped silently: the shell is told to sync again.
    core = passive_core(0)
    core.begin_sync()
    for sequence in backlog:
        core.mirror(kvpub(b"/k%d" % sequence, sequence, uuid=_uuid(sequence)), 1.0)
    assert core.load(kthxbai(5, b""), 1.0) is True
    assert core.resync_wanted is True
    assert core.stats["gaps"] == 1
    core.begin_sync()
    assert core.resync_wanted is False


def test_takeover_after_a_partial_snapshot_keeps_pending_updates() -> None:
    # UUIDs of a snapshot match pending updates only once it is complete: the
    # last good store lacks them if the active dies mid-snapshot.
    core = passive_core(5, (kvpub(b"/a", 5, b"A", U4),))
    core.collect(kvset(b"/x", b"X", U1), 1.0)  # the active applied it as 6
    # The passive missed KVPUB 6, saw 7, and resyncs.
    assert core.mirror(kvpub(b"/y", 7, b"Y", U2), 1.0) is True
    core.begin_sync()
    core.load(kvpub(b"/x", 6, b"X", U1), 1.5)
    assert len(core.pending) == 1
    # The active dies before KTHXBAI; the passive takes over.
    published = core.become_active(5.0)
    assert published == [[b"/x", SEQUENCE.pack(8), U1, b"", b"X"]]
    assert core.store.get(b"/x") == KVMsg(b"/x", 8, U1, {}, b"X")
    assert core.collect(kvset(b"/x", b"X", U1), 6.0) is None  # resend: duplicate


# --------------------------------------------------------------------------
# Snapshot transfer
# --------------------------------------------------------------------------


def _store() -> Store:
    store = Store()
    store.put(b"/a/1", 1, U1, b"owner=x\n", b"one", None, 0.0)
    store.put(b"/b/2", 2, U2, b"", b"two", None, 0.0)
    store.put(b"/a/3", 3, U3, b"", b"three", None, 0.0)
    store.sequence = 3
    return store


def _drain(transfer: Transfer, now: float) -> list[list[bytes]]:
    sent = []
    while (frames := transfer.peek(now)) is not None:
        sent.append(frames)
        transfer.advance()
    return sent


def test_transfer_sends_kvsyncs_then_kthxbai() -> None:
    transfer = Transfer(b"\x00id", _store(), b"")
    assert not transfer.done
    sent = _drain(transfer, 1.0)
    assert sent == [
        [b"\x00id", b"/a/1", SEQUENCE.pack(1), U1, b"owner=x\n", b"one"],
        [b"\x00id", b"/b/2", SEQUENCE.pack(2), U2, b"", b"two"],
        [b"\x00id", b"/a/3", SEQUENCE.pack(3), U3, b"", b"three"],
        [b"\x00id", *kthxbai(3, b"")],
    ]
    assert all(decode_kvmsg(frames[1:]) for frames in sent)
    assert transfer.done
    assert transfer.sent == 4
    assert transfer.peek(2.0) is None


def test_transfer_subtree() -> None:
    transfer = Transfer(b"id", _store(), b"/a/")
    sent = _drain(transfer, 1.0)
    assert [frames[1] for frames in sent] == [b"/a/1", b"/a/3", KTHXBAI]
    assert sent[-1] == [b"id", KTHXBAI, SEQUENCE.pack(3), b"", b"", b"/a/"]


def test_transfer_of_an_empty_store() -> None:
    transfer = Transfer(b"id", Store(), b"/a/")
    assert _drain(transfer, 0.0) == [[b"id", *kthxbai(0, b"/a/")]]


def test_transfer_kthxbai_has_the_sequence_at_creation() -> None:
    store = _store()
    transfer = Transfer(b"id", store, b"")
    store.put(b"/new", store.next_sequence(), U4, b"", b"new", None, 0.0)
    sent = _drain(transfer, 1.0)
    assert sent[-1] == [b"id", *kthxbai(3, b"")]
    assert b"/new" not in [frames[1] for frames in sent]  # not in the key list


def test_transfer_skips_deleted_and_sends_changed_values() -> None:
    store = _store()
    transfer = Transfer(b"id", store, b"")
    store.remove(b"/b/2")
    store.put(b"/a/3", store.next_sequence(), U4, b"", b"newer", None, 0.0)
    sent = _drain(transfer, 1.0)
    assert sent == [
        [b"id", b"/a/1", SEQUENCE.pack(1), U1, b"owner=x\n", b"one"],
        [b"id", b"/a/3", SEQUENCE.pack(4), U4, b"", b"newer"],
        [b"id", *kthxbai(3, b"")],
    ]


def test_transfer_peek_without_advance_repeats() -> None:
    store = _store()
    transfer = Transfer(b"id", store, b"")
    first = transfer.peek(1.0)
    assert first is not None
    assert first[1] == b"/a/1"
    store.remove(b"/a/1")  # already taken: the retry sends the same message
    assert transfer.peek(2.0) == first
    assert transfer.peek(3.0) == first
    assert transfer.sent == 0
    transfer.advance()
    second = transfer.peek(3.0)
    assert second is not None
    assert second[1] == b"/b/2"
    assert transfer.sent == 1
    transfer.advance()
    third = transfer.peek(3.0)
    assert third is not None
    assert third[1] == b"/a/3"
    transfer.advance()
    # KTHXBAI repeats too until it is sent.
    last = transfer.peek(4.0)
    assert last == [b"id", *kthxbai(3, b"")]
    assert transfer.peek(4.0) == last
    assert not transfer.done
    transfer.advance()
    assert transfer.done
    assert transfer.peek(5.0) is None


def test_transfer_sends_remaining_ttl() -> None:
    store = Store()
    store.put(b"/t", 1, U1, b"ttl=10\nowner=x\n", b"v", 10.0, 0.0)
    store.sequence = 1
    sent = _drain(Transfer(b"id", store, b""), 4.0)
    msg = decode_kvmsg(sent[0][1:])
    assert msg.ttl == 6.0
    assert msg.properties["owner"] == "x"


def test_transfer_with_an_explicit_key_list() -> None:
    store = _store()
    transfer = Transfer(b"id", store, b"", keys=[b"/b/2", b"/missing"])
    sent = _drain(transfer, 1.0)
    assert [frames[1] for frames in sent] == [b"/b/2", KTHXBAI]

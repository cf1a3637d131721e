"""Synchronous tests for the server's map (trioclone.core.store.Store).

Time is always a literal ``now``: no clocks, no sleeps.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from trioclone.core.chp import (
    KTHXBAI,
    SEQUENCE,
    KVMsg,
    decode_kvmsg,
    encode_properties,
)
from trioclone.core.snapshot import Transfer
from trioclone.core.store import Store

UUID = bytes(range(16))
UUID2 = bytes(range(16, 32))


def _expire(store: Store, now: float, limit: int | None = None) -> list[bytes]:
    """The keys expired at ``now`` (the server also takes their UUIDs)."""
    return [key for key, *_ in store.expire_with_uuids(now, limit)]


def _snapshot(store: Store, subtree: bytes, now: float) -> Iterator[list[bytes]]:
    """The KVSYNCs of a snapshot, as a ``Transfer`` sends them; the key list
    is taken when iteration starts."""
    transfer = Transfer(b"", store, store.keys(subtree), [KTHXBAI], now)
    while (frames := transfer.peek(now)) != [b"", KTHXBAI]:
        assert frames is not None  # (a few deleted keys only: no pause)
        transfer.advance(now)
        yield frames[1:]


def _put(
    store: Store,
    key: bytes,
    body: bytes = b"v",
    *,
    sequence: int = 1,
    uuid: bytes = UUID,
    properties: bytes = b"",
    ttl: float | None = None,
    now: float = 0.0,
) -> None:
    store.put(key, sequence, uuid, properties, body, ttl, now)


# --------------------------------------------------------------------------
# Basic map operations
# --------------------------------------------------------------------------


def test_empty_store() -> None:
    store = Store()
    assert len(store) == 0
    assert b"k" not in store
    assert store.get(b"k") is None
    assert store.get(b"k", 1.0) is None
    assert store.frames(b"k", 1.0) is None
    assert store.sequence == 0
    assert store.next_deadline() is None
    assert _expire(store, 1e12) == []
    assert store.keys() == []
    assert list(_snapshot(store, b"", 0.0)) == []


def test_put_get() -> None:
    store = Store()
    store.put(b"/a/1", 7, UUID, b"owner=x\n", b"hello", None, 0.0)
    assert len(store) == 1
    assert b"/a/1" in store
    assert b"/a/2" not in store
    assert store.get(b"/a/1") == KVMsg(b"/a/1", 7, UUID, {"owner": "x"}, b"hello")


def test_put_empty_uuid_and_properties() -> None:
    store = Store()
    store.put(b"k", 3, b"", b"", b"body", None, 0.0)
    msg = store.get(b"k")
    assert msg is not None
    assert msg.uuid == b""
    assert dict(msg.properties) == {}
    assert msg.body == b"body"
    assert msg.sequence == 3


def test_put_overwrites() -> None:
    store = Store()
    _put(store, b"k", b"one", sequence=1, uuid=UUID)
    _put(store, b"k", b"two", sequence=2, uuid=UUID2)
    assert len(store) == 1
    assert store.get(b"k") == KVMsg(b"k", 2, UUID2, {}, b"two")


def test_binary_values_survive_packing() -> None:
    store = Store()
    body = bytes(range(256)) * 3
    store.put(b"\x00key\xff", -5, UUID, b"a=b=c\n", body, None, 0.0)
    msg = store.get(b"\x00key\xff")
    assert msg == KVMsg(b"\x00key\xff", -5, UUID, {"a": "b=c"}, body)


def test_remove() -> None:
    store = Store()
    _put(store, b"a")
    _put(store, b"b")
    assert store.remove(b"a") is True
    assert store.remove(b"a") is False
    assert store.remove(b"missing") is False
    assert b"a" not in store
    assert b"b" in store
    assert len(store) == 1
    assert store.get(b"a") is None


def test_empty_body_deletes() -> None:
    store = Store()
    _put(store, b"k", b"v")
    _put(store, b"k", b"")
    assert b"k" not in store
    assert len(store) == 0
    assert store.get(b"k") is None


def test_empty_body_on_missing_key_is_harmless() -> None:
    store = Store()
    _put(store, b"k", b"")
    assert len(store) == 0
    assert b"k" not in store


def test_next_sequence() -> None:
    store = Store()
    assert store.next_sequence() == 1
    assert store.next_sequence() == 2
    assert store.sequence == 2
    store.sequence = 41
    assert store.next_sequence() == 42
    assert store.sequence == 42


def test_put_does_not_touch_sequence() -> None:
    store = Store()
    _put(store, b"k", sequence=99)
    assert store.sequence == 0


def test_clear() -> None:
    store = Store()
    for i in range(5):
        _put(store, b"k%d" % i, sequence=store.next_sequence(), ttl=10.0, now=0.0)
    _put(store, b"plain", sequence=store.next_sequence())
    store.clear()
    assert len(store) == 0
    assert store.sequence == 0
    assert store.keys() == []
    assert store.next_deadline() is None
    assert _expire(store, 1e9) == []
    assert store._heap == []
    assert store.next_sequence() == 1
    # Still usable after clearing.
    _put(store, b"k0", ttl=1.0, now=0.0)
    assert _expire(store, 1.0) == [b"k0"]


# --------------------------------------------------------------------------
# TTL
# --------------------------------------------------------------------------


def test_ttl_exact_boundary() -> None:
    store = Store()
    _put(store, b"k", ttl=5.0, now=10.0)
    assert store.deadline(b"k") == 15.0
    assert store.next_deadline() == 15.0
    assert _expire(store, 14.999999) == []
    assert b"k" in store
    assert _expire(store, 15.0) == [b"k"]
    assert b"k" not in store
    assert store.deadline(b"k") is None
    assert store.next_deadline() is None
    assert _expire(store, 100.0) == []


def test_expire_only_once() -> None:
    store = Store()
    _put(store, b"k", ttl=1.0, now=0.0)
    assert _expire(store, 5.0) == [b"k"]
    assert _expire(store, 5.0) == []


def test_expire_oldest_deadline_first() -> None:
    store = Store()
    # Insertion order and key order both differ from deadline order.
    _put(store, b"a", ttl=30.0, now=0.0)
    _put(store, b"b", ttl=10.0, now=0.0)
    _put(store, b"c", ttl=20.0, now=0.0)
    _put(store, b"d", ttl=5.0, now=3.0)  # deadline 8
    _put(store, b"plain")
    assert _expire(store, 25.0) == [b"d", b"b", b"c"]
    assert set(store.keys()) == {b"a", b"plain"}
    assert store.next_deadline() == 30.0


def test_ttl_zero_or_none_means_no_expiry() -> None:
    store = Store()
    _put(store, b"zero", ttl=0.0, now=0.0)
    _put(store, b"none", ttl=None, now=0.0)
    assert store.next_deadline() is None
    assert store.deadline(b"zero") is None
    assert _expire(store, 1e12) == []
    assert len(store) == 2


def test_next_deadline_is_earliest() -> None:
    store = Store()
    assert store.next_deadline() is None
    _put(store, b"plain")
    assert store.next_deadline() is None
    _put(store, b"late", ttl=100.0, now=0.0)
    assert store.next_deadline() == 100.0
    _put(store, b"early", ttl=5.0, now=1.0)
    assert store.next_deadline() == 6.0
    assert _expire(store, 6.0) == [b"early"]
    assert store.next_deadline() == 100.0


def test_overwrite_without_ttl_cancels_expiry() -> None:
    store = Store()
    _put(store, b"k", b"old", ttl=5.0, now=10.0)
    _put(store, b"k", b"new", ttl=None, now=11.0)
    assert store.deadline(b"k") is None
    assert store.next_deadline() is None
    assert _expire(store, 1e9) == []
    msg = store.get(b"k", 1e9)
    assert msg is not None
    assert msg.body == b"new"
    assert msg.ttl is None


def test_overwrite_with_ttl_zero_cancels_expiry() -> None:
    store = Store()
    _put(store, b"k", ttl=5.0, now=10.0)
    _put(store, b"k", ttl=0.0, now=11.0)
    assert store.deadline(b"k") is None
    assert _expire(store, 1e9) == []
    assert b"k" in store


def test_overwrite_with_new_ttl_moves_deadline_later() -> None:
    store = Store()
    _put(store, b"k", b"old", ttl=5.0, now=10.0)  # deadline 15
    _put(store, b"k", b"new", ttl=10.0, now=12.0)  # deadline 22
    assert store.deadline(b"k") == 22.0
    assert store.next_deadline() == 22.0
    assert _expire(store, 15.0) == []
    assert _expire(store, 21.999) == []
    assert b"k" in store
    assert _expire(store, 22.0) == [b"k"]
    assert b"k" not in store


def test_old_deadline_does_not_expire_moved_key() -> None:
    # No next_deadline() call here: the stale heap entry is still in place.
    store = Store()
    _put(store, b"k", b"old", ttl=5.0, now=10.0)  # deadline 15
    _put(store, b"other", ttl=1.0, now=10.0)  # deadline 11
    _put(store, b"k", b"new", ttl=10.0, now=12.0)  # deadline 22
    assert _expire(store, 15.0) == [b"other"]
    assert b"k" in store
    assert store.deadline(b"k") == 22.0
    assert _expire(store, 22.0) == [b"k"]


def test_overwrite_with_new_ttl_moves_deadline_earlier() -> None:
    store = Store()
    _put(store, b"k", ttl=100.0, now=0.0)
    _put(store, b"k", ttl=1.0, now=2.0)  # deadline 3
    assert store.next_deadline() == 3.0
    assert _expire(store, 3.0) == [b"k"]
    # The stale deadline at 100 must not resurrect or re-expire anything.
    _put(store, b"k", b"again", ttl=None, now=4.0)
    assert _expire(store, 100.0) == []
    assert b"k" in store


def test_delete_cancels_expiry() -> None:
    store = Store()
    _put(store, b"k", ttl=5.0, now=10.0)
    assert store.remove(b"k") is True
    assert store.deadline(b"k") is None
    assert store.next_deadline() is None
    assert _expire(store, 15.0) == []


def test_empty_body_cancels_expiry() -> None:
    store = Store()
    _put(store, b"k", ttl=5.0, now=10.0)
    _put(store, b"k", b"", ttl=5.0, now=11.0)
    assert b"k" not in store
    assert store.deadline(b"k") is None
    assert store.next_deadline() is None
    assert _expire(store, 100.0) == []


def test_deleted_then_rewritten_without_ttl_is_not_expired() -> None:
    store = Store()
    _put(store, b"k", ttl=5.0, now=10.0)
    store.remove(b"k")
    _put(store, b"k", b"fresh", now=12.0)
    assert _expire(store, 15.0) == []
    assert b"k" in store


def test_rewritten_with_same_deadline_expires_once() -> None:
    store = Store()
    _put(store, b"k", ttl=5.0, now=10.0)
    _put(store, b"k", ttl=3.0, now=12.0)  # deadline 15 again
    assert _expire(store, 15.0) == [b"k"]
    assert _expire(store, 15.0) == []


def test_heap_bounded_under_ttl_rewrites() -> None:
    store = Store()
    keys = [b"k%d" % i for i in range(10)]
    now = 0.0
    for i in range(10_000):
        now = float(i)
        _put(store, keys[i % 10], ttl=60.0, now=now)
        live = len(store._deadlines)
        assert len(store._heap) <= 2 * live + 64 + 1
    assert len(store) == 10
    # Deadlines are the last write of each key: now - 9 .. now, plus 60.
    assert store.next_deadline() == now - 9 + 60.0
    assert sorted(_expire(store, now + 60.0)) == sorted(keys)


def test_heap_bounded_under_ttl_put_and_delete() -> None:
    store = Store()
    for i in range(10_000):
        _put(store, b"k%d" % (i % 10), ttl=60.0, now=float(i))
        store.remove(b"k%d" % ((i + 5) % 10))
        _put(store, b"p%d" % (i % 10), ttl=None, now=float(i))
    assert len(store._heap) <= 2 * 10 + 64 + 1


# --------------------------------------------------------------------------
# KVSYNC frames, get with remaining ttl
# --------------------------------------------------------------------------


def test_frames_plain() -> None:
    store = Store()
    store.put(b"/a/k", 42, UUID, b"owner=svc-1\n", b"body", None, 0.0)
    frames = store.frames(b"/a/k", 1000.0)
    assert frames is not None
    assert len(frames) == 5
    assert all(isinstance(frame, bytes) for frame in frames)
    msg = decode_kvmsg(frames)
    assert msg == KVMsg(b"/a/k", 42, UUID, {"owner": "svc-1"}, b"body")
    assert msg.ttl is None


def test_frames_ttl_is_remaining_time() -> None:
    store = Store()
    store.put(b"k", 9, UUID, b"ttl=30\nowner=x\n", b"v", 30.0, 10.0)
    frames = store.frames(b"k", 25.0)
    assert frames is not None
    msg = decode_kvmsg(frames)
    assert msg.properties["ttl"] == "15"
    assert msg.ttl == 15.0
    assert msg.properties["owner"] == "x"
    assert set(msg.properties) == {"ttl", "owner"}
    assert msg.uuid == UUID
    assert msg.sequence == 9
    assert msg.key == b"k"
    assert msg.body == b"v"


def test_frames_ttl_added_when_stored_properties_lack_it() -> None:
    store = Store()
    store.put(b"k", 1, b"", b"", b"v", 4.0, 100.0)
    frames = store.frames(b"k", 101.5)
    assert frames is not None
    msg = decode_kvmsg(frames)
    assert dict(msg.properties) == {"ttl": "2.500000"}
    assert msg.ttl == 2.5
    assert msg.uuid == b""


def test_frames_ttl_is_never_absolute_time() -> None:
    store = Store()
    now = 1_700_000_000.0  # a UNIX-time-like clock
    store.put(b"k", 1, UUID, b"ttl=10\n", b"v", 10.0, now)
    frames = store.frames(b"k", now + 4.0)
    assert frames is not None
    ttl = decode_kvmsg(frames).ttl
    assert ttl is not None
    assert ttl == pytest.approx(6.0)


def test_frames_ttl_at_deadline_stays_positive() -> None:
    store = Store()
    store.put(b"k", 1, UUID, b"", b"v", 5.0, 10.0)
    # Not yet expired by the caller: a ttl of 0 would mean "never expires".
    for now in (15.0, 16.0):
        frames = store.frames(b"k", now)
        assert frames is not None
        ttl = decode_kvmsg(frames).ttl
        assert ttl is not None
        assert 0 < ttl <= 0.01


def test_frames_missing_key() -> None:
    store = Store()
    _put(store, b"k")
    store.remove(b"k")
    assert store.frames(b"k", 0.0) is None


def test_get_with_now_gives_remaining_ttl() -> None:
    store = Store()
    store.put(b"k", 3, UUID, b"ttl=30\nowner=x\n", b"v", 30.0, 10.0)
    msg = store.get(b"k", 25.0)
    assert msg is not None
    assert msg.ttl == 15.0
    assert dict(msg.properties) == {"ttl": "15", "owner": "x"}
    assert msg.sequence == 3
    assert msg.uuid == UUID
    msg = store.get(b"k", 37.5)
    assert msg is not None
    assert msg.ttl == 2.5


def test_get_without_ttl_key() -> None:
    store = Store()
    store.put(b"k", 3, UUID, b"owner=x\n", b"v", None, 10.0)
    msg = store.get(b"k", 25.0)
    assert msg is not None
    assert msg.ttl is None
    assert dict(msg.properties) == {"owner": "x"}


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


def _fill(store: Store) -> None:
    for seq, key in enumerate([b"/a/1", b"/a/2", b"/b/1", b"/ab", b"x", b"/a/"], 1):
        store.put(key, seq, UUID, b"", b"v" + key, None, 0.0)


def test_snapshot_everything() -> None:
    store = Store()
    _fill(store)
    msgs = [decode_kvmsg(frames) for frames in _snapshot(store, b"", 0.0)]
    assert sorted(msg.key for msg in msgs) == sorted(store.keys())
    assert len(msgs) == 6
    for msg in msgs:
        assert msg.body == b"v" + msg.key
        assert msg.uuid == UUID


def test_snapshot_subtree() -> None:
    store = Store()
    _fill(store)
    keys = sorted(decode_kvmsg(f).key for f in _snapshot(store, b"/a/", 0.0))
    assert keys == [b"/a/", b"/a/1", b"/a/2"]
    assert store.keys(b"/a/") == [b"/a/1", b"/a/2", b"/a/"]
    assert list(_snapshot(store, b"/zzz/", 0.0)) == []


def test_snapshot_carries_remaining_ttl() -> None:
    store = Store()
    store.put(b"/a/t", 5, UUID, b"", b"v", 30.0, 10.0)
    store.put(b"/a/p", 6, UUID, b"", b"v", None, 10.0)
    msgs = {decode_kvmsg(f).key: decode_kvmsg(f) for f in _snapshot(store, b"", 25.0)}
    assert msgs[b"/a/t"].ttl == 15.0
    assert msgs[b"/a/p"].ttl is None


def test_snapshot_skips_keys_removed_during_iteration() -> None:
    store = Store()
    _fill(store)
    snapshot = _snapshot(store, b"", 0.0)
    first = decode_kvmsg(next(snapshot)).key
    all_keys = store.keys()
    removed = [key for key in all_keys if key != first]
    for key in removed[::2]:
        store.remove(key)
    rest = [decode_kvmsg(frames).key for frames in snapshot]
    assert first not in rest
    assert sorted([first, *rest]) == sorted(store.keys())
    assert not set(rest) & set(removed[::2])


def test_snapshot_skips_keys_expired_during_iteration() -> None:
    store = Store()
    store.put(b"a", 1, UUID, b"", b"v", None, 0.0)
    store.put(b"b", 2, UUID, b"", b"v", 1.0, 0.0)
    snapshot = _snapshot(store, b"", 0.5)
    next(snapshot)
    _expire(store, 5.0)
    rest = list(snapshot)
    assert all(decode_kvmsg(frames).key != b"b" for frames in rest)


def test_snapshot_tolerates_keys_added_during_iteration() -> None:
    store = Store()
    _fill(store)
    snapshot = _snapshot(store, b"", 0.0)
    seen = [decode_kvmsg(next(snapshot)).key]
    for i in range(100):
        store.put(b"/new/%d" % i, 100 + i, UUID, b"", b"n", None, 0.0)
    seen += [decode_kvmsg(frames).key for frames in snapshot]
    assert sorted(seen) == sorted([b"/a/1", b"/a/2", b"/b/1", b"/ab", b"x", b"/a/"])


def test_snapshot_sends_changed_value_as_it_is_then() -> None:
    store = Store()
    store.put(b"a", 1, UUID, b"", b"v1", None, 0.0)
    store.put(b"b", 2, UUID, b"", b"v1", None, 0.0)
    snapshot = _snapshot(store, b"", 0.0)
    first = decode_kvmsg(next(snapshot)).key
    other = b"b" if first == b"a" else b"a"
    store.put(other, 3, UUID2, b"", b"v2", None, 0.0)
    (last,) = [decode_kvmsg(frames) for frames in snapshot]
    assert last.key == other
    assert last.body == b"v2"
    assert last.sequence == 3
    assert last.uuid == UUID2


# The record keeps the properties' length in 1 byte below 255 and as 255 plus
# 4 bytes from 255 on; the lengths here are those of the whole properties
# frame.  A length of 255 in the short form would read back as the long
# marker (the round trip fails); a threshold moved on both sides still round
# trips, so the record's size is checked too.
@pytest.mark.parametrize("length", [0, 3, 253, 254, 255, 256, 70_000])
def test_properties_of_any_length_round_trip(length: int) -> None:
    store = Store()
    value = "x" * (length - 3) if length else ""
    properties = b"p=%s\n" % value.encode() if length else b""
    assert len(properties) == length
    uuid = bytes(range(16))
    store.put(b"/k", 7, uuid, properties, b"body", None, 0.0)
    header = 10 if length < 255 else 14
    assert len(store._records[b"/k"]) == header + len(uuid) + length + len(b"body")
    frames = store.frames(b"/k", 0.0)
    assert frames == [b"/k", SEQUENCE.pack(7), uuid, properties, b"body"]
    assert len(frames[3]) == length
    assert store.uuid_of(b"/k") == uuid
    entry = store.get(b"/k")
    expected = {"p": value} if length else {}
    assert entry == KVMsg(b"/k", 7, uuid, expected, b"body")
    # round trip: what get() returns, stored again, gives the same bytes
    store.put(
        b"/k2", 8, entry.uuid, encode_properties(entry.properties), b"b", None, 0.0
    )
    assert store.frames(b"/k2", 0.0)[3] == properties


def test_a_typical_record_fits_a_160_byte_allocation() -> None:
    store = Store()
    store.put(b"/k" * 8, 1, bytes(16), b"", b"v" * 100, None, 0.0)
    assert sys.getsizeof(store._records[b"/k" * 8]) <= 160

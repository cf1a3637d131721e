"""Synchronous tests for the pending list (trioclone.core.pending).
Time is always a literal ``now``.
"""

from __future__ import annotations

import pytest

from trioclone.core.pending import Pending


def _uuid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _frames(n: int) -> list[bytes]:
    return [b"/k/%d" % n, bytes(8), _uuid(n), b"", b"v%d" % n]


def _drain(pending: Pending) -> list[list[bytes]]:
    """Every held update, oldest first, taken off the list."""
    return [list(held.frames) for held in pending.take(len(pending))]


# --------------------------------------------------------------------------
# Pending: hold, match, drain
# --------------------------------------------------------------------------


def test_hold_and_match_by_uuid() -> None:
    pending = Pending()
    for n in range(1, 6):
        pending.hold(_uuid(n), _frames(n), 0.0)
    assert len(pending) == 5
    assert pending.match(_uuid(3)) is True  # from the middle
    assert pending.match(_uuid(3)) is False  # only once
    assert pending.match(_uuid(9)) is False  # never held
    assert len(pending) == 4
    assert _drain(pending) == [_frames(n) for n in (1, 2, 4, 5)]
    assert pending.dropped == 0


def test_drain_keeps_arrival_order_and_empties() -> None:
    pending = Pending()
    order = [7, 2, 9, 1]
    for n in order:
        pending.hold(_uuid(n), _frames(n), float(n))
    assert _drain(pending) == [_frames(n) for n in order]
    assert len(pending) == 0
    assert _drain(pending) == []


def test_resend_keeps_the_first_copys_place() -> None:
    pending = Pending()
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.hold(_uuid(2), _frames(2), 1.0)
    resend = [b"/k/1", bytes(8), _uuid(1), b"", b"resent"]
    pending.hold(_uuid(1), resend, 2.0)
    assert len(pending) == 2
    assert _drain(pending) == [_frames(1), _frames(2)]


def test_updates_without_a_uuid_are_never_held() -> None:
    """They could never be matched, so a takeover would apply them twice."""
    pending = Pending()
    assert pending.hold(b"", [b"/a", bytes(8), b"", b"", b"1"], 0.0) is False
    assert pending.hold(_uuid(1), _frames(1), 0.0) is True
    assert len(pending) == 1
    assert pending.match(b"") is False
    assert _drain(pending) == [_frames(1)]


def test_max_size_evicts_oldest_and_counts() -> None:
    pending = Pending(max_size=3)
    for n in range(1, 6):
        pending.hold(_uuid(n), _frames(n), float(n))
    assert len(pending) == 3
    assert pending.dropped == 2
    assert pending.match(_uuid(1)) is False
    assert pending.match(_uuid(2)) is False
    assert _drain(pending) == [_frames(n) for n in (3, 4, 5)]


def test_resend_at_max_size_drops_nothing() -> None:
    pending = Pending(max_size=2)
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.hold(_uuid(2), _frames(2), 0.0)
    pending.hold(_uuid(1), _frames(1), 1.0)
    assert len(pending) == 2
    assert pending.dropped == 0


# --------------------------------------------------------------------------
# Pending: expiry by age (dropped at age >= max_age)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "kept"), [(10.0, True), (39.999, True), (40.0, False), (1e9, False)]
)
def test_expire_boundary(now: float, kept: bool) -> None:
    pending = Pending(max_age=30.0)
    pending.hold(_uuid(1), _frames(1), 10.0)
    assert pending.expire(now) == (0 if kept else 1)
    assert len(pending) == (1 if kept else 0)
    assert pending.dropped == (0 if kept else 1)
    assert pending.match(_uuid(1)) is kept


def test_expire_drops_only_the_old_and_counts() -> None:
    pending = Pending(max_age=30.0)
    pending.hold(_uuid(1), _frames(1), 10.0)
    pending.hold(_uuid(2), _frames(2), 11.0)
    pending.hold(_uuid(3), _frames(3), 12.0)
    pending.hold(_uuid(4), _frames(4), 20.0)
    assert pending.expire(39.999) == 0
    assert pending.expire(41.0) == 2  # held at 10.0 and 11.0
    assert pending.dropped == 2
    assert pending.expire(42.0) == 1  # held at 12.0
    assert pending.dropped == 3
    assert _drain(pending) == [_frames(4)]


def test_expire_counts_add_up_with_size_drops() -> None:
    pending = Pending(max_size=2, max_age=5.0)
    for n in range(1, 4):
        pending.hold(_uuid(n), _frames(n), 0.0)
    assert pending.dropped == 1
    assert pending.expire(5.0) == 2
    assert pending.dropped == 3
    assert len(pending) == 0


def test_expire_of_empty_list() -> None:
    pending = Pending(max_age=1.0)
    assert pending.expire(100.0) == 0
    assert pending.dropped == 0


def test_matched_entries_do_not_expire_later() -> None:
    pending = Pending(max_age=30.0)
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.hold(_uuid(2), _frames(2), 0.0)
    assert pending.match(_uuid(1))
    assert pending.expire(30.0) == 1
    assert pending.dropped == 1


def test_take_removes_the_oldest_in_order_with_their_sequences() -> None:
    pending = Pending()
    for n in range(1, 6):
        pending.hold(_uuid(n), _frames(n), float(n), sequence=10 * n)
    first = pending.take(2)
    assert [(list(h.frames), h.since, h.sequence) for h in first] == [
        (_frames(1), 1.0, 10),
        (_frames(2), 2.0, 20),
    ]
    assert len(pending) == 3
    assert [list(h.frames) for h in pending.take(10)] == [_frames(n) for n in (3, 4, 5)]
    assert pending.take(1) == []


# --------------------------------------------------------------------------
# Relay entries: handed over after a split, resent until matched
# --------------------------------------------------------------------------


def _peer(n: int) -> list[bytes]:
    """A hand-over as sent to the peer (its own form)."""
    return [b"/k/%d" % n, bytes(7) + b"\x09", _uuid(n), b"lineage=x\n", b"v%d" % n]


def test_hand_overs_are_resent_every_interval_until_matched() -> None:
    pending = Pending()
    pending.hold(_uuid(1), _frames(1), 0.0, relay=_peer(1))
    pending.hold(_uuid(2), _frames(2), 0.0)  # an ordinary client copy
    assert pending.due(0.999, 1.0) == []
    assert pending.due(1.0, 1.0) == [_peer(1)]  # the peer's form is sent
    assert pending.due(1.5, 1.0) == []  # sent at 1.0
    assert pending.due(2.0, 1.0) == [_peer(1)]
    assert [list(h.frames) for h in pending.take(1)] == [_frames(1)]  # the
    assert pending.due(10.0, 1.0) == []  # client's form is replayed


def test_hand_overs_are_never_pushed_out_by_size() -> None:
    """A hand-over pushed out would be a confirmed write never resent."""
    pending = Pending(max_size=2, max_age=5.0)
    for n in range(1, 4):
        pending.hold(_uuid(n), _frames(n), 0.0, relay=_peer(n))
    pending.hold(_uuid(7), _frames(7), 0.0)  # ordinary ones are bounded
    pending.hold(_uuid(8), _frames(8), 0.0)
    pending.hold(_uuid(9), _frames(9), 0.0)
    assert len(pending) == 5 and pending.dropped == 1
    assert pending.due(1.0, 1.0) == [_peer(1), _peer(2), _peer(3)]
    assert pending.due(2.0, 1.0, limit=2) == [_peer(1), _peer(2)]  # bounded
    assert pending.due(2.0, 1.0) == [_peer(3)]  # the least recently sent first


def test_a_hand_over_ages_out_only_once_sent_three_times() -> None:
    pending = Pending(max_age=5.0)
    pending.hold(_uuid(1), _frames(1), 0.0, relay=_peer(1))  # sent once
    assert pending.expire(100.0) == 0  # old, but sent once only
    pending.due(100.0, 1.0)
    assert pending.expire(100.0) == 0
    pending.due(101.0, 1.0)  # the third send
    assert pending.expire(101.0) == 1
    assert len(pending) == 0 and pending.dropped == 1


def test_expiry_is_bounded_work_per_call() -> None:
    pending = Pending(max_age=1.0)
    for n in range(70_000):
        pending.hold(_uuid(10 + n), _frames(n), 0.0)
    assert pending.expire(5.0) == 65_536
    assert pending.expire(5.0) == 70_000 - 65_536


def test_hand_overs_stop_when_taken_or_switched_off() -> None:
    pending = Pending(max_size=2, max_age=5.0)
    for n in range(1, 3):
        pending.hold(_uuid(n), _frames(n), 0.0, relay=_peer(n))
    pending.hold(_uuid(5), _frames(5), 0.0)
    assert [list(h.frames) for h in pending.take(1)] == [_frames(1)]  # relays first
    assert pending.due(2.0, 1.0) == [_peer(2)]
    pending.relay_off()
    assert pending.due(3.0, 1.0) == []
    assert len(pending) == 2  # still held: a takeover replays them
    assert pending.key_of(_uuid(2)) == b"/k/2" and pending.key_of(_uuid(4)) is None

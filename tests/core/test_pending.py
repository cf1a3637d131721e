"""Synchronous tests for the pending list and the applied window
(trioclone.core.pending).  Time is always a literal ``now``.
"""

from __future__ import annotations

import pytest

from trioclone.core.pending import Applied, Pending


def _uuid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _frames(n: int) -> list[bytes]:
    return [b"/k/%d" % n, bytes(8), _uuid(n), b"", b"v%d" % n]


# --------------------------------------------------------------------------
# Applied
# --------------------------------------------------------------------------


def test_applied_remembers_uuids() -> None:
    applied = Applied(limit=10)
    assert len(applied) == 0
    assert _uuid(1) not in applied
    applied.add(_uuid(1))
    applied.add(_uuid(2))
    assert _uuid(1) in applied
    assert _uuid(2) in applied
    assert _uuid(3) not in applied
    assert len(applied) == 2


def test_applied_is_bounded_and_evicts_oldest() -> None:
    applied = Applied(limit=3)
    for n in range(1, 5):
        applied.add(_uuid(n))
    assert len(applied) == 3
    assert _uuid(1) not in applied
    assert all(_uuid(n) in applied for n in (2, 3, 4))
    applied.add(_uuid(5))
    assert _uuid(2) not in applied
    assert all(_uuid(n) in applied for n in (3, 4, 5))


def test_applied_adding_twice_takes_one_place() -> None:
    applied = Applied(limit=3)
    applied.add(_uuid(1))
    applied.add(_uuid(1))
    assert len(applied) == 1


def test_applied_ignores_empty_uuid() -> None:
    applied = Applied(limit=2)
    applied.add(_uuid(1))
    applied.add(_uuid(2))
    applied.add(b"")
    assert b"" not in applied
    assert len(applied) == 2
    assert _uuid(1) in applied  # nothing was evicted for it


def test_applied_clear() -> None:
    applied = Applied(limit=3)
    applied.add(_uuid(1))
    applied.clear()
    assert len(applied) == 0
    assert _uuid(1) not in applied


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
    assert pending.drain() == [_frames(n) for n in (1, 2, 4, 5)]
    assert pending.dropped == 0


def test_drain_keeps_arrival_order_and_empties() -> None:
    pending = Pending()
    order = [7, 2, 9, 1]
    for n in order:
        pending.hold(_uuid(n), _frames(n), float(n))
    assert pending.drain() == [_frames(n) for n in order]
    assert len(pending) == 0
    assert pending.drain() == []


def test_resend_keeps_the_first_copys_place() -> None:
    pending = Pending()
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.hold(_uuid(2), _frames(2), 1.0)
    resend = [b"/k/1", bytes(8), _uuid(1), b"", b"resent"]
    pending.hold(_uuid(1), resend, 2.0)
    assert len(pending) == 2
    assert pending.drain() == [_frames(1), _frames(2)]


def test_empty_uuids_are_held_and_never_matched() -> None:
    pending = Pending()
    first = [b"/a", bytes(8), b"", b"", b"1"]
    second = [b"/a", bytes(8), b"", b"", b"2"]
    pending.hold(b"", first, 0.0)
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.hold(b"", second, 0.0)  # not a resend of the first
    assert len(pending) == 3
    assert pending.match(b"") is False
    assert len(pending) == 3
    assert pending.drain() == [first, _frames(1), second]


def test_max_size_evicts_oldest_and_counts() -> None:
    pending = Pending(max_size=3)
    for n in range(1, 6):
        pending.hold(_uuid(n), _frames(n), float(n))
    assert len(pending) == 3
    assert pending.dropped == 2
    assert pending.match(_uuid(1)) is False
    assert pending.match(_uuid(2)) is False
    assert pending.drain() == [_frames(n) for n in (3, 4, 5)]


def test_max_size_counts_anonymous_entries() -> None:
    pending = Pending(max_size=2)
    pending.hold(b"", _frames(1), 0.0)
    pending.hold(b"", _frames(2), 0.0)
    pending.hold(b"", _frames(3), 0.0)
    assert len(pending) == 2
    assert pending.dropped == 1
    assert pending.drain() == [_frames(2), _frames(3)]


def test_resend_at_max_size_drops_nothing() -> None:
    pending = Pending(max_size=2)
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.hold(_uuid(2), _frames(2), 0.0)
    pending.hold(_uuid(1), _frames(1), 1.0)
    assert len(pending) == 2
    assert pending.dropped == 0


def test_clear() -> None:
    pending = Pending()
    pending.hold(_uuid(1), _frames(1), 0.0)
    pending.clear()
    assert len(pending) == 0
    assert pending.match(_uuid(1)) is False
    assert pending.drain() == []


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
    pending.hold(b"", _frames(2), 11.0)
    pending.hold(_uuid(3), _frames(3), 12.0)
    pending.hold(_uuid(4), _frames(4), 20.0)
    assert pending.expire(39.999) == 0
    assert pending.expire(41.0) == 2  # held at 10.0 and 11.0
    assert pending.dropped == 2
    assert pending.expire(42.0) == 1  # held at 12.0
    assert pending.dropped == 3
    assert pending.drain() == [_frames(4)]


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

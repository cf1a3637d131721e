"""The window of replaced writes (trioclone.core.applied), with literal times.

Defaults in these tests: a 10 s horizon; the bucket width is 1 s, so a UUID
added at t is kept until at least t + 10 and gone by t + 11.
"""

from __future__ import annotations

import pytest

from trioclone.core.applied import BUCKET, Applied


def _uuid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_remembers_uuids() -> None:
    applied = Applied(horizon=10.0, limit=10)
    applied.add(_uuid(1), 0.0)
    applied.add(_uuid(2), 0.0)
    assert _uuid(1) in applied and _uuid(2) in applied
    assert _uuid(3) not in applied
    assert len(applied) == 2


def test_adding_twice_takes_one_place_and_empty_uuids_none() -> None:
    applied = Applied(horizon=10.0, limit=2)
    applied.add(_uuid(1), 0.0)
    applied.add(_uuid(1), 5.0)
    applied.add(b"", 5.0)
    assert len(applied) == 1
    assert b"" not in applied


@pytest.mark.parametrize(
    ("now", "kept"),
    [(10.0, True), (10.999, True), (11.0, False)],
)
def test_kept_for_at_least_the_horizon(now: float, kept: bool) -> None:
    applied = Applied(horizon=10.0)
    applied.add(_uuid(1), 0.0)
    applied.evict(now)
    assert (_uuid(1) in applied) is kept
    assert applied.evicted == (0 if kept else 1)
    assert applied.evicted_early == 0


def test_a_resend_inside_the_horizon_is_always_recognised() -> None:
    """Whatever the add times, nothing younger than the horizon is evicted."""
    applied = Applied(horizon=10.0)
    adds = [0.0, 0.3, 0.99, 1.0, 1.5, 7.25, 12.0, 19.9]
    added: list[tuple[int, float]] = []
    for now in sorted({*adds, 11.0, 11.3, 11.99, 12.5, 15.0, 20.0, 25.0, 40.0}):
        for n, when in enumerate(adds):
            if when == now:
                applied.add(_uuid(n), now)
                added.append((n, when))
        applied.evict(now)
        for n, when in added:
            if now - when <= applied.horizon:
                assert _uuid(n) in applied, (now, when)
            if now - when >= applied.horizon + BUCKET:
                assert _uuid(n) not in applied, (now, when)
    assert len(applied) == 0


def test_the_memory_limit_evicts_early_and_counts_it() -> None:
    applied = Applied(horizon=10.0, limit=3)
    for n in range(1, 6):
        applied.add(_uuid(n), 0.0)
    assert len(applied) == 3
    assert [_uuid(n) in applied for n in range(1, 6)] == [False, False] + [True] * 3
    assert applied.evicted_early == 2
    assert applied.evicted == 0


def test_retain_suspends_eviction_by_age_not_by_memory() -> None:
    applied = Applied(horizon=10.0, limit=3)
    applied.retain = True
    applied.add(_uuid(1), 0.0)
    applied.evict(1000.0)
    assert _uuid(1) in applied
    for n in range(2, 5):
        applied.add(_uuid(n), 1000.0)
    assert _uuid(1) not in applied and applied.evicted_early == 1
    applied.retain = False
    applied.evict(1011.0)
    assert len(applied) == 0
    assert applied.evicted == 3


def test_export_and_load_carry_ages_across_clocks() -> None:
    source = Applied(horizon=10.0)
    source.add(_uuid(1), 100.0)
    source.add(_uuid(2), 104.5)
    source.add(_uuid(3), 104.6)
    batches = source.export(105.0)
    assert batches == [(5.0, [_uuid(1)]), (0.5, [_uuid(2), _uuid(3)])]
    # another server, whose clock reads 7.0 at the same moment
    copy = Applied(horizon=10.0)
    copy.load(batches, 7.0)
    assert all(_uuid(n) in copy for n in (1, 2, 3))
    copy.evict(12.0)  # uuid 1 went 10 s ago on its own clock: still kept
    assert _uuid(1) in copy
    copy.evict(13.0)
    assert _uuid(1) not in copy and _uuid(2) in copy
    copy.evict(17.499)  # 2 and 3 went at 6.5 on this clock
    assert len(copy) == 2
    copy.evict(17.5)
    assert len(copy) == 0

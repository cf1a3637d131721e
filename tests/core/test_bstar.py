"""Synchronous tests for the Binary Star state machine (trioclone.core.bstar).

Every row of the table in ``shared/spec/binary-star.md`` is one case of
``test_table_row``.  Time is always a literal ``now``: heartbeat 1.0 s, so
the peer expires 2.0 s after the last peer message (or 3.0 s after the
machine is made: trioclone's deliberate difference from the reference, which
starts the expiry at 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from trioclone.core.bstar import (
    BOTH_BACKUP,
    BOTH_PRIMARY,
    DUAL_ACTIVES,
    DUAL_PASSIVES,
    HEARTBEAT_MISMATCH,
    NEW_MAP_OVER_OURS,
    BinaryStar,
    Outcome,
    State,
    decode_state,
    encode_state,
)
from trioclone.errors import RemoteProtocolError

# --------------------------------------------------------------------------
# Machines in each state, reached through legal events only.
# Each returns the machine; the comment says when the peer expires.
# --------------------------------------------------------------------------


def _primary() -> BinaryStar:
    """PRIMARY, made at 0.0, never heard its peer: expires at 2.0."""
    return BinaryStar(primary=True, now=0.0, heartbeat=1.0)


def _backup() -> BinaryStar:
    """BACKUP, made at 0.0, never heard its peer: expires at 2.0."""
    return BinaryStar(primary=False, now=0.0, heartbeat=1.0)


def _active_primary() -> BinaryStar:
    """ACTIVE primary; last peer message (BACKUP) at 10.0: expires at 12.0."""
    star = _primary()
    assert star.on_peer(State.BACKUP, 10.0).state is State.ACTIVE
    return star


def _active_backup() -> BinaryStar:
    """ACTIVE backup after a failover; last peer message at 10.0."""
    star = _backup()
    assert star.on_peer(State.ACTIVE, 4.0).state is State.PASSIVE
    vote = star.on_vote(6.0)
    assert vote.accepted
    assert star.state is State.ACTIVE
    # The primary restarted: it says PRIMARY, the backup stays ACTIVE.
    assert star.on_peer(State.PRIMARY, 10.0).state is State.ACTIVE
    return star


def _passive_primary() -> BinaryStar:
    """PASSIVE primary (its peer is active); last peer message at 10.0."""
    star = _primary()
    assert star.on_peer(State.ACTIVE, 10.0).state is State.PASSIVE
    return star


def _passive_backup() -> BinaryStar:
    """PASSIVE backup; last peer message (ACTIVE) at 10.0: expires at 12.0."""
    star = _backup()
    assert star.on_peer(State.ACTIVE, 10.0).state is State.PASSIVE
    return star


SETUPS: dict[str, Callable[[], BinaryStar]] = {
    "primary": _primary,
    "backup": _backup,
    "active-primary": _active_primary,
    "active-backup": _active_backup,
    "passive-primary": _passive_primary,
    "passive-backup": _passive_backup,
}

VOTE = "CLIENT_REQUEST"
SEIZE = "SEIZE"  # the server core keeps its map: ``seize()``


@dataclass(frozen=True)
class Case:
    setup: str
    event: State | str  # a peer state heard, VOTE or SEIZE
    now: float
    state: State  # the state afterwards
    accepted: bool = False
    fault: str | None = None

    def id(self) -> str:
        event = self.event if isinstance(self.event, str) else f"PEER_{self.event.name}"
        return f"{self.setup}-{event}@{self.now}"


P, B, A, S = State.PRIMARY, State.BACKUP, State.ACTIVE, State.PASSIVE

TABLE_CASES = [
    # PRIMARY (peer expires at 3.0: expiry + a heartbeat after the start)
    Case("primary", B, 1.0, A),  # -> ACTIVE (same)
    Case("primary", A, 1.0, S),  # -> PASSIVE (same)
    Case("primary", VOTE, 3.0, A, accepted=True),  # peer expired (same)
    Case("primary", VOTE, 2.999, P),  # peer not expired: rejected (same)
    Case("primary", P, 1.0, P, fault=BOTH_PRIMARY),  # misconfiguration, loud
    Case("primary", S, 1.0, P),  # no change
    # BACKUP (peer expires at 3.0)
    Case("backup", A, 1.0, S),  # -> PASSIVE (same)
    Case("backup", VOTE, 3.0, B),  # always rejected, even expired
    Case("backup", VOTE, 2.999, B),
    Case("backup", P, 1.0, B),  # other: no change
    Case("backup", B, 1.0, B, fault=BOTH_BACKUP),  # misconfiguration
    Case("backup", S, 1.0, B),
    # ACTIVE (peer expires at 12.0): votes accepted; only PEER_ACTIVE moves it
    Case("active-primary", VOTE, 12.0, A, accepted=True),
    Case("active-primary", VOTE, 11.999, A, accepted=True),
    Case("active-primary", P, 10.5, A),
    Case("active-primary", B, 10.5, A),
    Case("active-primary", S, 10.5, A),
    Case("active-primary", A, 10.5, A, fault=DUAL_ACTIVES),  # fatal in reference
    Case("active-backup", VOTE, 12.0, A, accepted=True),
    Case("active-backup", VOTE, 11.999, A, accepted=True),
    Case("active-backup", P, 10.5, A),
    Case("active-backup", B, 10.5, A),
    Case("active-backup", S, 10.5, A),
    # dual actives: with no verdict on the maps yet, both wait (see below)
    Case("active-backup", A, 10.5, A, fault=DUAL_ACTIVES),
    # PASSIVE (peer expires at 12.0)
    Case("passive-primary", P, 10.5, A),  # peer restarted (same)
    Case("passive-primary", B, 10.5, A),  # peer restarted (same)
    Case("passive-primary", VOTE, 12.0, A, accepted=True),  # failover (same)
    Case("passive-primary", VOTE, 11.999, S),  # rejected (same)
    Case("passive-primary", A, 10.5, S),  # normal
    Case("passive-primary", S, 10.5, A, fault=DUAL_PASSIVES),  # primary takes over
    Case("passive-backup", P, 10.5, A),
    Case("passive-backup", B, 10.5, A),
    Case("passive-backup", VOTE, 12.0, A, accepted=True),
    Case("passive-backup", VOTE, 11.999, S),
    Case("passive-backup", A, 10.5, S),
    Case("passive-backup", S, 10.5, S, fault=DUAL_PASSIVES),  # backup stays
    # SEIZE: only a passive takes over on the core's word
    Case("primary", SEIZE, 1.0, P),
    Case("backup", SEIZE, 1.0, B),
    Case("active-primary", SEIZE, 10.5, A),
    Case("active-backup", SEIZE, 10.5, A),
    Case("passive-primary", SEIZE, 10.5, A, fault=NEW_MAP_OVER_OURS),
    Case("passive-backup", SEIZE, 10.5, A, fault=NEW_MAP_OVER_OURS),
]


@pytest.mark.parametrize("case", TABLE_CASES, ids=Case.id)
def test_table_row(case: Case) -> None:
    star = SETUPS[case.setup]()
    before = star.state
    faults_before = sum(star.faults.values())
    if case.event == VOTE:
        outcome = star.on_vote(case.now)
    elif case.event == SEIZE:
        outcome = star.seize()
    else:
        assert isinstance(case.event, State)
        outcome = star.on_peer(case.event, case.now)
    assert outcome.previous is before
    assert outcome.state is case.state
    assert star.state is case.state
    assert outcome.changed == (before is not case.state)
    assert outcome.accepted is case.accepted
    assert outcome.fault == case.fault
    if case.fault is None:
        assert sum(star.faults.values()) == faults_before
    else:
        assert star.faults[case.fault] == 1
        assert sum(star.faults.values()) == faults_before + 1


def test_table_covers_every_state_and_event() -> None:
    seen = {(SETUPS[c.setup]().state, c.event) for c in TABLE_CASES}
    for state in State:
        for event in [*State, VOTE, SEIZE]:
            assert (state, event) in seen


# --------------------------------------------------------------------------
# Peer expiry
# --------------------------------------------------------------------------


def test_fresh_primary_waits_one_expiry_and_a_heartbeat_before_a_vote() -> None:
    # Deliberate difference: the reference starts the expiry at 0 and would
    # accept at once, possibly making a second active.  The heartbeat more:
    # the peer's first heartbeat after we subscribe may not reach us.
    star = BinaryStar(primary=True, now=0.0, heartbeat=1.0)
    assert star.peer_expiry == 3.0
    assert not star.peer_expired(2.999)
    assert star.peer_expired(3.0)
    assert star.on_vote(0.0).accepted is False
    assert star.on_vote(2.999).accepted is False
    assert star.state is State.PRIMARY
    outcome = star.on_vote(3.0)
    assert outcome.accepted is True
    assert outcome.state is State.ACTIVE


def test_fresh_primary_hearing_an_active_peer_in_time_goes_passive() -> None:
    star = BinaryStar(primary=True, now=100.0, heartbeat=1.0)
    assert star.on_vote(101.999).accepted is False
    assert star.on_peer(State.ACTIVE, 101.999).state is State.PASSIVE


def test_each_peer_message_pushes_the_expiry() -> None:
    star = _passive_backup()  # last heard 10.0
    star.on_peer(State.ACTIVE, 11.5)
    star.on_peer(State.ACTIVE, 12.5)
    assert star.peer_expiry == 14.5
    assert star.on_vote(14.499).accepted is False
    assert star.on_vote(14.5).accepted is True
    assert star.state is State.ACTIVE


def test_primary_expiry_counts_from_a_no_change_peer_message() -> None:
    star = _primary()
    assert star.on_peer(State.PASSIVE, 10.0).state is State.PRIMARY
    assert star.on_vote(11.999).accepted is False
    assert star.on_vote(12.0).accepted is True
    assert star.state is State.ACTIVE


def test_expiry_follows_the_heartbeat_setting() -> None:
    star = BinaryStar(primary=True, now=0.0, heartbeat=0.5)
    assert star.on_vote(1.499).accepted is False
    assert star.on_vote(1.5).accepted is True
    star = BinaryStar(primary=True, now=0.0, heartbeat=1.0, expiry_heartbeats=3)
    assert star.on_vote(3.999).accepted is False
    assert star.on_vote(4.0).accepted is True


# --------------------------------------------------------------------------
# Faults: dual actives, dual passives, misconfiguration
# --------------------------------------------------------------------------


def test_dual_actives_primary_stays_active() -> None:
    star = _active_primary()
    outcome = star.on_peer(State.ACTIVE, 10.5)
    assert outcome == Outcome(State.ACTIVE, State.ACTIVE, False, DUAL_ACTIVES)
    assert star.faults[DUAL_ACTIVES] == 1


@pytest.mark.parametrize("primary", [True, False])
def test_dual_actives_follow_the_verdict_at_once(primary: bool) -> None:
    star = _active_primary() if primary else _active_backup()
    outcome = star.on_peer(State.ACTIVE, 10.5, keep_active=False)
    assert outcome == Outcome(State.ACTIVE, State.PASSIVE, False, DUAL_ACTIVES)
    assert outcome.changed
    assert star.faults[DUAL_ACTIVES] == 1


def test_dual_actives_a_backup_that_holds_the_map_stays() -> None:
    star = _active_backup()
    for now in (10.5, 11.5, 12.5, 13.5):
        outcome = star.on_peer(State.ACTIVE, now, keep_active=True)
        assert outcome.state is State.ACTIVE
    assert star.faults[DUAL_ACTIVES] == 1  # one episode, reported once


def test_dual_actives_without_a_verdict_wait_then_the_primary_wins() -> None:
    star = _active_backup()
    assert [star.on_peer(State.ACTIVE, t).state for t in (10.5, 11.5)] == [
        State.ACTIVE,
        State.ACTIVE,
    ]
    star.on_vote(11.7)  # votes in between do not restart the count
    outcome = star.on_peer(State.ACTIVE, 12.5)
    assert outcome == Outcome(State.ACTIVE, State.PASSIVE, False, None)
    assert star.faults[DUAL_ACTIVES] == 1


def test_dual_actives_count_again_after_the_peer_changed() -> None:
    star = _active_primary()
    star.on_peer(State.ACTIVE, 10.5)
    star.on_peer(State.PASSIVE, 11.5)  # the peer stepped down
    star.on_peer(State.ACTIVE, 20.5)  # a second split healed
    assert star.faults[DUAL_ACTIVES] == 2


def test_dual_passives_primary_takes_over() -> None:
    star = _passive_primary()
    outcome = star.on_peer(State.PASSIVE, 10.5)
    assert outcome == Outcome(State.PASSIVE, State.ACTIVE, False, DUAL_PASSIVES)
    assert star.faults[DUAL_PASSIVES] == 1


def test_dual_passives_backup_stays_passive() -> None:
    star = _passive_backup()
    outcome = star.on_peer(State.PASSIVE, 10.5)
    assert outcome == Outcome(State.PASSIVE, State.PASSIVE, False, DUAL_PASSIVES)
    assert not outcome.changed
    assert star.faults[DUAL_PASSIVES] == 1


@pytest.mark.parametrize(
    ("primary", "fault"), [(True, BOTH_PRIMARY), (False, BOTH_BACKUP)]
)
def test_misconfigured_pair_is_reported_on_every_heartbeat(
    primary: bool, fault: str
) -> None:
    star = BinaryStar(primary=primary, now=0.0, heartbeat=1.0)
    same = star.state
    for now in (0.5, 1.5, 2.5):
        outcome = star.on_peer(same, now)
        assert outcome.fault == fault
        assert outcome.state is same
        assert not outcome.changed
    assert star.faults[fault] == 3
    assert star.state is same


def _exchange(primary: BinaryStar, backup: BinaryStar, now: float) -> None:
    """One heartbeat each way, both sent before either is received."""
    said_by_primary, said_by_backup = primary.state, backup.state
    primary.on_peer(said_by_backup, now)
    backup.on_peer(said_by_primary, now)


def test_dual_actives_converge() -> None:
    primary = BinaryStar(primary=True, now=0.0, heartbeat=1.0)
    backup = BinaryStar(primary=False, now=0.0, heartbeat=1.0)
    _exchange(primary, backup, 0.5)  # primary ACTIVE, backup still BACKUP
    _exchange(primary, backup, 1.5)  # backup hears ACTIVE: PASSIVE
    assert (primary.state, backup.state) == (State.ACTIVE, State.PASSIVE)
    # The network splits: neither hears the other; the backup gets a vote.
    assert backup.on_vote(3.5).accepted
    assert primary.on_vote(3.5).accepted
    assert (primary.state, backup.state) == (State.ACTIVE, State.ACTIVE)
    # The network heals.  Nothing tells whose map wins here: after a few
    # heartbeats the primary does.
    for now in (10.0, 11.0):
        _exchange(primary, backup, now)
        assert (primary.state, backup.state) == (State.ACTIVE, State.ACTIVE)
    for now in (12.0, 13.0):
        _exchange(primary, backup, now)
        assert (primary.state, backup.state) == (State.ACTIVE, State.PASSIVE)
    assert primary.faults[DUAL_ACTIVES] == 1
    assert backup.faults[DUAL_ACTIVES] == 1


def test_dual_passives_converge() -> None:
    primary = BinaryStar(primary=True, now=0.0, heartbeat=1.0)
    backup = BinaryStar(primary=False, now=0.0, heartbeat=1.0)
    # Both once saw an active peer (e.g. a third, stale server).
    primary.on_peer(State.ACTIVE, 0.5)
    backup.on_peer(State.ACTIVE, 0.5)
    assert (primary.state, backup.state) == (State.PASSIVE, State.PASSIVE)
    for now in (1.0, 2.0, 3.0):
        _exchange(primary, backup, now)
        assert (primary.state, backup.state) == (State.ACTIVE, State.PASSIVE)
    assert primary.faults[DUAL_PASSIVES] == 1
    assert backup.faults[DUAL_PASSIVES] == 1


# --------------------------------------------------------------------------
# Failover is automatic, failback is manual
# --------------------------------------------------------------------------


def test_failback_only_when_the_backup_dies() -> None:
    primary = BinaryStar(primary=True, now=0.0, heartbeat=1.0)
    backup = BinaryStar(primary=False, now=0.0, heartbeat=1.0)
    for now in (0.5, 1.5, 2.5):
        _exchange(primary, backup, now)
    assert (primary.state, backup.state) == (State.ACTIVE, State.PASSIVE)
    # The primary dies after its heartbeat at 2.5: failover at 4.5 exactly.
    assert backup.on_vote(4.499).accepted is False
    assert backup.on_vote(4.5).accepted is True
    assert backup.state is State.ACTIVE
    # The primary restarts.
    restarted = BinaryStar(primary=True, now=20.0, heartbeat=1.0)
    assert backup.on_peer(State.PRIMARY, 20.0).state is State.ACTIVE
    assert restarted.on_peer(State.ACTIVE, 20.5).state is State.PASSIVE
    assert backup.on_peer(State.PASSIVE, 21.0).state is State.ACTIVE
    assert restarted.on_vote(21.0).accepted is False  # backup still alive
    for now in (22.0, 23.0, 24.0):
        _exchange(restarted, backup, now)
        assert (restarted.state, backup.state) == (State.PASSIVE, State.ACTIVE)
    assert backup.on_vote(24.5).accepted is True
    # Now the backup dies after 24.0: failback to the primary.
    assert restarted.on_vote(25.999).accepted is False
    assert restarted.on_vote(26.0).accepted is True
    assert restarted.state is State.ACTIVE
    assert not restarted.faults
    assert not backup.faults


# --------------------------------------------------------------------------
# Heartbeat interval mismatch
# --------------------------------------------------------------------------


def _heard_at(star: BinaryStar, times: list[float]) -> list[str | None]:
    return [star.on_peer(State.PASSIVE, now).fault for now in times]


def test_slow_peer_heartbeat_is_reported_once_on_the_third_odd_interval() -> None:
    star = _active_primary()  # last heard at 10.0, heartbeat 1.0
    faults = _heard_at(star, [12.5, 15.0, 17.5, 20.0, 22.5, 25.0])
    assert faults == [None, None, HEARTBEAT_MISMATCH, None, None, None]
    assert star.faults[HEARTBEAT_MISMATCH] == 1
    assert star.state is State.ACTIVE


def test_fast_peer_heartbeat_is_reported() -> None:
    star = _active_primary()
    faults = _heard_at(star, [10.4, 10.8, 11.2])
    assert faults == [None, None, HEARTBEAT_MISMATCH]


def test_matching_heartbeat_is_never_reported() -> None:
    star = _active_primary()
    assert _heard_at(star, [11.0, 12.0, 13.0, 14.0, 15.0, 16.0]) == [None] * 6
    assert star.faults[HEARTBEAT_MISMATCH] == 0
    # Jitter within half a heartbeat either way is fine.
    assert _heard_at(star, [17.5, 18.0, 19.5, 20.0, 21.5]) == [None] * 5
    assert not star.faults


def test_heartbeat_mismatch_needs_three_odd_intervals_in_a_row() -> None:
    star = _active_primary()
    # odd, odd, normal, odd, odd: never three in a row
    assert _heard_at(star, [12.5, 15.0, 16.0, 18.5, 21.0]) == [None] * 5
    assert star.faults[HEARTBEAT_MISMATCH] == 0
    assert _heard_at(star, [23.5]) == [HEARTBEAT_MISMATCH]


def test_heartbeat_mismatch_is_counted_even_with_another_fault() -> None:
    star = _primary()
    faults = [star.on_peer(State.PRIMARY, now).fault for now in (0.0, 2.5, 5.0, 7.5)]
    assert faults[-1] == BOTH_PRIMARY
    for now in (10.0, 12.5, 15.0):
        star.on_peer(State.PRIMARY, now)
    assert star.faults[HEARTBEAT_MISMATCH] == 1


# --------------------------------------------------------------------------
# The heartbeat frame
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "frame"),
    [
        (State.PRIMARY, b"1"),
        (State.BACKUP, b"2"),
        (State.ACTIVE, b"3"),
        (State.PASSIVE, b"4"),
    ],
)
def test_state_frame_round_trip(state: State, frame: bytes) -> None:
    assert encode_state(state) == frame
    assert decode_state([frame]) is state
    assert decode_state([encode_state(state)]) is state


@pytest.mark.parametrize(
    "frames",
    [
        [b"5"],
        [b"0"],
        [b"x"],
        [b""],
        [b"\xff"],
        ["\u0663".encode()],  # ARABIC-INDIC DIGIT THREE: int() would take it
        [b"1", b"2"],
        [b"3", b""],
        [],
    ],
)
def test_malformed_state_frame(frames: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_state(frames)


def test_heartbeats_read_together_after_a_stall_are_not_a_mismatch() -> None:
    star = _primary()
    faults = [star.on_peer(State.BACKUP, now).fault for now in (0.0, 1.0, 2.0)]
    faults += [star.on_peer(State.BACKUP, 5.0).fault for _ in range(5)]
    faults += [star.on_peer(State.BACKUP, now).fault for now in (6.0, 7.0)]
    assert HEARTBEAT_MISMATCH not in faults
    assert star.faults[HEARTBEAT_MISMATCH] == 0

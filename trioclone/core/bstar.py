"""The Binary Star primary/backup state machine, sans-IO.

Rules
-----
States: PRIMARY (1) and BACKUP (2) are where a server starts, waiting for
its peer; ACTIVE (3) serves clients; PASSIVE (4) mirrors the active.
Events: PEER_PRIMARY..PEER_PASSIVE (1-4) are the peer's state, heard on the
heartbeat socket; CLIENT_REQUEST (5) is a snapshot request, a client's vote.
trioclone adds SEIZE, the server core's word (see ``seize``).

* Every peer state heard pushes the peer's expiry to ``now + expiry``
  (``expiry`` = 2 heartbeats by default).  The expiry also starts at
  ``now + expiry + heartbeat`` when the machine is made, so a freshly
  started primary waits to hear from a peer that may already be active
  before it accepts a vote (the reference starts at 0 and can make a
  second active); the heartbeat more is for the peer's first heartbeat
  after we subscribe, which its PUB may send before it has taken in our
  subscription.
* A vote is accepted by ACTIVE, and by PRIMARY or PASSIVE only once the peer
  has expired (``now >= peer_expiry``): no peer *and* a client asking is the
  split-brain guard.  BACKUP never accepts a vote.
* Failover is automatic, failback is not: ACTIVE is only left through the
  dual-active rule below.
* Faults never stop the process.  Dual actives (a split that healed)
  converge: the server whose map wins stays ACTIVE, the other steps down to
  PASSIVE.  Which map wins is the server core's verdict (``keep_active``,
  from the two maps' claims: an empty, just-restarted server never wins
  over one that holds the map); while the core cannot tell yet (no claim
  heard from the peer), both stay ACTIVE for up to ``DUAL_PATIENCE``
  heartbeats, then the primary wins.  Dual passives converge on the primary
  being ACTIVE.  Both-primary and both-backup are reported
  (misconfiguration).  Each fault is counted once per episode in ``faults``
  and returned so the shell can log it as an error.
* SEIZE: a PASSIVE whose peer serves a map founded empty after the one the
  passive holds becomes ACTIVE, and reports it as a fault.

The table below is the whole behaviour; anything not in it is "no change,
vote rejected".
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

from trioclone.errors import RemoteProtocolError


class State(enum.IntEnum):
    PRIMARY = 1
    BACKUP = 2
    ACTIVE = 3
    PASSIVE = 4


class Event(enum.IntEnum):
    PEER_PRIMARY = 1
    PEER_BACKUP = 2
    PEER_ACTIVE = 3
    PEER_PASSIVE = 4
    CLIENT_REQUEST = 5


# Inputs of the table: the five events, with CLIENT_REQUEST split by whether
# the peer has expired.
VOTE_PEER_ALIVE = "vote, peer alive"
VOTE_PEER_EXPIRED = "vote, peer expired"
#: The server core keeps its map over the peer's (``seize``).
SEIZE = "seize"

#: Stand-in for "ACTIVE on the primary, PASSIVE on the backup".
PRIMARY_WINS = "primary wins"
#: Stand-in for "as the server core's verdict says".
RESOLVE = "resolve"
#: Heartbeats of dual actives without a verdict before the primary wins.
DUAL_PATIENCE = 3

DUAL_ACTIVES = "dual actives"
DUAL_PASSIVES = "dual passives"
BOTH_PRIMARY = "both servers are configured as primary"
BOTH_BACKUP = "both servers are configured as backup"
HEARTBEAT_MISMATCH = "peer heartbeat interval differs from ours"
NEW_MAP_OVER_OURS = "the peer serves a map it founded after ours"

Input = Event | str
Next = State | str


@dataclass(frozen=True)
class Row:
    next: Next
    accept: bool = False
    fault: str | None = None


# (state, input) -> row
TABLE: dict[tuple[State, Input], Row] = {
    (State.PRIMARY, Event.PEER_BACKUP): Row(State.ACTIVE),
    (State.PRIMARY, Event.PEER_ACTIVE): Row(State.PASSIVE),
    (State.PRIMARY, Event.PEER_PRIMARY): Row(State.PRIMARY, fault=BOTH_PRIMARY),
    (State.PRIMARY, VOTE_PEER_EXPIRED): Row(State.ACTIVE, accept=True),
    (State.BACKUP, Event.PEER_ACTIVE): Row(State.PASSIVE),
    (State.BACKUP, Event.PEER_BACKUP): Row(State.BACKUP, fault=BOTH_BACKUP),
    (State.ACTIVE, VOTE_PEER_ALIVE): Row(State.ACTIVE, accept=True),
    (State.ACTIVE, VOTE_PEER_EXPIRED): Row(State.ACTIVE, accept=True),
    (State.ACTIVE, Event.PEER_ACTIVE): Row(RESOLVE, fault=DUAL_ACTIVES),
    (State.PASSIVE, Event.PEER_PRIMARY): Row(State.ACTIVE),
    (State.PASSIVE, Event.PEER_BACKUP): Row(State.ACTIVE),
    (State.PASSIVE, Event.PEER_PASSIVE): Row(PRIMARY_WINS, fault=DUAL_PASSIVES),
    (State.PASSIVE, VOTE_PEER_EXPIRED): Row(State.ACTIVE, accept=True),
    (State.PASSIVE, SEIZE): Row(State.ACTIVE, fault=NEW_MAP_OVER_OURS),
}


@dataclass(frozen=True)
class Outcome:
    """What one event did."""

    previous: State
    state: State
    accepted: bool = False
    fault: str | None = None

    @property
    def changed(self) -> bool:
        return self.previous != self.state


class BinaryStar:
    """One server's side of the pair."""

    def __init__(
        self,
        primary: bool,
        now: float,
        heartbeat: float = 1.0,
        expiry_heartbeats: float = 2.0,
    ) -> None:
        self.primary = primary
        self.heartbeat = heartbeat
        self.expiry = heartbeat * expiry_heartbeats
        self.state = State.PRIMARY if primary else State.BACKUP
        # One heartbeat more at the start: the peer's first heartbeat after
        # we subscribe can reach its PUB before our subscription does.
        self.peer_expiry = now + self.expiry + heartbeat
        self.peer_state: State | None = None
        self.faults: Counter[str] = Counter()
        self._last_heard: float | None = None
        self._odd_intervals = 0
        self._dual = 0  # heartbeats heard in a row while both are ACTIVE

    def peer_expired(self, now: float) -> bool:
        return now >= self.peer_expiry

    def on_peer(
        self, peer: State, now: float, *, keep_active: bool | None = None
    ) -> Outcome:
        """The peer said it is in state ``peer``.

        ``keep_active`` is the verdict on dual actives, if one can be given.
        """
        self.peer_state = peer
        self.peer_expiry = now + self.expiry
        mismatch = self._check_interval(now)
        outcome = self._step(Event(peer), keep_active)
        if mismatch:
            self.faults[mismatch] += 1  # counted even beside another fault
            if outcome.fault is None:
                outcome = Outcome(outcome.previous, outcome.state, fault=mismatch)
        return outcome

    def on_vote(self, now: float) -> Outcome:
        """A client asked for a snapshot; ``accepted`` says whether to answer."""
        return self._step(
            VOTE_PEER_EXPIRED if self.peer_expired(now) else VOTE_PEER_ALIVE
        )

    def seize(self) -> Outcome:
        """PASSIVE -> ACTIVE on the server core's word: the peer is active with
        a map it founded empty after ours, which a sync would throw away.  If
        the peer is alive, dual actives follow, and ours wins them."""
        return self._step(SEIZE)

    def _step(self, event: Input, keep_active: bool | None = None) -> Outcome:
        previous = self.state
        row = TABLE.get((previous, event))
        if isinstance(event, Event):
            dual = self._dual + 1 if row is not None and row.next == RESOLVE else 0
            self._dual = dual
        if row is None:
            return Outcome(previous, previous)
        if row.next == RESOLVE:
            if keep_active is None:  # no verdict yet: wait a little, then primary
                keep_active = self.primary if self._dual >= DUAL_PATIENCE else True
        else:
            keep_active = self.primary
        if isinstance(row.next, State):
            self.state = row.next
        else:  # PRIMARY_WINS or RESOLVE
            self.state = State.ACTIVE if keep_active else State.PASSIVE
        fault = row.fault if row.next != RESOLVE or self._dual == 1 else None
        if fault:
            self.faults[fault] += 1
        return Outcome(previous, self.state, row.accept, fault)

    def _check_interval(self, now: float) -> str | None:
        """Report once when three peer intervals in a row are far from ours."""
        last, self._last_heard = self._last_heard, now
        if last is None:
            return None
        interval = now - last
        if interval < 0.1 * self.heartbeat:
            return None  # queued heartbeats read together: says nothing
        if 0.5 * self.heartbeat <= interval <= 1.5 * self.heartbeat:
            self._odd_intervals = 0
            return None
        self._odd_intervals += 1
        return HEARTBEAT_MISMATCH if self._odd_intervals == 3 else None


def encode_state(state: State) -> bytes:
    """The heartbeat frame: the state number in decimal ASCII."""
    return b"%d" % state


def decode_state(frames: list[bytes]) -> State:
    """Parse a peer heartbeat; raise ``RemoteProtocolError`` if malformed."""
    if len(frames) != 1:
        raise RemoteProtocolError("a peer heartbeat is one frame", f"got {len(frames)}")
    try:
        return State(int(frames[0].decode("ascii")))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(
            "a peer heartbeat is a state number 1-4", f"got {frames[0][:16]!r}"
        ) from exc

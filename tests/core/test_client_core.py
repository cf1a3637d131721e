"""ClientCore with literal times: no Trio, no sockets.

Server messages are built with ``trioclone.core.chp`` (``encode_kvmsg``,
``kthxbai``, ``hugz``) and fed to ``on_reply`` (the snapshot socket) and
``on_update`` (the stream); what the core wants done comes out as
``core.actions`` (Connect / Request / Send) and ``core.events``.  Timers are
driven by ``poll(now)`` at exact boundaries: a deadline ``d`` fires at
``now == d`` and not one tick before.

Defaults (ClientTimings): request_timeout 1.0, silence_timeout 2.0,
backoff 0.5 doubling to max_backoff 5.0, resend_interval 1.0.
"""

from __future__ import annotations

import itertools
import uuid as uuidlib
from collections.abc import Sequence

import pytest

from trioclone.core import client as client_module
from trioclone.core.chp import (
    KVMsg,
    decode_kvmsg,
    encode_kvmsg,
    hugz,
    kthxbai,
    subtree_hugz,
)
from trioclone.core.client import (
    ClientCore,
    ClientTimings,
    Confirmed,
    Connect,
    Deleted,
    Phase,
    Request,
    Resynced,
    Send,
    Unconfirmed,
    Updated,
)
from trioclone.errors import LocalProtocolError

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def kv(
    key: bytes,
    sequence: int,
    body: bytes = b"",
    *,
    uuid: bytes = b"",
    properties: dict[str, str] | None = None,
) -> list[bytes]:
    """A KVSYNC or KVPUB as a server sends it."""
    return encode_kvmsg(KVMsg(key, sequence, uuid, properties or {}, body))


def take(core: ClientCore) -> tuple[list[object], list[object]]:
    """The actions and events the core produced since the last call."""
    actions, events = core.actions, core.events
    core.actions, core.events = [], []
    return actions, events


def actions(core: ClientCore) -> list[object]:
    return take(core)[0]


def events(core: ClientCore) -> list[object]:
    return take(core)[1]


def synced(
    entries: Sequence[tuple[bytes, int, bytes]] = (),
    sequence: int = 0,
    *,
    subtrees: Sequence[bytes] = (b"",),
    servers: int = 2,
    now: float = 0.0,
    timings: ClientTimings | None = None,
) -> ClientCore:
    """A core that has loaded one snapshot from server 0 at ``now``."""
    core = ClientCore(servers, subtrees, timings)
    core.poll(now)
    for key, seq, body in entries:
        core.on_reply(kv(key, seq, body), now)
    for subtree in subtrees:
        core.on_reply(kthxbai(sequence, subtree), now)
    assert core.phase is Phase.ACTIVE
    take(core)
    return core


def values(core: ClientCore) -> dict[bytes, bytes]:
    return {key: entry.value for key, entry in core.entries.items()}


def is_resync_of(acts: list[object], server: int, subtree: bytes = b"") -> bool:
    """A fresh snapshot on the connection in use (whose stream is live)."""
    del server  # no Connect: the same server, the same subscription
    return acts == [Request(subtree)]


# --------------------------------------------------------------------------
# construction and INITIAL
# --------------------------------------------------------------------------


def test_a_client_needs_a_server_and_a_subtree():
    with pytest.raises(LocalProtocolError):
        ClientCore(0)
    with pytest.raises(LocalProtocolError):
        ClientCore(1, subtrees=())


def test_initial_poll_connects_to_the_first_server_and_asks_for_a_snapshot():
    core = ClientCore(2)
    assert core.phase is Phase.INITIAL
    assert core.server == -1
    assert core.next_deadline() == 0.0
    core.poll(0.0)
    assert take(core) == ([Connect(0), Request(b"")], [])
    assert core.phase is Phase.SYNCING
    assert core.server == 0
    assert core.next_deadline() == 1.0  # request_timeout


def test_stream_messages_before_the_first_connect_are_ignored():
    core = ClientCore(1)
    core.on_update(kv(b"/k", 1, b"v"), 0.0)
    core.on_update(hugz(7), 0.0)
    assert take(core) == ([], [])
    assert core.phase is Phase.INITIAL
    core.poll(0.0)
    core.on_reply(kthxbai(0, b""), 0.0)
    assert core.entries == {}


# --------------------------------------------------------------------------
# snapshot
# --------------------------------------------------------------------------


def test_kvsyncs_and_kthxbai_make_the_client_active():
    core = ClientCore(2)
    core.poll(0.0)
    take(core)
    core.on_reply(kv(b"/a", 3, b"1"), 0.1)
    core.on_reply(kv(b"/b", 5, b"2"), 0.2)
    assert core.phase is Phase.SYNCING
    assert core.entries == {}  # a fresh map replaces the old one only when complete
    core.on_reply(kthxbai(7, b""), 0.3)
    assert core.phase is Phase.ACTIVE
    assert values(core) == {b"/a": b"1", b"/b": b"2"}
    assert core.entries[b"/a"].sequence == 3
    assert core.sequence == 7  # KTHXBAI's, not the newest entry's
    assert take(core) == ([], [Resynced(0, {b"/a": b"1", b"/b": b"2"})])
    assert core.next_deadline() == pytest.approx(2.3)  # 0.3 + silence_timeout


def test_updates_buffered_while_syncing_apply_only_if_newer_than_the_snapshot():
    core = ClientCore(1)
    core.poll(0.0)
    take(core)
    # The stream runs ahead of the snapshot reply: buffered, not applied yet.
    core.on_update(kv(b"/k", 4, b"older"), 0.0)
    core.on_update(kv(b"/k", 5, b"stale"), 0.0)
    core.on_update(kv(b"/n", 6, b"new"), 0.0)
    core.on_update(kv(b"/gone", 7), 0.0)
    assert core.entries == {}
    assert core.events == []
    core.on_reply(kv(b"/k", 5, b"snap"), 0.0)
    core.on_reply(kv(b"/gone", 2, b"x"), 0.0)
    core.on_reply(kthxbai(5, b""), 0.0)
    assert core.phase is Phase.ACTIVE
    # 4 and 5 are not newer than the snapshot (5): the snapshot's value stays.
    assert values(core) == {b"/k": b"snap", b"/n": b"new"}
    assert core.sequence == 7
    assert take(core) == ([], [Resynced(0, {b"/k": b"snap", b"/n": b"new"})])


def test_a_partial_snapshot_is_dropped_when_the_server_goes_quiet():
    core = synced([(b"/old", 1, b"o")], 1)
    core.poll(2.0)  # silence -> server 1
    take(core)
    core.on_reply(kv(b"/half", 2, b"h"), 2.5)
    core.poll(3.5)  # no KTHXBAI within request_timeout of the last reply
    assert values(core) == {b"/old": b"o"}  # the last good copy is kept


# --------------------------------------------------------------------------
# ACTIVE: applying the stream
# --------------------------------------------------------------------------


def test_active_applies_only_strictly_newer_sequences():
    core = synced([(b"/k", 5, b"snap")], 5)
    core.on_update(kv(b"/k", 5, b"same"), 0.5)
    assert take(core) == ([], [])
    assert values(core) == {b"/k": b"snap"}
    core.on_update(kv(b"/k", 6, b"new", properties={"owner": "me"}), 0.7)
    assert values(core) == {b"/k": b"new"}
    assert core.sequence == 6
    assert take(core) == ([], [Updated(b"/k", b"new", 6, {"owner": "me"})])
    core.on_update(kv(b"/k", 6, b"replayed"), 0.8)
    assert values(core) == {b"/k": b"new"}
    assert core.events == []


def test_an_empty_body_deletes_the_key_and_emits_deleted():
    core = synced([(b"/k", 1, b"v"), (b"/j", 2, b"w")], 2)
    core.on_update(kv(b"/k", 3), 0.5)
    assert values(core) == {b"/j": b"w"}
    assert core.sequence == 3
    assert take(core) == ([], [Deleted(b"/k", 3)])


# --------------------------------------------------------------------------
# SYNCING: request timeout, next server, back-off, never give up
# --------------------------------------------------------------------------


def test_no_reply_by_exactly_the_request_timeout_moves_to_the_next_server():
    core = ClientCore(2)
    core.poll(0.0)
    take(core)
    core.poll(0.999)
    assert take(core) == ([], [])
    core.poll(1.0)
    assert take(core) == ([Connect(1), Request(b"")], [])
    assert core.server == 1
    assert core.failovers == 0  # never synced: not a failover


def connect_times(core: ClientCore, connects: int) -> list[tuple[float, int]]:
    """Drive the core by its own deadlines until ``connects`` Connects."""
    seen: list[tuple[float, int]] = []
    for _ in range(connects * 3):
        now = core.next_deadline()
        core.poll(now - 0.001)  # never early
        assert core.actions == []
        core.poll(now)
        for action in actions(core):
            if isinstance(action, Connect):
                seen.append((now, action.server))
        if len(seen) == connects:
            return seen
    raise AssertionError("the core stopped connecting")


def test_a_failed_round_backs_off_doubling_up_to_the_cap():
    core = ClientCore(2)
    seen = connect_times(core, 14)
    assert [server for _, server in seen] == [0, 1] * 7
    starts = [t for t, server in seen if server == 0]
    # A round: server 0 at s, server 1 at s + 1, both silent until s + 2.
    assert [t for t, server in seen if server == 1] == [s + 1.0 for s in starts]
    gaps = [b - (a + 2.0) for a, b in itertools.pairwise(starts)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert starts[:4] == [0.0, 2.5, 5.5, 9.5]


def test_a_single_server_backs_off_after_every_failure():
    core = ClientCore(1)
    seen = connect_times(core, 5)
    assert seen == [(0.0, 0), (1.5, 0), (3.5, 0), (6.5, 0), (11.5, 0)]


def test_the_client_never_gives_up_asking():
    """The reference client stops after two requests per server (defect 6)."""
    core = ClientCore(2)
    seen = connect_times(core, 100)  # 50 whole rounds without one reply
    assert [server for _, server in seen] == [0, 1] * 50
    # still asking, every max_backoff + 2 request timeouts
    assert seen[-1][0] - seen[-3][0] == 7.0
    core.poll(core.next_deadline())
    core.poll(core.next_deadline())
    assert Connect(0) in core.actions
    assert Request(b"") in core.actions


def test_a_reply_resets_the_request_timeout():
    core = ClientCore(2)
    core.poll(0.0)
    take(core)
    core.on_reply(kv(b"/a", 1, b"x"), 0.8)
    assert core.next_deadline() == pytest.approx(1.8)
    core.poll(1.0)
    core.poll(1.799)
    assert take(core) == ([], [])
    core.on_reply(kv(b"/b", 2, b"y"), 1.799)  # still streaming: still alive
    core.poll(2.798)
    assert take(core) == ([], [])
    core.poll(2.799)
    assert take(core) == ([Connect(1), Request(b"")], [])


def test_a_successful_sync_starts_the_back_off_afresh():
    core = ClientCore(2)
    connect_times(core, 6)  # three rounds failed: the next delay would be 4
    now = core.next_deadline()
    assert core.server == 1
    core.on_reply(kthxbai(0, b""), now - 0.5)  # server 1 answers, late but alive
    assert core.phase is Phase.ACTIVE
    take(core)
    seen = connect_times(core, 4)
    silent_at = now - 0.5 + 2.0
    # failover to 0, then 1, then a first back-off of 0.5 again
    assert seen == [
        (silent_at, 0),
        (silent_at + 1, 1),
        (silent_at + 2.5, 0),
        (silent_at + 3.5, 1),
    ]


# --------------------------------------------------------------------------
# ACTIVE: silence, HUGZ, resync on gaps
# --------------------------------------------------------------------------


def test_silence_fails_over_to_the_next_server_at_exactly_the_timeout():
    core = synced(sequence=4)
    assert core.next_deadline() == 2.0
    core.poll(1.999)
    assert take(core) == ([], [])
    core.poll(2.0)
    assert take(core) == ([Connect(1), Request(b"")], [])
    assert core.phase is Phase.SYNCING
    assert core.failovers == 1
    core.on_reply(kthxbai(4, b""), 2.0)
    core.poll(4.0)
    assert take(core)[0] == [Connect(0), Request(b"")]  # round robin
    assert core.failovers == 2


def test_hugz_and_updates_keep_the_server_alive():
    core = synced(sequence=5)
    core.on_update(hugz(5), 1.5)
    core.poll(2.0)
    assert core.actions == []
    assert core.next_deadline() == 3.5
    core.on_update(kv(b"/k", 6, b"v"), 3.0)
    core.poll(4.999)
    assert core.actions == []
    core.poll(5.0)
    assert actions(core) == [Connect(1), Request(b"")]
    assert core.failovers == 1


def test_whole_tree_client_resyncs_on_a_hugz_ahead_of_it():
    core = synced(sequence=5)
    core.on_update(hugz(5), 0.5)
    assert take(core) == ([], [])
    core.on_update(hugz(6), 1.0)  # update 6 never reached us
    assert is_resync_of(actions(core), 0)  # the same server, again
    assert core.phase is Phase.SYNCING
    assert core.failovers == 0


def test_whole_tree_client_resyncs_on_an_update_that_skips_a_sequence():
    core = synced(sequence=5)
    core.on_update(kv(b"/a", 6, b"six"), 0.5)
    assert values(core) == {b"/a": b"six"}
    take(core)
    core.on_update(kv(b"/b", 8, b"eight"), 0.6)  # 7 is missing
    assert is_resync_of(actions(core), 0)
    assert b"/b" not in core.entries
    assert core.sequence == 6


def test_a_subtree_client_does_not_treat_gaps_as_missed_updates():
    # Updates to other subtrees take sequence numbers it never sees.
    core = synced(sequence=5, subtrees=[b"/a/"])
    core.on_update(hugz(5), 0.5)
    core.on_update(kv(b"/a/x", 9, b"nine"), 0.6)
    core.on_update(hugz(12), 1.0)
    acts, evts = take(core)
    assert acts == []
    assert evts == [Updated(b"/a/x", b"nine", 9, {})]
    assert core.phase is Phase.ACTIVE


# --------------------------------------------------------------------------
# the subscription-live rule
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "resync"),
    [
        pytest.param(hugz(7), True, id="hugz-after-snapshot"),
        pytest.param(hugz(5), False, id="hugz-at-snapshot"),
        pytest.param(kv(b"/u", 8, b"u"), True, id="update-skipping-after-snapshot"),
        pytest.param(kv(b"/u", 6, b"u"), False, id="update-right-after-snapshot"),
    ],
)
def test_first_stream_message_while_syncing_says_when_the_stream_went_live(
    first, resync
):
    core = ClientCore(2)
    core.poll(0.0)
    take(core)
    core.on_update(first, 0.1)  # the stream's first word, before KTHXBAI
    core.on_reply(kthxbai(5, b""), 0.2)
    acts, evts = take(core)
    assert isinstance(evts[0], Resynced)
    if resync:  # live only after 5: something in between may be lost
        assert is_resync_of(acts, 0)
        assert core.phase is Phase.SYNCING
    else:
        assert acts == []
        assert core.phase is Phase.ACTIVE


@pytest.mark.parametrize(
    ("first", "resync"),
    [
        pytest.param(hugz(7), True, id="hugz-after-snapshot"),
        pytest.param(hugz(5), False, id="hugz-at-snapshot"),
        pytest.param(kv(b"/a/u", 8, b"u"), True, id="update-skipping"),
        pytest.param(kv(b"/a/u", 6, b"u"), False, id="update-next"),
    ],
)
def test_first_stream_message_after_the_snapshot_can_force_a_resync(first, resync):
    core = synced(sequence=5, subtrees=[b"/a/"])
    core.on_update(first, 0.1)
    acts = actions(core)
    assert is_resync_of(acts, 0, b"/a/") is resync
    if not resync:
        assert acts == []
        # Only the first message decides: later ones may jump (other subtrees).
        core.on_update(hugz(40), 0.2)
        assert actions(core) == []


# --------------------------------------------------------------------------
# several subtrees
# --------------------------------------------------------------------------


def test_several_subtrees_are_requested_in_turn():
    core = ClientCore(1, [b"/a/", b"/b/"])
    core.poll(0.0)
    assert actions(core) == [Connect(0), Request(b"/a/")]
    core.on_reply(kv(b"/a/1", 2, b"a1"), 0.0)
    core.on_reply(kthxbai(4, b"/a/"), 0.0)
    assert actions(core) == [Request(b"/b/")]
    assert core.phase is Phase.SYNCING
    core.on_reply(kv(b"/b/1", 3, b"b1"), 0.0)
    core.on_reply(kthxbai(6, b"/b/"), 0.0)
    assert core.phase is Phase.ACTIVE
    assert values(core) == {b"/a/1": b"a1", b"/b/1": b"b1"}
    assert core.sequence == 4  # everything up to the oldest snapshot is applied
    assert events(core) == [Resynced(0, {b"/a/1": b"a1", b"/b/1": b"b1"})]


def test_buffered_updates_are_judged_against_their_own_subtrees_snapshot():
    core = ClientCore(1, [b"/a/", b"/b/"])
    core.poll(0.0)
    core.on_update(hugz(4), 0.0)
    core.on_reply(kthxbai(4, b"/a/"), 0.0)
    core.on_update(kv(b"/a/x", 5, b"a5"), 0.0)  # after /a/'s snapshot
    core.on_update(kv(b"/b/x", 6, b"b6"), 0.0)  # already in /b/'s snapshot
    core.on_reply(kv(b"/b/x", 6, b"b6-snap"), 0.0)
    core.on_reply(kthxbai(6, b"/b/"), 0.0)
    assert values(core) == {b"/a/x": b"a5", b"/b/x": b"b6-snap"}
    assert core.sequence == 6


def test_stream_keys_outside_the_subtrees_never_enter_the_map():
    core = synced(sequence=1, subtrees=[b"/a/", b"/b/"])
    core.on_update(kv(b"/c/x", 2, b"c"), 0.1)
    core.on_update(kv(b"/a/x", 3, b"a"), 0.2)
    assert values(core) == {b"/a/x": b"a"}
    assert events(core) == [Updated(b"/a/x", b"a", 3, {})]


def test_a_buffered_update_outside_the_subtrees_is_dropped():
    core = ClientCore(1, [b"/a/"])
    core.poll(0.0)
    core.on_update(hugz(1), 0.0)
    # b"HUGZZ" is a legal key; the SUB's "HUGZ" prefix subscription lets it in.
    core.on_update(kv(b"HUGZZ", 2, b"z"), 0.0)
    core.on_reply(kthxbai(1, b"/a/"), 0.0)
    assert core.phase is Phase.ACTIVE
    assert core.entries == {}


def test_snapshot_entries_outside_the_subtrees_never_enter_the_map():
    core = ClientCore(1, [b"/a/"])
    core.poll(0.0)
    core.on_reply(kv(b"/a/x", 1, b"a"), 0.0)
    core.on_reply(kv(b"/c/x", 2, b"c"), 0.0)
    core.on_reply(kthxbai(2, b"/a/"), 0.0)
    assert values(core) == {b"/a/x": b"a"}


def test_an_update_between_two_subtree_snapshots_read_late_is_applied():
    core = ClientCore(1, [b"/a/", b"/b/"])
    core.poll(0.0)
    core.on_update(hugz(5), 0.0)
    core.on_reply(kthxbai(5, b"/a/"), 0.0)
    # The server applies /a/x at 6, then answers the /b/ request at 6.  The
    # update sits on the SUB socket; the DEALER's reply is read first.
    core.on_reply(kthxbai(6, b"/b/"), 0.0)
    assert core.phase is Phase.ACTIVE
    core.on_update(kv(b"/a/x", 6, b"a6"), 0.0)
    assert values(core) == {b"/a/x": b"a6"}


# --------------------------------------------------------------------------
# writes
# --------------------------------------------------------------------------


def test_write_returns_a_uuid_and_queues_a_kvset_without_touching_the_map():
    core = synced([(b"/k", 1, b"old")], 1)
    uuid = core.write(b"/k", b"new", 0.5, ttl=5, properties={"owner": "me"})
    assert len(uuid) == 16
    acts, evts = take(core)
    assert evts == []
    (send,) = acts
    assert isinstance(send, Send)
    assert decode_kvmsg(send.frames) == KVMsg(
        b"/k", 0, uuid, {"owner": "me", "ttl": "5"}, b"new"
    )
    # The reference client writes its map at once (defect 8); we wait.
    assert values(core) == {b"/k": b"old"}
    fractional = core.write(b"/f", b"x", 0.5, ttl=2.5)
    (send,) = actions(core)
    assert decode_kvmsg(send.frames).properties == {"ttl": "2.500000"}
    assert fractional != uuid


def test_a_write_is_confirmed_when_its_uuid_comes_back_on_the_stream():
    core = synced(sequence=1)
    uuid = core.write(b"/k", b"v", 0.5)
    take(core)
    core.on_update(kv(b"/other", 2, b"o", uuid=uuidlib.uuid4().bytes), 0.6)
    assert all(not isinstance(e, Confirmed) for e in events(core))
    core.on_update(kv(b"/k", 3, b"v", uuid=uuid), 0.7)
    evts = events(core)
    assert Confirmed(uuid, 3) in evts
    assert Updated(b"/k", b"v", 3, {}) in evts
    assert values(core)[b"/k"] == b"v"
    assert core.writes == {}
    core.on_update(hugz(3), 1.6)
    core.poll(2.5)  # a resend would have been due at 1.5
    assert actions(core) == []


def test_a_write_is_confirmed_by_a_snapshot_that_holds_its_uuid():
    core = ClientCore(2)
    core.poll(0.0)
    take(core)
    uuid = core.write(b"/k", b"v", 0.1)  # while syncing: sent at once
    assert len(actions(core)) == 1
    core.on_reply(kv(b"/k", 4, b"v", uuid=uuid), 0.2)
    assert events(core) == []  # confirmed only once the snapshot is complete
    core.on_reply(kthxbai(4, b""), 0.2)
    acts, evts = take(core)
    assert acts == []  # confirmed: nothing to resend after the sync
    assert evts == [Confirmed(uuid, 4), Resynced(0, {b"/k": b"v"})]


def test_an_unconfirmed_write_is_resent_every_resend_interval():
    core = synced(sequence=1)
    core.write(b"/k", b"v", 0.5)
    (first,) = actions(core)
    assert core.next_deadline() == 1.5
    core.on_update(hugz(1), 1.0)  # keep the server alive
    core.poll(1.499)
    assert actions(core) == []
    core.poll(1.5)
    assert actions(core) == [first]  # the same frames, the same UUID
    core.on_update(hugz(1), 2.0)
    core.poll(2.499)
    assert actions(core) == []
    core.poll(2.5)
    assert actions(core) == [first]


def test_a_resend_is_due_exactly_when_next_deadline_says():
    # Found by the simulation (seed 2): 7.066877750069286 + 1.0 rounds to
    # 8.066877750069285, while 8.066877750069285 - 1.0 is below the send
    # time, so poll found nothing due at the deadline and the timer task
    # woke at the same instant for ever.
    core = synced(sequence=1)
    sent = 7.066877750069286
    core.on_update(hugz(1), sent)  # the server is alive: silence is later
    core.write(b"/k", b"v", sent)
    (first,) = actions(core)
    due = core.next_deadline()
    assert due == sent + 1.0 and due - 1.0 < sent
    core.poll(due)
    assert actions(core) == [first]
    assert core.next_deadline() > due


def test_the_write_horizon_is_due_exactly_when_next_deadline_says():
    core = synced(sequence=1)
    sent = 7.066877750069286
    uuid = core.write(b"/k", b"v", sent)
    take(core)
    horizon = sent + core.timings.write_horizon
    core.poll(horizon)
    assert Unconfirmed(uuid) in events(core)


def test_due_resends_go_out_in_the_order_written():
    core = synced(sequence=1)
    a = core.write(b"/k", b"a", 0.0)
    b = core.write(b"/k", b"b", 0.5)
    take(core)
    core.on_update(hugz(1), 1.0)
    core.poll(1.0)  # only a is due: now a was sent after b
    assert [decode_kvmsg(s.frames).uuid for s in actions(core)] == [a]
    core.on_update(hugz(1), 2.0)
    core.poll(2.0)  # both due, late: still in the order written
    assert [decode_kvmsg(s.frames).uuid for s in actions(core)] == [a, b]


def test_timers_look_only_at_the_writes_due(monkeypatch):
    """With thousands of unconfirmed writes, ``next_deadline`` and ``poll``
    read the send times of the few writes due, not of every write."""
    reads = itertools.count()

    class CountedWrite(client_module.Write):
        def __getattribute__(self, name: str) -> object:
            if name in ("first_sent", "sent_at"):
                next(reads)
            return super().__getattribute__(name)

    monkeypatch.setattr(client_module, "Write", CountedWrite)
    core = synced(sequence=1)
    tick = 2.0**-16  # exact in binary: no rounding at the boundaries
    uuids = [core.write(b"/k%d" % i, b"v", i * tick) for i in range(5000)]
    take(core)
    core.on_update(hugz(1), 0.5)
    before = next(reads)
    assert core.next_deadline() == 1.0
    core.poll(1.0 + 2 * tick)  # three writes due
    sent = [decode_kvmsg(s.frames).uuid for s in actions(core)]
    assert sent == uuids[:3]
    assert core.next_deadline() == 1.0 + 3 * tick
    assert next(reads) - before < 20


def test_an_unconfirmed_write_is_resent_right_after_a_failover():
    core = synced(sequence=1)
    core.write(b"/k", b"v", 0.5)
    (first,) = actions(core)
    core.on_update(hugz(1), 1.0)
    core.poll(1.5)
    assert actions(core) == [first]
    core.poll(3.0)  # silent since 1.0
    assert actions(core) == [Connect(1), Request(b"")]  # no resend while syncing
    core.poll(3.9)
    assert actions(core) == []
    core.on_reply(kthxbai(1, b""), 3.9)  # the backup never got it
    acts, evts = take(core)
    assert acts == [first]
    assert evts == [Resynced(1, {})]
    assert core.next_deadline() == pytest.approx(4.9)  # then on the usual interval


def test_an_unconfirmed_write_is_resent_after_a_resync_on_the_same_server():
    core = synced(sequence=1)
    core.write(b"/k", b"v", 0.2)
    (first,) = actions(core)
    core.on_update(hugz(3), 0.3)  # first message: live from 3 > 1 -> resync
    assert is_resync_of(actions(core), 0)
    core.on_reply(kthxbai(3, b""), 0.4)
    assert actions(core) == [first]


def test_forget_stops_the_resends():
    core = synced(sequence=1)
    uuid = core.write(b"/k", b"v", 0.5)
    take(core)
    core.forget(uuid)
    core.forget(uuid)  # twice is harmless
    core.on_update(hugz(1), 1.0)
    core.poll(1.5)
    assert actions(core) == []
    core.poll(3.0)  # failover: nothing resent after the sync either
    take(core)
    core.on_reply(kthxbai(1, b""), 3.0)
    assert actions(core) == []
    core.on_update(kv(b"/k", 2, b"v", uuid=uuid), 3.1)  # applied after all
    assert all(not isinstance(e, Confirmed) for e in events(core))


def test_a_write_outside_the_subtrees_cannot_be_confirmed():
    core = synced(sequence=1, subtrees=[b"/a/"])
    with pytest.raises(LocalProtocolError, match="outside"):
        core.write(b"/b/x", b"v", 0.5)
    assert core.actions == []
    uuid = core.write(b"/b/x", b"v", 0.5, confirm=False)
    (send,) = actions(core)
    assert decode_kvmsg(send.frames).uuid == uuid
    assert core.writes == {}  # fire and forget: never resent
    core.on_update(hugz(1), 1.0)
    core.poll(2.0)
    assert actions(core) == []


@pytest.mark.parametrize("key", [b"HUGZ", b"KTHXBAI"])
def test_reserved_keys_cannot_be_written(key):
    core = synced()
    with pytest.raises(LocalProtocolError, match="reserved"):
        core.write(key, b"v", 0.0)
    with pytest.raises(LocalProtocolError, match="reserved"):
        core.write(key, b"v", 0.0, confirm=False)
    assert core.actions == []
    assert core.writes == {}


@pytest.mark.parametrize("ttl", [0, -1.0, 1e-7, 0.0009])
def test_a_ttl_must_be_positive_and_not_so_short_it_would_read_as_never(ttl):
    core = synced()
    with pytest.raises(LocalProtocolError, match="ttl"):
        core.write(b"/k", b"v", 0.0, ttl=ttl)
    assert core.actions == []


def test_the_shortest_ttl_goes_out_as_a_number_above_0():
    core = synced()
    core.write(b"/k", b"v", 0.0, ttl=0.001)
    (send,) = [a for a in core.actions if isinstance(a, Send)]
    assert send.frames[3] == b"ttl=0.001000\n"


# --------------------------------------------------------------------------
# what the reference servers send
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param("1764300000.123456", id="python-absolute-seconds"),
        pytest.param("1764300000123", id="c-absolute-milliseconds"),
    ],
)
def test_kvsync_with_uuid_and_absolute_ttl_is_kept_as_properties(ttl):
    writer = uuidlib.uuid4().bytes
    core = ClientCore(1)
    core.poll(0.0)
    take(core)
    props = {"ttl": ttl, "owner": "svc"}
    core.on_reply(kv(b"/k", 3, b"v", uuid=writer, properties=props), 0.0)
    # reference KTHXBAI: a random UUID (the Python KVMsg makes one), no props
    core.on_reply(
        encode_kvmsg(KVMsg(b"KTHXBAI", 3, uuidlib.uuid4().bytes, {}, b"")), 0.0
    )
    assert core.phase is Phase.ACTIVE
    entry = core.entries[b"/k"]
    assert (entry.value, entry.sequence, entry.uuid) == (b"v", 3, writer)
    assert dict(entry.properties) == props
    assert core.actions == []  # no resync, no complaint


def test_a_reference_ttl_delete_carries_the_writers_uuid_and_properties():
    writer = uuidlib.uuid4().bytes
    core = synced([(b"/k", 3, b"v")], 3)
    core.on_update(
        kv(b"/k", 4, uuid=writer, properties={"ttl": "1764300000.123456"}), 0.5
    )
    assert take(core) == ([], [Deleted(b"/k", 4)])
    assert core.entries == {}


def test_hugz_with_sequence_zero_as_the_rfc_says_breaks_nothing():
    core = ClientCore(2)
    core.poll(0.0)
    core.on_update(hugz(0), 0.0)  # first word while syncing
    core.on_reply(kv(b"/k", 5, b"v"), 0.0)
    core.on_reply(kthxbai(5, b""), 0.0)
    assert core.phase is Phase.ACTIVE
    take(core)
    for t in (1.0, 2.0, 3.0):
        core.on_update(hugz(0), t)
    core.poll(4.999)
    assert take(core) == ([], [])  # kept alive, no resync
    assert core.sequence == 5
    core.on_update(kv(b"/k", 6, b"w"), 4.999)
    assert values(core) == {b"/k": b"w"}


def test_reference_hugz_with_a_random_uuid_confirms_nothing():
    core = synced(sequence=2)
    uuid = core.write(b"/k", b"v", 0.0)
    take(core)
    core.on_update(encode_kvmsg(KVMsg(b"HUGZ", 2, uuid, {}, b"")), 0.5)
    assert events(core) == []
    assert uuid in core.writes


def test_a_late_reply_while_active_is_ignored():
    core = synced([(b"/k", 1, b"v")], 1)
    deadline = core.next_deadline()
    core.on_reply(kv(b"/z", 9, b"late"), 0.5)
    core.on_reply(kthxbai(99, b""), 0.5)
    assert take(core) == ([], [])
    assert values(core) == {b"/k": b"v"}
    assert core.sequence == 1
    assert core.phase is Phase.ACTIVE
    assert core.next_deadline() == deadline  # a reply is not a sign of life


# --------------------------------------------------------------------------
# a server that lost or replaced its map (case 2)
# --------------------------------------------------------------------------

L1, L2 = "1" * 32, "2" * 32


def lineage_synced(
    entries: Sequence[tuple[bytes, int, bytes]], sequence: int, subtree: bytes = b""
) -> ClientCore:
    """Synced from a trioclone server whose map has lineage L1."""
    core = ClientCore(1, [subtree])
    core.poll(0.0)
    for key, seq, body in entries:
        core.on_reply(kv(key, seq, body), 0.0)
    core.on_reply(kthxbai(sequence, subtree, {"lineage": L1}), 0.0)
    assert core.phase is Phase.ACTIVE and core.lineage == L1
    take(core)
    return core


@pytest.mark.parametrize("subtree", [b"", b"/a/"])
def test_a_hugz_from_another_map_is_a_reset(subtree):
    core = lineage_synced([(b"/a/k", 3, b"old")], 5, subtree)
    core.on_update(hugz(5, {"lineage": L1}), 0.5)
    assert take(core) == ([], [])
    # The server restarted with a new, empty map, and already took 9 writes:
    # its sequence is past ours, so only the lineage tells.
    core.on_update(hugz(9, {"lineage": L2}), 1.0)
    assert actions(core) == [Request(subtree)]
    assert core.stats["resets"] == 1
    core.on_reply(kthxbai(9, subtree, {"lineage": L2}), 1.1)
    assert events(core) == [Resynced(0, {b"/a/k": None})]
    assert core.lineage == L2 and core.entries == {}


def test_a_hugz_from_another_branch_of_the_lineage_is_a_reset():
    # Found by the simulation: a subtree client stayed connected to the side
    # of a split that lost; that server resynced from the winner and took
    # over again later.  Same lineage, another history: only the branch
    # (where its active period started) tells.
    core = ClientCore(1, [b"/a/"])
    core.poll(0.0)
    core.on_reply(kv(b"/a/k", 3, b"old"), 0.0)
    core.on_reply(kthxbai(5, b"/a/", {"lineage": L1, "branch": "2"}), 0.0)
    take(core)
    core.on_update(hugz(5, {"lineage": L1, "branch": "2"}), 0.5)
    assert take(core) == ([], [])
    core.on_update(hugz(9, {"lineage": L1, "branch": "7"}), 1.0)
    assert actions(core) == [Request(b"/a/")]
    assert core.stats["resets"] == 1


def test_an_update_from_a_restarted_server_applied_before_its_hugz_is_undone():
    core = lineage_synced([(b"/k", 5, b"mine")], 5)
    # The new map's update 6 looks like the next one on the old stream...
    core.on_update(kv(b"/other", 6, b"theirs"), 0.5)
    assert values(core) == {b"/k": b"mine", b"/other": b"theirs"}
    take(core)
    # ...until its first HUGZ, at most one HUGZ interval later.
    core.on_update(hugz(6, {"lineage": L2}), 1.0)
    assert actions(core) == [Request(b"")]
    core.on_reply(kv(b"/other", 6, b"theirs"), 1.1)
    core.on_reply(kthxbai(6, b"", {"lineage": L2}), 1.1)
    assert values(core) == {b"/other": b"theirs"}
    assert events(core) == [Resynced(0, {b"/k": None})]


@pytest.mark.parametrize(
    ("subtree", "messages"),
    [
        pytest.param(b"", [kv(b"/k", 6, b"v"), kv(b"/k", 2, b"w")], id="update"),
        pytest.param(b"", [kv(b"/k", 6, b"v"), hugz(3)], id="hugz"),
        pytest.param(
            b"/a/", [hugz(5), kv(b"/a/x", 9, b"v"), kv(b"/a/y", 4, b"w")], id="sub"
        ),
    ],
)
def test_a_sequence_that_goes_backwards_is_a_reset(subtree, messages):
    """A Guide server sends no lineage: a restart shows as an old sequence."""
    core = synced(sequence=5, subtrees=[subtree], servers=1)
    for frames in messages:
        core.on_update(frames, 0.5)
    assert actions(core) == [Request(subtree)]
    assert core.stats["resets"] == 1


def test_the_rfc_hugz_with_sequence_zero_is_never_a_reset():
    core = synced(sequence=5, servers=1)
    core.on_update(kv(b"/k", 6, b"v"), 0.5)
    core.on_update(hugz(0), 0.6)
    assert actions(core) == []
    assert core.stats["resets"] == 0


def test_a_snapshot_from_another_map_than_the_stream_is_taken_again():
    core = ClientCore(1)
    core.poll(0.0)
    take(core)
    core.on_update(hugz(3, {"lineage": L1}), 0.1)
    core.on_reply(kthxbai(4, b"", {"lineage": L2}), 0.2)  # restarted between
    assert actions(core) == [Request(b"")]
    assert core.phase is Phase.SYNCING
    core.on_reply(kthxbai(4, b"", {"lineage": L2}), 0.3)
    assert core.phase is Phase.ACTIVE and core.lineage == L2


# --------------------------------------------------------------------------
# subtree heartbeats: a subtree client notices a missed update (case 4)
# --------------------------------------------------------------------------


def test_a_subtree_heartbeat_ahead_of_us_means_we_missed_an_update():
    core = synced(sequence=5, subtrees=[b"/a/"])
    core.on_update(hugz(5), 0.5)
    core.on_update(kv(b"/a/x", 9, b"nine"), 0.6)
    take(core)
    core.on_update(subtree_hugz(b"/a/", 9), 1.0)  # we have 9: fine
    core.on_update(subtree_hugz(b"/b/", 40), 1.0)  # another subtree's
    assert take(core) == ([], [])
    core.on_update(kv(b"/a/x", 14, b"fourteen"), 1.5)
    take(core)
    core.on_update(subtree_hugz(b"/a/", 17), 2.0)  # update 17 never came
    assert actions(core) == [Request(b"/a/")]
    assert core.stats["gaps"] == 1


def test_updates_missed_between_two_subtree_heartbeats_are_noticed():
    # Found by the flaky test_watchers_recover_from_updates_the_server_dropped:
    # a subtree watcher missed most of a flood (dropped at the publisher's
    # high-water mark) but received the last update under its subtree, so
    # "last" alone said nothing.  The count of updates published under the
    # subtree between two heartbeats does.
    core = synced(sequence=5, subtrees=[b"/a/"])
    core.on_update(subtree_hugz(b"/a/", 5, 100), 0.5)  # the baseline
    core.on_update(kv(b"/a/x", 6, b"six"), 0.6)
    core.on_update(kv(b"/a/y", 7, b"seven"), 0.7)
    take(core)
    core.on_update(subtree_hugz(b"/a/", 7, 102), 1.0)  # two published, two here
    assert take(core) == ([], [])
    core.on_update(kv(b"/a/x", 8, b"eight"), 1.1)  # then 9 and 10 are dropped
    core.on_update(kv(b"/a/y", 11, b"eleven"), 1.2)
    take(core)
    core.on_update(subtree_hugz(b"/a/", 11, 106), 2.0)  # four published, two here
    assert actions(core) == [Request(b"/a/")]
    assert core.stats["gaps"] == 1


def test_a_subtree_count_that_goes_down_means_we_may_have_missed_updates():
    # Found by the simulation (seed 1520): the client's connection reset, so
    # the server's only subscription to the subtree went away and came back
    # (counted from 0 again); the client had lost updates in flight, then
    # received the newest one: neither last nor the count's rise told.
    core = synced(sequence=5, subtrees=[b"/a/"])
    core.on_update(hugz(5), 0.4)
    core.on_update(subtree_hugz(b"/a/", 5, 91), 0.5)
    core.on_update(kv(b"/a/x", 9, b"nine"), 1.0)
    take(core)
    core.on_update(subtree_hugz(b"/a/", 9, 1), 1.5)
    assert actions(core) == [Request(b"/a/")]


def test_the_snapshot_count_is_where_the_subtree_count_starts():
    # The watcher stopped before the first heartbeat after its sync: the
    # count on the snapshot's KTHXBAI is the baseline.
    core = ClientCore(1, [b"/a/"])
    core.poll(0.0)
    core.on_reply(kv(b"/a/x", 5, b"five"), 0.1)
    core.on_reply(kthxbai(5, b"/a/", {"count": "40"}), 0.1)
    core.on_update(hugz(5), 0.5)  # the stream is live from the snapshot on
    take(core)
    core.on_update(kv(b"/a/y", 9, b"nine"), 1.0)  # 6 to 8 dropped
    take(core)
    core.on_update(subtree_hugz(b"/a/", 9, 44), 2.0)  # we hold the last, but
    assert actions(core) == [Request(b"/a/")]


def test_a_subtree_heartbeat_at_or_below_the_snapshot_says_nothing():
    core = synced(sequence=20, subtrees=[b"/a/", b"/b/"])
    core.on_update(subtree_hugz(b"/a/", 20), 0.5)
    core.on_update(subtree_hugz(b"/b/", 7), 0.5)
    assert take(core) == ([], [])


def test_subtree_heartbeats_never_reach_the_map_or_reset_anything():
    core = synced(sequence=5)  # a whole-map client sees every heartbeat
    core.on_update(subtree_hugz(b"/a/", 5), 0.5)
    core.on_update(subtree_hugz(b"/zzz/", 1), 0.5)
    assert take(core) == ([], [])
    assert core.entries == {} and core.stats["resets"] == 0


# --------------------------------------------------------------------------
# writes: the horizon, ttl=0, bad numbers (cases 3, 7, 10)
# --------------------------------------------------------------------------


def test_a_write_is_resent_until_its_horizon_then_reported_unconfirmed():
    timings = ClientTimings(resend_interval=1.0, write_horizon=5.0)
    core = synced(sequence=1, timings=timings, servers=1)
    uuid = core.write(b"/k", b"v", 0.0)
    take(core)
    resent = []
    now = 0.0
    for _ in range(100):
        now = core.next_deadline()
        core.on_update(hugz(1), now)  # the server stays alive
        core.poll(now)
        acts, evts = take(core)
        resent += [now] * len(acts)
        if evts or now >= 10.0:
            break
    else:
        raise AssertionError("the write was never reported")
    assert resent == [1.0, 2.0, 3.0, 4.0]
    assert (now, evts) == (5.0, [Unconfirmed(uuid)])
    assert core.writes == {}


def test_a_write_without_ttl_says_ttl_0_for_the_guides_c_servers():
    core = synced()
    core.write(b"/k", b"v", 0.0)
    (send,) = actions(core)
    assert send.frames[3] == b"ttl=0\n"


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), -float("inf")])
def test_a_ttl_must_be_finite(ttl):
    core = synced()
    with pytest.raises(LocalProtocolError, match="ttl"):
        core.write(b"/k", b"v", 0.0, ttl=ttl)
    assert core.actions == []


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "name",
    [
        "request_timeout",
        "silence_timeout",
        "backoff",
        "max_backoff",
        "resend_interval",
        "write_horizon",
    ],
)
def test_client_timings_reject_what_makes_no_sense(name, value):
    with pytest.raises(LocalProtocolError, match=name):
        ClientTimings(**{name: value})


def test_a_reset_while_a_reply_is_due_asks_again_on_a_new_connection():
    """A reset in the middle of a snapshot: the rest of that reply may still
    come on this DEALER (or never, from a restarted server), so the client
    asks again on a new connection, whose replies answer the new request
    (the shell hands on nothing from the old one)."""
    core = ClientCore(1)
    core.poll(0.0)
    take(core)
    core.on_update(hugz(3, {"lineage": L1}), 0.0)
    core.on_reply(kv(b"/old/1", 2, b"o"), 0.1)
    core.on_update(hugz(1, {"lineage": L2}), 0.2)  # restarted meanwhile
    assert actions(core) == [Connect(0), Request(b"")]
    core.on_reply(kv(b"/new", 1, b"n"), 0.4)
    core.on_reply(kthxbai(1, b"", {"lineage": L2}), 0.4)
    assert core.phase is Phase.ACTIVE
    assert values(core) == {b"/new": b"n"} and core.lineage == L2


def test_a_reset_in_the_stream_with_no_reply_due_keeps_the_connection():
    """A Guide server (no lineage) restarts after the snapshot: the sequence
    goes backwards, a reset; no reply is due, so the same DEALER asks."""
    core = synced([(b"/k", 5, b"v")], 5, servers=1)
    core.on_update(kv(b"/x", 6, b"x"), 0.15)
    core.on_update(kv(b"/fresh", 1, b"f"), 0.2)  # backwards: restarted
    assert actions(core) == [Request(b"")]
    core.on_reply(kv(b"/fresh", 1, b"f"), 0.4)
    core.on_reply(kthxbai(1, b""), 0.4)
    assert values(core) == {b"/fresh": b"f"} and core.sequence == 1

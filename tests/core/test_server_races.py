"""Races at a takeover, a split heal and between sync attempts, found by
reading the simulation's fixes as an adversary: each test failed before its
fix (the "Finding" named in each is the review's)."""

from __future__ import annotations

from tests.core.test_client_core import kv, take
from tests.core.test_server_core import (
    U1,
    U2,
    _uuid,
    exchange_hugz,
    heartbeat,
    kvpub,
    kvset,
    passive_core,
    run,
    split_pair,
    state,
    take_over,
)
from trioclone.core.bstar import State
from trioclone.core.chp import decode_kvmsg, hugz, kthxbai, map_of
from trioclone.core.client import ClientCore, Phase
from trioclone.core.server import Role


def test_a_write_the_active_applied_last_survives_the_takeover() -> None:
    """Finding 1 (461c53e).  Two clients write /k.  C2 issues U2 first, C1
    issues U1 just after; C1's pipe to the passive is faster, C2's to the
    active is.  So the passive collects U1 then U2, the active applies U2 (1)
    then U1 (2).  C1 hears update 2: confirmed, never resent.  The active
    dies before the passive hears 2.  The passive received U1 from its
    client, so the README promises it is not lost; the 'arrived after' rule
    drops it and /k goes back to U2, issued before U1."""
    core = passive_core(0)
    core.collect(kvset(b"/k", b"c1", U1), 1.0)
    core.collect(kvset(b"/k", b"c2", U2), 1.1)
    core.on_update(kvpub(b"/k", 1, b"c2", U2), 1.2)
    take_over(core, 2.0)
    assert core.store.get(b"/k").body == b"c1"


def test_the_window_hand_over_is_resent_like_the_records() -> None:
    """Finding 2 (149ffe0): the window goes out once, at step-down, the
    moment the relay PUB is least likely to be connected to the winner's
    collector ("the first send can be lost while the link comes up"); the
    records are resent every second, the window never.  Lost once, a late
    copy of a write the loser replaced comes back at the winner."""
    primary, backup = split_pair()
    first, second = kvset(b"/k", b"one", _uuid(40)), kvset(b"/k", b"two", _uuid(41))
    backup.collect(first, 11.0)
    backup.collect(second, 11.5)
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    run(backup, 20.0)
    backup.relays.clear()  # the first sends are lost: the link is coming up
    for now in (21.0, 22.0, 23.0):
        backup.poll(now)
        for frames in backup.relays:
            primary.collect(frames, now)
        backup.relays.clear()
    assert primary.store.get(b"/k").body == b"two"
    primary.collect(first, 24.0)  # the late copy
    assert primary.store.get(b"/k").body == b"two"


def test_hugz_during_a_takeover_speak_for_the_map_the_kthxbai_will() -> None:
    """Finding 3 (149ffe0): the shell sends HUGZ from the moment the role
    is ACTIVE, but ``branch`` is set only when the takeover's catch-up is
    done.  A client that failed over and subscribed hears the old branch,
    then a KTHXBAI with the new one: it throws the whole snapshot away and
    takes it again (every client, at every multi-step takeover)."""
    core = passive_core(5)
    core.on_peer_state(state(State.PRIMARY), 2.0)
    assert core.role is Role.ACTIVE and core.busy
    early = core.hugz()  # _send_hugz runs as soon as the ACTIVE scope starts
    run(core, 2.0)
    end = core.kthxbai(b"")
    client = ClientCore(1)
    client.poll(2.0)
    take(client)
    client.on_update(early, 2.1)
    client.on_reply(end, 2.2)
    assert client.phase is Phase.ACTIVE, (
        map_of(decode_kvmsg(early)),
        map_of(decode_kvmsg(end)),
    )


def test_a_pair_server_without_branch_on_kthxbai_is_no_reset_loop() -> None:
    """Finding 4 (149ffe0, compatibility): a pair server from before this
    change sends ``branch`` on HUGZ only.  A new client then resets at
    every HUGZ, for ever."""
    client = ClientCore(1)
    client.poll(0.0)
    take(client)
    client.on_reply(kthxbai(5, b"", {"lineage": "1" * 32}), 0.1)
    assert client.phase is Phase.ACTIVE
    for n in range(3):
        client.on_update(hugz(5, {"lineage": "1" * 32, "branch": "0"}), 1.0 + n)
    assert client.stats["resets"] == 0


def test_a_stale_backlog_from_a_guide_server_that_restarted_is_not_applied() -> None:
    """Finding 5 (6460a21): one Guide server (no lineage).  A sync attempt
    times out; backing off, the client hears the server apply its write at
    100; the server restarts empty (its HUGZ, sequence 1, go backwards:
    ignored while backing off).  The next snapshot (sequence 1) takes the
    old update on top: the write is 'confirmed' and never resent, the map
    briefly mixes two maps, and the gap only then forces a new snapshot
    without it."""
    client = ClientCore(1)
    client.poll(0.0)
    uuid = client.write(b"/k", b"mine", 0.1)
    client.poll(1.0)  # no reply: back off
    assert client.phase is Phase.INITIAL
    client.on_update(kv(b"/k", 100, b"mine", uuid=uuid), 1.1)
    client.on_update(hugz(100), 1.2)
    client.on_update(hugz(1), 1.3)  # restarted: its sequence went backwards
    client.poll(1.5)
    take(client)
    client.on_reply(kv(b"/x", 1, b"new", uuid=_uuid(9)), 1.6)
    client.on_reply(kthxbai(1, b""), 1.6)
    assert b"/k" not in client.entries
    assert uuid in client.writes  # still unconfirmed: it will be resent


def test_a_late_copy_of_an_expired_write_spared_at_the_winner_is_a_repeat() -> None:
    """Finding 6 (149ffe0): the loser's TTL value X expired; the winner
    wrote /k after the fork (C, confirmed), so the expiry hand-over is
    spared.  X's UUID is left out of the window (it is a tombstone's) and
    the spared hand-over is dropped without remembering it: a late copy of
    X (the seed-30 pipe) then replaces C, and lives a fresh TTL."""
    primary, backup = split_pair()
    brief = kvset(b"/k", b"brief", _uuid(43), {"ttl": "1"})
    backup.collect(brief, 11.5)
    assert [f[0] for f in backup.expire(13.0)] == [b"/k"]
    assert primary.collect(kvset(b"/k", b"newer", _uuid(44)), 14.0) is not None
    exchange_hugz(primary, backup, 20.0)
    heartbeat(primary, backup, 20.0)
    run(backup, 20.0)
    for frames in backup.relays:
        primary.collect(frames, 20.1)
    assert primary.stats["handoff_superseded"] == 1
    primary.collect(brief, 21.0)  # the late copy
    assert primary.store.get(b"/k").body == b"newer"

"""The status request against running servers, in one process over
inproc:// with the autojump clock: answered in every role, never a vote,
never queued behind snapshots; a malformed one is rejected."""

from __future__ import annotations

import trio
import zmq

from tests.chp import RawClient, settle, unique
from tests.shells.pair import pair_settings, start, started_pair
from trioclone import __version__
from trioclone._zmq import Sockets
from trioclone.client.status import ask_all, ask_status
from trioclone.core.bstar import State
from trioclone.core.chp import ICANHAZ, encode_request
from trioclone.core.status import (
    RULE_STATUS_REQUEST,
    STATUS_REQUEST,
    decode_status_reply,
    encode_status_request,
)
from trioclone.endpoints import Endpoints
from trioclone.server.clone import CloneServer
from trioclone.server.settings import ServerSettings


async def test_status_of_a_running_pair_tells_the_active_from_the_passive(
    context, autojump_clock
):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (p, b), primary, _backup, _ = await started_pair(nursery, context)
            started = trio.current_time()
            with Sockets(context) as sockets:
                writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
                await settle()
                for i in range(7):
                    writer.set(b"/k/%d" % i, b"v")
                await writer.updates(7)
                await settle()
            await trio.sleep(0.5)
            active, passive = await ask_all([p.bind, b.bind], 1.0, context)
            assert trio.current_time() == started + 0.5  # answered at once
            a, s = active.status, passive.status
            assert a is not None and s is not None
            assert active.active and not passive.active
            assert (a["name"], a["state"], a["role"]) == ("primary", "ACTIVE", "active")
            assert (s["name"], s["state"], s["role"]) == (
                "backup",
                "PASSIVE",
                "passive",
            )
            for status in (a, s):
                assert status["pair"] is True and status["synced"] is True
                assert status["sequence"] == 7 and status["keys"] == 7
                assert status["lineage"] == primary.server.core.lineage
                assert status["pending"] == 0
                assert status["peer_state"] in ("ACTIVE", "PASSIVE")
                assert 0 <= status["peer_heartbeat_age"] <= 1.0
                assert status["peer_expired"] is False
                assert status["version"] == __version__
                assert status["uptime"] >= trio.current_time() - started > 0
                assert status["data_dir"] is None and status["fsync"] is None
            assert a["peer_state"] == "PASSIVE" and s["peer_state"] == "ACTIVE"
            assert a["counters"]["updates"] == 7
            assert a["counters"]["status_requests"] == 1
            # the passive's syncs served by the active (snapshot, then window)
            assert a["counters"]["snapshots_served"] >= 2
            nursery.cancel_scope.cancel()


async def test_a_status_request_is_never_a_vote(context, autojump_clock):
    """A passive whose peer died stays passive however often it is asked
    (an ICANHAZ would make it active), and says so."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (_p, b), primary, backup, _ = await started_pair(nursery, context)
            primary.kill()
            await trio.sleep(5.0)  # the peer expired 2 s after its last beat
            with Sockets(context) as sockets:
                for _ in range(10):
                    answer = await ask_status(sockets, b.bind, 1.0)
                    assert answer.status is not None
                    assert answer.status["state"] == "PASSIVE"
                    assert answer.status["peer_expired"] is True
                    assert answer.status["peer_heartbeat_age"] >= 5.0
                    await trio.sleep(0.5)
                assert backup.server.state.value == State.PASSIVE
                assert backup.server.core.stats["status_requests"] == 10
                # The same server takes a client's snapshot request as a vote.
                client = RawClient(sockets, b.bind)
                await settle()
                await client.snapshot()
                assert backup.server.state.value == State.ACTIVE
                after = await ask_status(sockets, b.bind, 1.0)
                assert after.status is not None
                assert after.status["state"] == "ACTIVE"
                assert after.status["counters"]["takeovers"] == 1
            nursery.cancel_scope.cancel()


async def test_status_is_answered_before_a_pair_decided_and_standalone(
    context, autojump_clock
):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            settings = pair_settings()
            await start(nursery, settings[0], context)  # no backup: PRIMARY waits
            alone = ServerSettings(Endpoints.inproc(unique("alone")))
            await nursery.start(CloneServer(alone, context=context).run)
            first, second = await ask_all([settings[0].bind, alone.bind], 1.0, context)
            assert first.status is not None and second.status is not None
            assert first.status["state"] == "PRIMARY"
            assert first.status["role"] == "waiting"
            assert first.status["peer_state"] is None
            assert first.status["peer_heartbeat_age"] is None
            assert second.status["state"] == "ACTIVE"
            assert second.status["pair"] is False
            assert second.status["peer_expired"] is None
            nursery.cancel_scope.cancel()


async def test_status_is_answered_in_the_middle_of_a_takeover(context, autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (_p, b), primary, backup, _ = await started_pair(nursery, context)
            primary.kill()
            with Sockets(context) as sockets:
                writer = RawClient(sockets, b.bind)
                await settle()
                for i in range(5000):  # held on the pending list: replayed later
                    writer.set(b"/late/%d" % i, b"v")
                    if i % 500 == 499:
                        await settle()
                await settle()
                assert len(backup.server.core.pending) == 5000
                await trio.sleep(3.0)
                dealer = sockets.open(zmq.DEALER, connect=[b.bind.snapshot])
                await settle()
                # In order on one connection, in the server's next batch: the
                # vote starts the takeover, and the status request is answered
                # while it runs, before the snapshot that waits for it.
                assert dealer.try_send(encode_request(b""))
                assert dealer.try_send(encode_status_request())
                status = decode_status_reply(await dealer.receive())
                assert status["state"] == "ACTIVE" and status["role"] == "active"
                assert status["serving"] is False
                assert backup.server.core.busy
                assert status["pending"] > 0  # the replay has not finished
                entries = []
                while (frames := await dealer.receive())[0] != b"KTHXBAI":
                    entries.append(frames[0])
                assert len(entries) == 5000
                assert not backup.server.core.busy
            nursery.cancel_scope.cancel()


async def test_status_is_not_queued_behind_a_stuck_snapshot(context, autojump_clock):
    settings = ServerSettings(Endpoints.inproc(unique("stuck")), snapshot_stall=30.0)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(CloneServer(settings, context=context).run)
            with Sockets(context) as sockets:
                writer = RawClient(sockets, settings.bind)
                await settle()
                for n in range(25_000):
                    writer.set(b"/k/%05d" % n, b"x" * 100)
                    if n % 500 == 499:
                        await settle()
                await writer.updates(25_000)
                stuck = sockets.open(zmq.DEALER, connect=[settings.bind.snapshot])
                await settle()
                await stuck.send([ICANHAZ, b""])  # and never reads
                await settle()
                asked = trio.current_time()
                answer = await ask_status(sockets, settings.bind, 1.0)
                assert trio.current_time() == asked
                assert answer.status is not None
                assert answer.status["snapshot_transfers"] == 1
                assert answer.status["keys"] == 25_000
            nursery.cancel_scope.cancel()


async def test_a_malformed_status_request_is_rejected_and_changes_nothing(
    context, autojump_clock, caplog
):
    settings = ServerSettings(Endpoints.inproc(unique("bad-status")))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: CloneServer = await nursery.start(
                CloneServer(settings, context=context).run
            )
            with Sockets(context) as sockets:
                writer = RawClient(sockets, settings.bind)
                await settle()
                writer.set(b"/a", b"1")
                await writer.updates(1)
                dealer = sockets.open(zmq.DEALER, connect=[settings.bind.snapshot])
                await settle()
                for extra in ([b""], [b"x", b"y"]):
                    await dealer.send([STATUS_REQUEST, *extra])
                await settle()
                with trio.move_on_after(5):
                    await dealer.receive()
                    raise AssertionError("a malformed status request was answered")
                assert server.core.stats["rejected"] == 2
                assert server.rejected_rules == {("snapshot", RULE_STATUS_REQUEST): 2}
                assert "status_requests" not in server.core.stats
                assert any(
                    RULE_STATUS_REQUEST in r.getMessage() for r in caplog.records
                )
                # The server still answers, and its map did not change.
                answer = await ask_status(sockets, settings.bind, 1.0)
                assert answer.status is not None
                assert answer.status["rejected"] == {"snapshot": 2}
                assert answer.status["sequence"] == 1 and answer.status["keys"] == 1
            nursery.cancel_scope.cancel()

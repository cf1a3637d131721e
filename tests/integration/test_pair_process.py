"""A Binary Star pair as two real processes: failover loses no update.

The scenario of the issue's "done when": a steady writer sends every update
to both collectors (as the Guide's client does) while a subscriber records
what the primary publishes; the primary is SIGKILLed mid-stream; a client
fails over by voting on the backup every second until it holds a snapshot.
Then the double failover: the restarted primary comes back passive, syncs,
and takes over again when the backup is killed.

Real clock, bounds with margin: failover is expected near the peer expiry
(2 heartbeats) plus up to one vote interval (1 s).
"""

from __future__ import annotations

import time

import pytest
import zmq

from tests.integration.procs import (
    DEFAULT_TIMING,
    FAST_TIMING,
    ICANHAZ,
    Pair,
    Processes,
    open_socket,
    recv,
    request_snapshot,
    vote_until_snapshot,
)

pytestmark = pytest.mark.slow
TIME_LIMIT = 75  # seconds, for the procs fixture

TIMINGS = [
    pytest.param(DEFAULT_TIMING, 6.0, id="heartbeat-1.0"),
    pytest.param(FAST_TIMING, 3.0, id="heartbeat-0.2"),
]


@pytest.mark.parametrize(("timing", "bound"), TIMINGS)
def test_failover_loses_no_published_update_then_double_failover(
    procs: Processes, timing: tuple[str, ...], bound: float
) -> None:
    with Pair(procs, timing) as pair:
        primary, backup = pair.start()
        pair.probe(pair.sub_primary)

        # -- first failover: SIGKILL the primary mid-stream ------------------
        run = pair.stream_and_kill(primary, vote_port=pair.p2, before=1.0, after=0.5)
        assert not primary.alive
        assert run.snapshot is not None and run.failover is not None, (
            f"no snapshot from the backup after {run.votes} votes:\n"
            + backup.log()[-3000:]
        )
        assert len(run.from_primary) > 100, "the primary published too little"
        assert run.written_after_kill, "nothing was written after the kill"
        assert run.lost(run.snapshot) == [], "published updates missing after failover"
        assert run.failover < bound, f"failover took {run.failover:.2f} s"
        assert run.votes >= 2, "the backup answered a vote while its peer was fresh"

        # Writes after the kill reached only the backup (its pending list) and
        # are applied and published at takeover.
        later = set(run.written_after_kill)
        missing = later - run.snapshot.entries.keys()
        deadline = time.monotonic() + 3.0
        while missing and time.monotonic() < deadline:
            snapshot = request_snapshot(pair.ctx, pair.p2)
            if snapshot is not None:
                missing = later - snapshot.entries.keys()
        assert not missing, f"{len(missing)} writes sent after the kill are lost"
        unpublished = {k for k in later if run.from_backup.get(k) != pair.known[k]}
        assert not unpublished, "takeover did not publish the pending updates"
        final = request_snapshot(pair.ctx, pair.p2)
        assert final is not None
        assert final.values() == pair.known, "the backup's map is not the whole map"

        # -- the primary comes back PASSIVE and must not answer ---------------
        restarted = pair.start_primary("primary-restarted", "--status-interval", "0.1")
        assert_unanswered(pair, pair.p1, seconds=2.5)
        assert restarted.wait_for_log("-> PASSIVE", 10), restarted.log()[-2000:]
        synced = restarted.wait_for_log("synced from the active", 10)
        assert synced, restarted.log()[-2000:]
        assert_unanswered(pair, pair.p1, seconds=0.5)
        # More writes while the backup is active: the passive primary mirrors them.
        pair.probe(pair.sub_backup)
        pair.write_until_seen(b"/late", 100, pair.sub_backup)
        # Every write has been published (the last ones just now); the
        # passive must have mirrored all of it before the active dies: its
        # sequence is the active's and nothing waits in its pending list.
        active = request_snapshot(pair.ctx, pair.p2)
        assert active is not None
        assert active.values() == pair.known, "the active's map is not the whole map"
        mirrored = restarted.wait_for_status(
            10, state="PASSIVE", sequence=active.sequence, pending=0
        )
        assert mirrored, restarted.log()[-2000:]

        # -- second failover: SIGKILL the backup, vote on the primary ---------
        procs.kill(backup)
        snapshot, elapsed, votes = vote_until_snapshot(pair.ctx, pair.p1, every=1.0)
        assert elapsed < bound, f"second failover took {elapsed:.2f} s ({votes} votes)"
        assert snapshot.values() == pair.known, "the primary's map is not the whole map"
        assert restarted.alive


def assert_unanswered(pair: Pair, port: int, seconds: float) -> None:
    """Votes every 0.5 s for ``seconds``: none may be answered."""
    dealer = open_socket(pair.ctx, zmq.DEALER, [port])
    try:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            dealer.send_multipart([ICANHAZ, b""])
            reply = recv(dealer, min(left, 0.5))
            assert reply is None, f"a passive server answered a vote: {reply[:2]!r}"
    finally:
        dealer.close(linger=0)


def test_killing_the_backup_does_not_interrupt_the_primary(procs: Processes) -> None:
    with Pair(procs) as pair:
        primary, backup = pair.start()
        pair.probe(pair.sub_primary)

        run = pair.stream_and_kill(backup, before=1.0, after=1.5)
        assert not backup.alive
        assert run.kill_time is not None
        assert primary.alive
        # Every write was published by the primary, before and after the kill,
        # with consecutive sequence numbers and no long silence.
        streamed = {k: v for k, v in run.from_primary.items() if k.startswith(b"/w/")}
        assert streamed == run.written
        sequences = run.primary_sequences
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
        silence = run.max_silence(after=run.kill_time - 0.5)
        assert silence < 1.0, f"the primary went quiet for {silence:.2f} s"
        snapshot = request_snapshot(pair.ctx, pair.p1, timeout=2.0)
        assert snapshot is not None, "the primary stopped answering snapshots"
        assert snapshot.values() == pair.known
        assert snapshot.sequence == sequences[-1]
        log = primary.log()
        assert "-> PASSIVE" not in log and "fault" not in log

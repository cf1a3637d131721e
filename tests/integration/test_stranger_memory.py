"""What a stranger can make a server hold or spend, found by live fuzzing
(``test_fuzz_live.py``), each as its smallest case against real processes.

* A passive did not read its publisher: every connection a subscriber made
  to it stayed in its memory, with all it sent, for as long as it was
  passive.
* A snapshot request for a subtree makes the server track the subtree for
  subtree heartbeats, and nothing forgets it if its client never
  subscribes: the heartbeats go to every whole-map subscriber once a HUGZ
  interval, for ever, as large as the subtree the stranger named.
* libzmq does the work of a subscription in the server's event loop, about
  0.2 s a megabyte: a few large ones stop its heartbeats.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from tests.integration.procs import (
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    Pair,
    Processes,
    kvset,
    open_socket,
    recv,
    start_standalone,
    tcp,
    wait_snapshot,
    zmq_context,
)
from tests.integration.test_fuzz_live import raw_xsub

pytestmark = pytest.mark.slow
Context = zmq.Context[zmq.Socket[bytes]]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_passive_frees_the_connections_of_subscribers_that_went_away(
    procs: Processes,
) -> None:
    """Five strangers in turn connect an XSUB to the passive's publisher,
    send it 1,000 messages of 50 KB (its receive high-water mark), and go
    away.  Before the fix, each connection stayed in the passive's memory
    with the 50 MB it sent: +200 MB between the first and the last."""
    with Pair(procs, ("--hugz", "0.2")) as pair:
        _primary, backup = pair.start()
        blob = b"\x02" + b"x" * 50_000  # not a subscription: rejected
        after_first = 0.0
        for round_ in range(5):
            xsub = pair.ctx.socket(zmq.XSUB)
            try:
                xsub.setsockopt(zmq.SNDHWM, 0)
                xsub.connect(tcp(pair.p2 + 1))
                time.sleep(0.3)  # connected (an XSUB drops what it sends before)
                for _ in range(1000):
                    xsub.send(blob)
                time.sleep(1.5)  # the server takes it in (and reads it)
            finally:
                xsub.close(linger=0)
            time.sleep(0.5)
            if round_ == 0:
                after_first = rss_mb(backup.pid)
        growth = rss_mb(backup.pid) - after_first
        assert backup.alive
        assert growth < 60, f"the passive grew by {growth:.0f} MB in four rounds"
        assert "rejected on the publisher socket" in backup.log()


def test_heartbeats_for_a_subtree_nobody_subscribed_to_stop(
    procs: Processes, ctx: Context
) -> None:
    """A stranger asks for snapshots of 20 subtrees of 100 KB each (2 MB,
    once), reads the replies and goes away; it never subscribed.  The
    server tracks each subtree when it serves its snapshot, and only an
    unsubscription forgets one: so it publishes 20 heartbeats of 100 KB to
    every whole-map subscriber each HUGZ interval, for ever (2 MB a
    second at the default 1 s; 10 MB with ``--hugz 0.2``).  10,000 such
    subtrees are tracked before the limit; nothing bounds their size.

    Here: no heartbeat for those subtrees 3 s (15 HUGZ intervals) after
    their only client left.  Fails today."""
    server = start_standalone(procs, "--hugz", "0.2")
    assert server.port is not None
    port = server.port
    wait_snapshot(ctx, port)
    writer = open_socket(ctx, zmq.PUB, [port + 2])
    watcher = open_socket(ctx, zmq.SUB, [port + 1], [b""])  # a whole-map client
    for _ in range(50):  # a write, so that tracked subtrees have a sequence
        writer.send_multipart(kvset(b"/a", b"1"))
        frames = recv(watcher, 0.1)
        if frames is not None and frames[0] == b"/a":
            break
    else:
        raise TimeoutError("the write never came back")

    subtrees = [b"/big/%02d/" % n + b"y" * 100_000 for n in range(20)]
    stranger = open_socket(ctx, zmq.DEALER, [port])
    for subtree in subtrees:
        stranger.send_multipart([ICANHAZ, subtree])
    ends = 0
    while ends < len(subtrees) and (frames := recv(stranger, 5.0)) is not None:
        ends += frames[0] == KTHXBAI
    assert ends == len(subtrees), "the snapshots were not served"
    stranger.close(linger=0)

    time.sleep(3.0)
    while recv(watcher, 0) is not None:
        pass  # what came meanwhile
    deadline, seen, size = time.monotonic() + 1.0, set(), 0
    while (frames := recv(watcher, deadline - time.monotonic())) is not None:
        if frames[0] != HUGZ and frames[0].startswith(b"/big/"):
            seen.add(frames[0][:8])
            size += sum(map(len, frames))
    assert server.alive
    assert not seen, (
        f"3 s after their only client left, the server still sends heartbeats "
        f"for {len(seen)} subtrees nobody subscribed to: {size:,} bytes in 1 s"
    )


def test_large_subscriptions_do_not_stall_the_server(procs: Processes) -> None:
    """A stranger sends the publisher (an XSUB's subscriptions) four
    subscriptions of 1 MB, then goes away.  libzmq does the work of each
    (a node per byte, made and then freed) in the socket's thread: the
    server's event loop, about 0.2 s a megabyte here.  Live fuzzing met
    several in a row: HUGZ and Binary Star heartbeats stopped for over 2 s,
    the backup took a client's vote for one while the primary lived, and
    the pair went dual active.  Here: HUGZ every 0.1 s must not stop for
    more than 0.5 s.  Fails today (about 0.9 s)."""
    server = start_standalone(procs, "--hugz", "0.1")
    assert server.port is not None
    port = server.port
    with zmq_context() as ctx:
        wait_snapshot(ctx, port)
        watcher = open_socket(ctx, zmq.SUB, [port + 1], [HUGZ])
        assert recv(watcher, 2.0) is not None
        stranger = threading.Thread(
            target=raw_xsub,
            args=(port + 1, [[b"\x01" + bytes([n]) * 1_000_000] for n in range(4)]),
        )
        stranger.start()
        longest, last = 0.0, time.monotonic()
        deadline = last + 4.0
        while (frames := recv(watcher, deadline - time.monotonic())) is not None:
            now = time.monotonic()
            if frames[0] == HUGZ:
                longest, last = max(longest, now - last), now
        stranger.join(5.0)
    assert server.alive
    assert longest < 0.5, f"no HUGZ for {longest:.2f} s (every 0.1 s)"

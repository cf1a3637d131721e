"""Failover of a trioclone pair, and an idle pair that must not flap.

``failover``: a steady writer (~1,000/s) sends to both collectors; a client
subscribed to the primary records every key published; the primary gets
SIGKILL; a client then votes (ICANHAZ on one DEALER) on the backup every
0.2 s until a KTHXBAI comes.  Reported: kill -> KTHXBAI, votes sent, and the
keys seen from the primary that the backup's snapshot lacks (must be none).

``idle``: a fast-settings pair left alone; "Binary Star:" lines logged after
startup are state changes that should not happen.
"""

from __future__ import annotations

import signal
import time
from multiprocessing.context import ForkServerContext
from typing import Any

import zmq

from benchlib.children import Children
from benchlib.servers import Fleet
from benchlib.wire import (
    DATA_PREFIXES,
    ICANHAZ,
    KTHXBAI,
    Context,
    Feeder,
    is_data,
    socket,
    tcp,
)

VOTE_EVERY = 0.2
KEY_SPACE = 10**11  # every update a new key: a lost one is a missing key


def failover(
    mp: ForkServerContext,
    ctx: Context,
    fleet: Fleet,
    *,
    fast: bool,
    rate: int = 1000,
    steady: float = 2.0,
    timeout: float = 15.0,
) -> dict[str, Any]:
    primary, backup = fleet.start_pair(fast=fast)
    watcher = Feeder(
        ctx, [primary.port], primary.port, b"watch", subscribe=DATA_PREFIXES
    )
    try:
        if not watcher.probe():
            raise RuntimeError("no probe echo from the primary")
        seen: set[bytes] = set()
        with Children(mp) as children:
            (writer,) = children.writers(1, [primary.port, backup.port], primary.port)
            time.sleep(0.3)  # the backup's collector subscription too
            total = int(rate * (steady + timeout))
            writer.call("build", total, 0, KEY_SPACE, 1)
            writer.send("pace", rate)
            drain(watcher.sub, seen, steady)
            killed = time.perf_counter()
            fleet.kill(primary, signal.SIGKILL)
            took, votes, snapshot = vote(ctx, backup.port, killed, timeout)
            drain(watcher.sub, seen, 0.2)  # what was in flight before the kill
    finally:
        watcher.close()
    fleet.stop(backup)
    missing = seen - snapshot if snapshot is not None else seen
    return {
        "settings": "fast" if fast else "default",
        "seconds": took,
        "votes": votes,
        "published_before_kill": len(seen),
        "snapshot_keys": None if snapshot is None else len(snapshot),
        "lost": len(missing),
    }


def drain(sub: zmq.Socket[bytes], seen: set[bytes], seconds: float) -> None:
    """Record the data keys published, for ``seconds``."""
    deadline = time.monotonic() + seconds
    for _ in range(10_000_000):
        left = deadline - time.monotonic()
        if left <= 0 or not sub.poll(int(left * 1000) + 1, zmq.POLLIN):
            return
        key = sub.recv_multipart()[0]
        if is_data(key):
            seen.add(key)


def vote(
    ctx: Context, port: int, killed: float, timeout: float, subtree: bytes = b""
) -> tuple[float | None, int, set[bytes] | None]:
    """ICANHAZ every 0.2 s until KTHXBAI: (seconds since kill, votes, keys).

    ``subtree``: what the votes ask for (the whole map by default).
    """
    dealer = socket(ctx, zmq.DEALER)
    dealer.connect(tcp(port))
    keys: set[bytes] = set()
    votes = 0
    next_vote = time.perf_counter()
    try:
        for _ in range(100_000_000):
            now = time.perf_counter()
            if now - killed > timeout:
                return None, votes, None
            if now >= next_vote:
                dealer.send_multipart([ICANHAZ, subtree])
                votes += 1
                next_vote += VOTE_EVERY
            if not dealer.poll(max(int((next_vote - now) * 1000), 1), zmq.POLLIN):
                continue
            for _ in range(10_000):
                try:
                    frames = dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[0] == KTHXBAI:
                    return time.perf_counter() - killed, votes, keys
                keys.add(frames[0])
        return None, votes, None
    finally:
        dealer.close(0)


def idle(fleet: Fleet, seconds: float) -> dict[str, Any]:
    primary, backup = fleet.start_pair(fast=True)
    time.sleep(0.5)
    before = [s.log().count("Binary Star:") for s in (primary, backup)]
    time.sleep(seconds)
    after = [s.log().count("Binary Star:") for s in (primary, backup)]
    alive = primary.alive and backup.alive
    fleet.stop(primary, backup)
    return {
        "seconds": seconds,
        "backup_changes": after[1] - before[1],
        "primary_changes": after[0] - before[0],
        "alive": alive,
    }

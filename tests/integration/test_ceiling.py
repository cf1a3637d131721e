"""The benchmark's ceiling (``tools/ceiling.py``) does the work a trioclone
server does for the benchmark's messages, so comparing the two is fair: fed
the same KVSETs in the same order, both publish the same updates (key,
sequence, UUID, body) and answer a subtree snapshot with the same records
and KTHXBAI.  (What the ceiling leaves out, it says: validation, TTLs,
deletes, HUGZ.  The benchmark sends none of those to either.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import zmq

from tests.integration.procs import (
    HOST,
    ChpClient,
    Kv,
    Processes,
    free_base_ports,
    start_standalone,
    wait_snapshot,
)

pytestmark = pytest.mark.slow
CEILING = Path(__file__).resolve().parents[2] / "tools" / "ceiling.py"
Context = zmq.Context[zmq.Socket[bytes]]


def stream(client: ChpClient, count: int) -> list[tuple[bytes, int, bytes, bytes]]:
    updates: list[Kv] = []
    for _ in range(count):
        kv = client.next_update(5.0)
        assert kv is not None, f"only {len(updates)} of {count} updates arrived"
        updates.append(kv)
    return [(kv.key, kv.sequence, kv.uuid, kv.body) for kv in updates]


def test_the_ceiling_publishes_and_snapshots_what_a_trioclone_server_does(
    procs: Processes, ctx: Context
) -> None:
    (ceiling_port,) = free_base_ports(1)
    procs.run(
        "ceiling",
        [sys.executable, str(CEILING), "--port", str(ceiling_port), "--bind", HOST],
        port=ceiling_port,
    )
    server = start_standalone(procs, "--in-memory")
    assert server.port is not None
    ports = {"ceiling": ceiling_port, "trioclone": server.port}
    for port in ports.values():
        wait_snapshot(ctx, port)
    clients = {name: ChpClient(ctx, port) for name, port in ports.items()}
    for client in clients.values():
        client.probe()  # its writes and its stream are connected
    writes = [
        (b"/%s/%d" % (b"ab"[n % 2 : n % 2 + 1], n % 37), b"%040d" % n, n)
        for n in range(300)
    ]
    published, offset = {}, {}
    for name, client in clients.items():
        for key, body, n in writes:
            client.set(key, body, uuid=n.to_bytes(16, "big"))
        updates = stream(client, len(writes))
        # (the probes took a sequence or two first, maybe not as many in each)
        offset[name] = updates[0][1] - 1
        published[name] = [(k, s - offset[name], u, b) for k, s, u, b in updates]
    assert [s for _, s, _, _ in published["trioclone"]] == list(
        range(1, len(writes) + 1)
    )
    assert published["ceiling"] == published["trioclone"]
    for subtree in (b"/a/", b"/b/1", b""):
        taken = {name: client.snapshot(subtree) for name, client in clients.items()}
        records = {
            name: {
                key: (kv.sequence - offset[name], kv.uuid, kv.body)
                for key, kv in snapshot.entries.items()
                if not key.startswith(b"/probe/")
            }
            for name, snapshot in taken.items()
        }
        assert records["ceiling"] == records["trioclone"]
        assert records["trioclone"]
        assert all(key.startswith(subtree) for key in records["trioclone"])
        ends = {name: snap.sequence - offset[name] for name, snap in taken.items()}
        assert ends["ceiling"] == ends["trioclone"] == len(writes)
    # a message that is not five frames is dropped whole by both: it never
    # shifts the next one
    for client in clients.values():
        client.send([b"/short", b"x", b"y"])
        client.set(b"/after-short", b"ok")
        kv = client.next_update(5.0)
        assert kv is not None and (kv.key, kv.body) == (b"/after-short", b"ok")

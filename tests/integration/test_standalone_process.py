"""Black-box CHP conformance, run against ``trioclone serve --standalone``.

Each test starts its own server process on 127.0.0.1 with free ports and
talks to it with raw pyzmq (see procs.py); the real clock, bounded waits,
and no tight timing assertions.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import time
from pathlib import Path

import pytest
import zmq

from tests.integration.procs import (
    HOST,
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    ChpClient,
    Processes,
    ServerProcess,
    free_base_ports,
    kvset,
    open_socket,
    recv,
    start_standalone,
    wait_snapshot,
)

pytestmark = pytest.mark.slow

VECTORS = Path(__file__).parent.parent / "vectors.json"
Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def server(procs: Processes, ctx: Context) -> ServerProcess:
    proc = start_standalone(procs)
    wait_snapshot(ctx, port_of(proc))
    return proc


@pytest.fixture
def client(server: ServerProcess, ctx: Context) -> ChpClient:
    chp = ChpClient(ctx, port_of(server))
    chp.probe()  # the PUB -> collector and publisher -> SUB links are up
    return chp


def port_of(proc: ServerProcess) -> int:
    assert proc.port is not None
    return proc.port


def test_snapshot_of_an_empty_map(server: ServerProcess, ctx: Context) -> None:
    snapshot = ChpClient(ctx, port_of(server)).snapshot()
    assert snapshot.entries == {}
    assert snapshot.sequence == 0
    assert snapshot.subtree == b""


def test_snapshot_and_subtree_snapshot(client: ChpClient) -> None:
    written = {b"/a/%d" % i: b"a%d" % i for i in range(5)}
    written |= {b"/b/%d" % i: b"b%d" % i for i in range(3)}
    uuids = {key: client.set(key, body) for key, body in written.items()}
    last = client.wait_for(b"/b/2", timeout=5)

    everything = client.snapshot()
    assert {k: v for k, v in everything.values().items() if k in written} == written
    assert everything.sequence == last.sequence
    assert everything.subtree == b""
    for key, kv in everything.entries.items():
        assert 0 < kv.sequence <= everything.sequence
        if key in uuids:
            assert kv.uuid in (uuids[key], b"")  # reference servers keep it

    subtree = client.snapshot(b"/a/")
    assert subtree.values() == {k: v for k, v in written.items() if k[:3] == b"/a/"}
    assert subtree.sequence == last.sequence
    assert subtree.subtree == b"/a/"
    assert client.snapshot(b"/nothing/").entries == {}


def test_kvset_is_republished_with_increasing_sequence_and_the_writers_uuid(
    client: ChpClient,
) -> None:
    sent = []
    for i in range(50):
        frames = kvset(b"/k/%d" % i, b"value-%d" % i, properties=b"owner=t\n")
        client.send(frames)
        sent.append(frames)
    received = []
    for _ in range(50):
        kv = client.next_update(timeout=5)
        assert kv is not None, f"only {len(received)} of 50 KVPUBs arrived"
        received.append(kv)
    assert [kv.key for kv in received] == [f[0] for f in sent]
    assert [kv.uuid for kv in received] == [f[2] for f in sent]
    assert [kv.body for kv in received] == [f[4] for f in sent]
    assert all(kv.properties == {"owner": "t"} for kv in received)
    sequences = [kv.sequence for kv in received]
    assert all(a < b for a, b in itertools.pairwise(sequences))
    assert client.snapshot().sequence == sequences[-1]


def test_delete_is_published_and_removes_the_key(client: ChpClient) -> None:
    client.set(b"/gone", b"here")
    written = client.wait_for(b"/gone", timeout=5)
    assert b"/gone" in client.snapshot().entries

    uuid = client.set(b"/gone", b"")
    deleted = client.wait_for(b"/gone", timeout=5, deleted=True)
    assert deleted.body == b""
    assert deleted.uuid == uuid
    assert deleted.sequence > written.sequence
    snapshot = client.snapshot()
    assert b"/gone" not in snapshot.entries
    assert snapshot.sequence == deleted.sequence


def test_ttl_expiry_publishes_a_delete_after_about_the_ttl(client: ChpClient) -> None:
    sent_at = time.monotonic()
    client.set(b"/ttl/short", b"soon gone", ttl="1")
    client.set(b"/ttl/long", b"stays", ttl="30.5")
    published = client.wait_for(b"/ttl/short", timeout=5)
    published_at = time.monotonic()
    client.wait_for(b"/ttl/long", timeout=5)  # both applied before the snapshot

    stored = client.snapshot().entries
    assert 0 < float(stored[b"/ttl/short"].properties["ttl"]) <= 1.0
    assert 1.0 < float(stored[b"/ttl/long"].properties["ttl"]) <= 30.5

    deleted = client.wait_for(b"/ttl/short", timeout=5, deleted=True)
    deleted_at = time.monotonic()
    assert deleted_at - published_at >= 0.9, "expired before its TTL"
    assert deleted_at - sent_at < 3.0, "expired long after its TTL"
    assert deleted.sequence > published.sequence
    snapshot = client.snapshot()
    assert b"/ttl/short" not in snapshot.entries
    assert b"/ttl/long" in snapshot.entries
    assert snapshot.sequence == deleted.sequence


def test_hugz_about_once_a_second(procs: Processes, ctx: Context) -> None:
    proc = start_standalone(procs, "--hugz", "1.0")
    wait_snapshot(ctx, port_of(proc))
    listener = ChpClient(ctx, port_of(proc), subscribe=[HUGZ])
    first = listener.next_update(timeout=5, skip_hugz=False)  # the link is up
    assert first is not None and first.key == HUGZ
    hugz = []
    deadline = time.monotonic() + 4.0
    for _ in range(1000):
        kv = listener.next_update(deadline - time.monotonic(), skip_hugz=False)
        if kv is None:
            break
        hugz.append(kv)
    assert 3 <= len(hugz) <= 6, f"{len(hugz)} HUGZ in 4 s with --hugz 1.0"
    for kv in [first, *hugz]:
        assert kv.key == HUGZ and kv.body == b""
        assert kv.sequence == 0  # nothing written: RFC and reference agree


# -- malformed input -----------------------------------------------------------


def invalid_vectors() -> list[tuple[str, list[bytes]]]:
    vectors = json.loads(VECTORS.read_text())["invalid"]
    return [
        (v["name"], [bytes.fromhex(f) for f in v["frames"]])
        for v in vectors
        if v["frames"]  # a zero-frame message cannot travel over ZeroMQ
    ]


def random_frame_lists(count: int, seed: int) -> list[tuple[str, list[bytes]]]:
    """Random junk, made invalid for both the collector and the snapshot port."""
    rng = random.Random(seed)
    lists = []
    for i in range(count):
        frames = [
            rng.randbytes(rng.choice([0, 1, 7, 8, 9, 16, 40]))
            for _ in range(rng.randint(1, 7))
        ]
        if len(frames) == 5 and len(frames[1]) == 8:
            frames[1] += b"\x00"  # a well-formed kvmsg by chance: break it
        if len(frames) == 2 and frames[0] == ICANHAZ:
            frames[0] = b"ICANHAZ!"
        lists.append((f"random-{i}", frames))
    return lists


def reserved_keys() -> list[tuple[str, list[bytes]]]:
    return [
        ("kvset-key-HUGZ", kvset(HUGZ, b"x")),
        ("kvset-key-KTHXBAI", kvset(KTHXBAI, b"x")),
        ("one-empty-frame", [b""]),
        ("ttl-infinite", kvset(b"k", b"v", ttl="inf")),
        ("properties-not-utf8", kvset(b"k", b"v", properties=b"\xff\xfe=1\n")),
    ]


def test_malformed_input_is_rejected_and_changes_nothing(
    server: ServerProcess, client: ChpClient, ctx: Context
) -> None:
    client.set(b"/keep/1", b"one")
    client.set(b"/keep/2", b"two", ttl="60")
    client.wait_for(b"/keep/2", timeout=5)
    before = client.snapshot()

    bad = invalid_vectors() + random_frame_lists(40, seed=1234) + reserved_keys()
    dealer = open_socket(ctx, zmq.DEALER, [port_of(server)])
    for _, frames in bad:
        client.send(frames)  # to the collector
        dealer.send_multipart(frames)  # to the snapshot port
    # Answered, in order, after every bad request on this DEALER:
    dealer.send_multipart([ICANHAZ, b"/keep/"])
    replies = [recv(dealer, 5.0) for _ in range(3)]
    assert all(r is not None for r in replies), "snapshot port stopped answering"
    assert replies[-1] is not None and replies[-1][0] == KTHXBAI
    assert recv(dealer, 0.2) is None, "a bad request was answered"

    # A barrier on the collector: the next good update takes the next sequence.
    client.set(b"/after", b"ok")
    after_kv = client.wait_for(b"/after", timeout=5)
    assert after_kv.sequence == before.sequence + 1, "a bad update took a sequence"
    assert client.next_update(timeout=0.2) is None, "a bad update was published"

    after = client.snapshot()
    assert server.alive
    assert after.sequence == before.sequence + 1
    assert {k: v for k, v in after.values().items() if k != b"/after"} == (
        before.values()
    )
    log = server.log()
    assert "rejected on the collector socket" in log
    assert "rejected on the snapshot socket" in log
    assert "Traceback" not in log


# -- command line errors ---------------------------------------------------------


def test_port_out_of_range_exits_with_a_clear_message(procs: Processes) -> None:
    proc = procs.start(
        "bad-port", "--standalone", "--bind", HOST, "--peer", HOST, "--port", "70000"
    )
    code = proc.popen.wait(timeout=30)
    output = proc.log()
    assert code != 0
    assert "70000" in output and "out of range" in output
    assert "Traceback" not in output


def test_port_in_use_exits_with_a_clear_message(procs: Processes) -> None:
    (port,) = free_base_ports(1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((HOST, port + 2))  # the collector's port
        squatter.listen()
        proc = procs.start(
            "port-in-use",
            "--standalone",
            "--bind",
            HOST,
            "--peer",
            HOST,
            "--port",
            str(port),
        )
        code = proc.popen.wait(timeout=30)
    output = proc.log()
    assert code != 0
    assert "in use" in output
    assert "Traceback" not in output

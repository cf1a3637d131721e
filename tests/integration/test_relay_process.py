"""Relays as processes: a pair, two ``trioclone relay`` processes, and clients
that only know the relays.

The pair runs with fast settings (``--heartbeat 0.2 --hugz 0.2``) and the
relays and clients with short timeouts, so a failover takes about a second;
every wait is bounded and every process is stopped by PID.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Sequence

import pytest
import zmq

from tests.integration.procs import (
    FAST_TIMING,
    HOST,
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    Pair,
    Processes,
    ServerProcess,
    free_base_ports,
    open_socket,
    recv,
    wait_snapshot,
)
from trioclone.client.blocking import BlockingClient
from trioclone.core.client import ClientTimings

pytestmark = pytest.mark.slow
TIME_LIMIT = 120
Context = zmq.Context[zmq.Socket[bytes]]
SEQUENCE = struct.Struct("!q")
QUICK = ClientTimings(
    request_timeout=0.5, silence_timeout=1.0, backoff=0.1, max_backoff=0.5
)


def start_relay(procs: Processes, name: str, upstreams: Sequence[int]) -> ServerProcess:
    port = free_base_ports(1)[0]
    args = ["--log-level", "INFO", "relay", "--port", str(port), "--bind", HOST]
    for upstream in upstreams:
        args += ["--upstream", f"tcp://{HOST}:{upstream}"]
    args += ["--silence-timeout", "1.0", "--request-timeout", "0.5"]
    return procs.run(name, [sys.executable, "-m", "trioclone", *args], port=port)


class GuideClient:
    """The Guide's Model Six client, by its rules, on raw pyzmq: snapshot from
    the server in use, then its stream, applying updates newer than what it
    holds; a server silent for ``silence`` seconds -> the next one; writes
    (KVSET with a UUID) to every server's collector."""

    def __init__(self, ctx: Context, ports: Sequence[int], silence: float = 2.0):
        self.ctx, self.ports, self.silence = ctx, list(ports), silence
        self.kvmap: dict[bytes, bytes] = {}
        self.sequence = 0
        self.current = -1
        self.publisher = open_socket(ctx, zmq.PUB, [p + 2 for p in self.ports])
        self.sub: zmq.Socket[bytes] | None = None
        self.heard = 0.0

    def connect_next(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.current = (self.current + 1) % len(self.ports)
            port = self.ports[self.current]
            if self.sub is not None:
                self.sub.close(linger=0)
            self.sub = open_socket(self.ctx, zmq.SUB, [port + 1], [b""])
            dealer = open_socket(self.ctx, zmq.DEALER, [port])
            try:
                dealer.send_multipart([ICANHAZ, b""])
                kvmap: dict[bytes, bytes] = {}
                for _ in range(1_000_000):
                    frames = recv(dealer, 1.0)
                    if frames is None:
                        break
                    sequence = SEQUENCE.unpack(frames[1])[0]
                    if frames[0] == KTHXBAI:
                        self.kvmap, self.sequence = kvmap, sequence
                        self.heard = time.monotonic()
                        return
                    kvmap[frames[0]] = frames[4]
            finally:
                dealer.close(linger=0)
        raise TimeoutError("no server gave a snapshot")

    def poll(self, seconds: float) -> None:
        """Follow the stream for ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            assert self.sub is not None
            frames = recv(self.sub, min(left, 0.1))
            now = time.monotonic()
            if frames is None:
                if now - self.heard > self.silence:
                    self.connect_next()
                continue
            self.heard = now
            sequence = SEQUENCE.unpack(frames[1])[0]
            if frames[0] != HUGZ and sequence > self.sequence:
                self.sequence = sequence
                if frames[4]:
                    self.kvmap[frames[0]] = frames[4]
                else:
                    self.kvmap.pop(frames[0], None)

    def set(self, key: bytes, value: bytes) -> None:
        uuid = uuidlib.uuid4().bytes
        self.publisher.send_multipart([key, SEQUENCE.pack(0), uuid, b"ttl=0\n", value])

    def close(self) -> None:
        self.publisher.close(linger=0)
        if self.sub is not None:
            self.sub.close(linger=0)


def ready(ctx: Context, relay: ServerProcess) -> None:
    assert relay.port is not None
    wait_snapshot(ctx, relay.port, timeout=15.0)


def test_relay_clients_keep_every_confirmed_write_through_a_failover_and_a_dead_relay(
    procs: Processes, ctx: Context
) -> None:
    with Pair(procs, FAST_TIMING) as pair:
        primary, _backup = pair.start()
        relays = [start_relay(procs, f"relay{n}", [pair.p1, pair.p2]) for n in (1, 2)]
        for relay in relays:
            ready(ctx, relay)
        servers = [f"tcp://{HOST}:{relay.port}" for relay in relays]
        status = relay_status(servers[0])
        assert (status["state"], status["synced"]) == ("RELAY", True)
        assert status["upstream"] == f"tcp://{HOST}:{pair.p1}"
        confirmed: dict[str, bytes] = {}
        with BlockingClient(servers, timings=QUICK) as client:
            assert client.server == servers[0]
            for n in range(50):
                client.set(f"/before/{n}", b"%d" % n)
                confirmed[f"/before/{n}"] = b"%d" % n

            procs.kill(primary)  # SIGKILL the active
            for n in range(50):
                client.set(f"/after-failover/{n}", b"%d" % n, timeout=15)
                confirmed[f"/after-failover/{n}"] = b"%d" % n
            assert dict(client.items()) == confirmed

            procs.kill(relays[0])  # SIGKILL the relay in use
            for n in range(50):
                client.set(f"/after-relay/{n}", b"%d" % n, timeout=15)
                confirmed[f"/after-relay/{n}"] = b"%d" % n
            assert client.server == servers[1]
            assert client.failovers >= 1
            deadline = time.monotonic() + 5
            while dict(client.items()) != confirmed and time.monotonic() < deadline:
                time.sleep(0.05)
            assert dict(client.items()) == confirmed
        # the backup (active now) holds every confirmed write
        snapshot = wait_snapshot(ctx, pair.p2)
        held = {key.decode(): value for key, value in snapshot.values().items()}
        assert {k: v for k, v in held.items() if k in confirmed} == confirmed
        assert relays[1].alive
        status = relay_status(servers[1])
        assert status["upstream"] == f"tcp://{HOST}:{pair.p2}"
        assert status["sequence"] == snapshot.sequence


def relay_status(server: str) -> dict[str, object]:
    """``trioclone status --json`` of one relay."""
    done = subprocess.run(
        [sys.executable, "-m", "trioclone", "status", "--json", "--server", server],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (status,) = json.loads(done.stdout)["servers"]
    assert isinstance(status, dict)
    return status


def test_the_guide_client_reads_and_writes_through_a_relay_and_moves_on_when_it_dies(
    procs: Processes, ctx: Context
) -> None:
    with Pair(procs, FAST_TIMING) as pair:
        pair.start()
        relays = [start_relay(procs, f"relay{n}", [pair.p1, pair.p2]) for n in (1, 2)]
        for relay in relays:
            ready(ctx, relay)
        ports = [relay.port for relay in relays if relay.port is not None]
        guide = GuideClient(ctx, ports)
        try:
            guide.connect_next()
            for n in range(20):
                guide.set(b"/guide/%d" % n, b"g%d" % n)
                guide.poll(0.02)
            guide.poll(1.0)
            assert {
                k: v for k, v in guide.kvmap.items() if k.startswith(b"/guide/")
            } == {b"/guide/%d" % n: b"g%d" % n for n in range(20)}
            # what the Guide client holds is the pair's map, sequence included
            direct = wait_snapshot(ctx, pair.p1)
            assert guide.sequence == direct.sequence
            procs.kill(relays[0], signal.SIGKILL)
            guide.poll(3.0)  # silence, then the next relay's snapshot
            assert guide.current == 1
            guide.set(b"/guide/after", b"moved")
            guide.poll(1.0)
            assert guide.kvmap[b"/guide/after"] == b"moved"
        finally:
            guide.close()

"""Clients recover by themselves, with real processes over TCP on 127.0.0.1.

* A server that restarts (SIGKILL, then started again on the same port)
  faster than the clients' silence timeout: a whole-map client, and
  ``trioclone watch`` of the whole map and of a subtree, notice its new map
  (its lineage) and snapshot again; their maps end equal to the server's.
* A watcher that misses updates (its process stopped with SIGSTOP while a
  flood overflows the server's send queue to it): the whole-map watcher
  sees a sequence gap, the subtree watcher a subtree heartbeat ahead of it;
  both snapshot again and end equal to the server's map.

Real clock: every wait is bounded and no tight timing is asserted; the
exact timings are the core tests' business.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import trioclone
from tests.integration.procs import (
    HOST,
    ChpClient,
    Processes,
    free_base_ports,
    start_standalone,
    wait_snapshot,
)

pytestmark = pytest.mark.slow
TIME_LIMIT = 90  # seconds, for the procs fixture

Context = zmq.Context[zmq.Socket[bytes]]


class Watcher:
    """``trioclone watch [PREFIX] --json`` in its own process; its map is the
    one its printed events build."""

    def __init__(self, server: str, prefix: str, log: Path) -> None:
        command = [sys.executable, "-m", "trioclone", "--log-level", "INFO"]
        command += ["watch", prefix, "--json", "--server", server]
        self.prefix = prefix
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.map: dict[str, str] = {}
        self.resyncs = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def take(self, timeout: float) -> bool:
        """Apply the events printed within ``timeout``; False if none came."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        assert line is not None, "the watcher exited"
        event = json.loads(line)
        if event["event"] == "set":
            self.map[event["key"]] = event["value"]
        elif event["event"] == "delete":
            self.map.pop(event["key"], None)
        else:
            self.resyncs += 1
            for key, value in event["changes"].items():
                if value is None:
                    self.map.pop(key, None)
                else:
                    self.map[key] = value
        return True

    def until(self, done: object, timeout: float) -> bool:
        """Take events until ``done()`` holds (bounded)."""
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            if time.monotonic() > deadline:
                return False
            self.take(0.2)
        return True

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


@pytest.fixture
def watchers(tmp_path: Path) -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.stop()


def server_map(client: ChpClient, prefix: str = "") -> dict[str, str]:
    entries = client.snapshot(prefix.encode()).entries
    return {k.decode(): v.body.decode() for k, v in entries.items()}


def test_clients_notice_a_server_that_restarted_with_a_new_map(
    procs: Processes, ctx: Context, watchers: list[Watcher], tmp_path: Path
) -> None:
    (port,) = free_base_ports(1)
    server = f"tcp://{HOST}:{port}"
    first = start_standalone(procs, "--hugz", "0.3", port=port)
    wait_snapshot(ctx, port)
    # A silence timeout far longer than the restart: only the new map's
    # lineage (or its sequence) can tell this client.
    timings = trioclone.ClientTimings(silence_timeout=30.0)
    with trioclone.connect([server], timings=timings) as clone:
        watchers += [
            Watcher(server, "", tmp_path / "all.log"),
            Watcher(server, "/a/", tmp_path / "a.log"),
        ]
        clone.set("/a/1", "one")
        clone.set("/b/1", "two")
        for watcher in watchers:
            assert watcher.until(lambda w=watcher: "/a/1" in w.map, 15)
        before = clone.sequence

        procs.kill(first)
        # a new map at the same address: its map on disk deleted
        start_standalone(procs, "--hugz", "0.3", "--reset-data", port=port)
        wait_snapshot(ctx, port)
        writer = ChpClient(ctx, port)
        writer.probe()
        for n in range(before + 3):  # the new sequence passes the old one
            writer.set(b"/a/new%d" % n, b"fresh")
        writer.wait_for(b"/a/new%d" % (before + 2), timeout=10)
        expected = server_map(writer)
        assert "/a/1" not in expected and len(expected) == before + 3 + 1

        deadline = time.monotonic() + 20
        while dict(clone.items()) != {k: v.encode() for k, v in expected.items()}:
            assert time.monotonic() < deadline, dict(clone.items())
            time.sleep(0.05)
        assert clone.synced and clone.failovers == 0  # not by silence
        for watcher in watchers:
            wanted = {k: v for k, v in expected.items() if k.startswith(watcher.prefix)}
            assert watcher.until(lambda w=watcher, m=wanted: w.map == m, 20), (
                watcher.prefix,
                watcher.map,
            )
            assert watcher.resyncs == 2  # the first sync, then the new map's


def test_watchers_recover_from_updates_the_server_dropped(
    procs: Processes, ctx: Context, watchers: list[Watcher], tmp_path: Path
) -> None:
    (port,) = free_base_ports(1)
    server = f"tcp://{HOST}:{port}"
    start_standalone(procs, "--hugz", "0.3", "--publisher-hwm", "20", port=port)
    wait_snapshot(ctx, port)
    writer = ChpClient(ctx, port)
    writer.probe()
    watchers += [
        Watcher(server, "", tmp_path / "all.log"),
        Watcher(server, "/a/", tmp_path / "a.log"),
    ]
    for watcher in watchers:
        assert watcher.until(lambda w=watcher: w.resyncs == 1, 15)
    writer.set(b"/a/ready", b"1")
    for watcher in watchers:
        assert watcher.until(lambda w=watcher: "/a/ready" in w.map, 15)

    for watcher in watchers:  # the watchers stop reading
        watcher.signal(signal.SIGSTOP)
    big = b"x" * 4096
    for n in range(6000):  # far more than the socket buffers hold
        writer.set(b"/a/k%d" % (n % 50), big + b"%d" % n)
        writer.set(b"/b/k%d" % (n % 50), big + b"%d" % n)
    # The writer's own PUB drops at its high-water mark under this flood, and
    # its subscription overflows too: write a last key until a snapshot has it.
    deadline = time.monotonic() + 30
    while "/a/last" not in server_map(writer, "/a/last"):
        assert time.monotonic() < deadline, "the server never applied the flood"
        writer.set(b"/a/last", b"done")
        time.sleep(0.2)
    expected = server_map(writer)
    for watcher in watchers:
        watcher.signal(signal.SIGCONT)

    for watcher in watchers:
        wanted = {k: v for k, v in expected.items() if k.startswith(watcher.prefix)}
        assert watcher.until(lambda w=watcher, m=wanted: w.map == m, 40), (
            watcher.prefix,
            sorted(set(wanted.items()) ^ set(watcher.map.items()))[:5],
        )
        assert watcher.resyncs >= 2  # it noticed it had missed updates

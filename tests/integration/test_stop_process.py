"""Graceful stops, planned restarts and the operator's failback, with real
``trioclone serve`` processes on 127.0.0.1.

A *confirmed* write is one whose ``set`` returned: the client saw its own
write published by the active.  Under a steady confirmed-write load (a
blocking client writing one new key after another to both servers), a
server of a pair is stopped with SIGTERM or SIGINT: it exits 0, the other
one serves (taking over if the stopped one was active), the stopped one is
started again and syncs; at the end both are stopped gracefully and the
maps they kept on disk both hold every confirmed write.  Every wait is
bounded; every process is stopped by PID (``Processes``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

import trioclone
from tests.integration.procs import (
    FAST_TIMING,
    Pair,
    Processes,
    ServerProcess,
    open_socket,
    request_snapshot,
    start_standalone,
    tcp,
    zmq_context,
)
from tests.shells.test_datadir import reopen
from trioclone.errors import WriteTimeoutError
from trioclone.server.clone import STOP_LIMIT, STOP_LINGER

pytestmark = pytest.mark.slow
TIME_LIMIT = 120  # seconds, for the procs fixture
TIMING = [*FAST_TIMING, "--status-interval", "0.3"]
TAKEOVER = "Binary Star: PASSIVE -> ACTIVE"


class Writer:
    """One client writing new keys to both servers, one confirmed write after
    another, in a thread; ``confirmed`` holds each write whose ``set``
    returned."""

    def __init__(self, servers: list[str]) -> None:
        self.client = trioclone.connect(servers, sync_timeout=15)
        self.confirmed: dict[str, str] = {}
        self.unconfirmed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="writer")
        self._thread.start()

    def _write(self) -> None:
        for n in range(1_000_000):
            if self._stop.is_set():
                return
            key, value = f"/w/{n:07d}", f"v{n}"
            try:
                self.client.set(key, value, timeout=20)
            except WriteTimeoutError:
                self.unconfirmed.append(key)
            except BaseException:  # the client was closed under it
                if self._stop.is_set():
                    return
                raise
            else:
                self.confirmed[key] = value

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        """Until ``more`` writes more than now are confirmed."""
        target = len(self.confirmed) + more
        deadline = time.monotonic() + timeout
        while len(self.confirmed) < target:
            assert time.monotonic() < deadline, (
                f"{len(self.confirmed)} of {target} writes confirmed "
                f"in {timeout} s ({len(self.unconfirmed)} not)"
            )
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self.client.close()  # (a write in flight ends)
        self._thread.join(30)
        assert not self._thread.is_alive()


@contextmanager
def writing(servers: list[str]) -> Iterator[Writer]:
    writer = Writer(servers)
    try:
        yield writer
    finally:
        writer.close()


def folder(procs: Processes, role: str, port: int) -> Path:
    """A server's default data folder, as ``Processes`` sets XDG_DATA_HOME."""
    return procs.log_dir / "data" / "trioclone" / f"{role}-{port}"


def stop(procs: Processes, server: ServerProcess, sig: int = signal.SIGTERM) -> None:
    """Stop ``server`` with ``sig``: it exits 0, in time, after each step."""
    started = time.monotonic()
    procs.kill(server, sig)  # (SIGKILL only after 5 s)
    took = time.monotonic() - started
    assert server.popen.returncode == 0, server.log()[-3000:]
    assert took < STOP_LIMIT + 1.5, f"took {took:.1f} s"
    log = server.log()
    name = signal.Signals(sig).name
    assert f"stopping on {name}" in log
    assert "no more writes taken" in log
    assert "the map is committed and synced to disk" in log
    assert "Traceback" not in log
    role = (
        server.args[server.args.index("--role") + 1]
        if "--role" in server.args
        else "standalone"
    )
    assert log.rstrip().endswith(f"{role} stopped")


def status(pair: Pair, *options: str) -> dict[str, Any]:
    """``trioclone status --json`` of the pair (with ``--check``: exit 0)."""
    command = [sys.executable, "-m", "trioclone", "status", "--json", *options]
    for port in (pair.p1, pair.p2):
        command += ["--server", tcp(port)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def check_both_kept(
    procs: Processes,
    pair: Pair,
    active: ServerProcess,
    passive: ServerProcess,
    confirmed: dict[str, str],
) -> None:
    """Once the passive caught up, stop both (the passive first) and read
    the maps they kept: each holds every confirmed write."""
    with zmq_context() as ctx:
        snapshot = request_snapshot(ctx, active.port or 0, timeout=5.0)
    assert snapshot is not None
    assert passive.wait_for_status(10, state="PASSIVE", sequence=snapshot.sequence)
    stop(procs, passive)
    stop(procs, active)
    assert len(confirmed) >= 150
    for role, port in (("primary", pair.p1), ("backup", pair.p2)):
        core = reopen(folder(procs, role, port), 0.0, 0.0)  # (no TTLs: any wall)
        lost = sorted(
            key
            for key, value in confirmed.items()
            if (kv := core.store.get(key.encode())) is None or kv.body != value.encode()
        )
        assert not lost, f"{role} lost {len(lost)} confirmed writes: {lost[:5]}"


# -- one server ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_stops_a_server_gracefully_and_it_exits_0(
    procs: Processes, sig: int
) -> None:
    server = start_standalone(procs, "--fsync", "interval")
    assert server.wait_for_log("listening", 15), server.log()
    with writing([tcp(server.port or 0)]) as writer:
        writer.wait_for(100)
        stop(procs, server, sig)
    log = server.log()
    steps = [
        "no more writes taken",
        "the collector is closed",
        "the map is committed and synced to disk",
        "closing the sockets",
        "standalone stopped",
    ]
    assert [log.index(step) for step in steps] == sorted(log.index(s) for s in steps)
    core = reopen(folder(procs, "standalone", server.port or 0), 0.0, 0.0)
    for key, value in writer.confirmed.items():
        kv = core.store.get(key.encode())
        assert kv is not None and kv.body == value.encode(), key


def test_a_subscriber_that_reads_nothing_holds_a_stop_up_at_most_the_linger(
    procs: Processes,
) -> None:
    """The publisher lingers for what it sent a subscriber that reads
    nothing, at most ``STOP_LINGER``; a second signal meanwhile stops at
    once."""
    for second in (False, True):
        server = start_standalone(procs, "--in-memory", name=f"second-{second}")
        assert server.wait_for_log("listening", 15), server.log()
        port = server.port or 0
        with zmq_context() as ctx:
            sleeper = ctx.socket(zmq.SUB)  # takes in one message, reads none
            for option, number in (
                (zmq.LINGER, 0),
                (zmq.RCVHWM, 1),
                (zmq.RCVBUF, 4096),
            ):
                sleeper.setsockopt(option, number)
            sleeper.setsockopt(zmq.SUBSCRIBE, b"")
            sleeper.connect(tcp(port + 1))
            writer = open_socket(ctx, zmq.PUB, [port + 2])
            time.sleep(0.5)  # (slow joiners)
            value = b"x" * 60_000
            for n in range(500):  # 30 MB published: more than TCP buffers hold
                writer.send_multipart([b"/big/%d" % n, b"\0" * 8, b"", b"", value])
            time.sleep(1.0)
            started = time.monotonic()
            server.popen.send_signal(signal.SIGTERM)
            if second:
                time.sleep(0.2)
                server.popen.send_signal(signal.SIGTERM)
            code = server.popen.wait(STOP_LIMIT + 2)
            took = time.monotonic() - started
            sleeper.close(linger=0)
        assert code == 0
        log = server.log()
        if second:
            assert "stopping at once on a second signal (SIGTERM)" in log
            assert took < STOP_LINGER, f"took {took:.2f} s"
        else:
            assert "closing the sockets" in log
            assert STOP_LINGER - 0.2 < took < STOP_LIMIT, f"took {took:.2f} s"


# -- planned restarts of a pair ------------------------------------------------


@pytest.mark.parametrize(
    ("victim", "sig", "at_once"),
    [
        ("primary", signal.SIGTERM, False),  # the active
        ("primary", signal.SIGTERM, True),  # as systemctl restart does
        ("backup", signal.SIGTERM, False),  # the passive
        ("primary", signal.SIGINT, False),
    ],
    ids=["active-TERM", "active-TERM-restarted-at-once", "passive-TERM", "active-INT"],
)
def test_a_planned_restart_loses_no_confirmed_write(
    procs: Processes, victim: str, sig: int, at_once: bool
) -> None:
    """``at_once``: started again as soon as it exited, before its peer's
    heartbeats expired (the passive takes over when it hears it start)."""
    with Pair(procs, TIMING) as pair:
        primary, backup = pair.start()
        with writing([tcp(pair.p1), tcp(pair.p2)]) as writer:
            writer.wait_for(100)
            if victim == "primary":  # the active: the backup takes over
                stop(procs, primary, sig)
                if not at_once:
                    writer.wait_for(50)
                    assert backup.wait_for_log(TAKEOVER, 15), backup.log()[-3000:]
                restarted = pair.start_primary("primary-2")
                assert backup.wait_for_log(TAKEOVER, 15), backup.log()[-3000:]
                active, passive = backup, restarted
            else:  # the passive: the primary keeps serving
                stop(procs, backup, sig)
                writer.wait_for(50)
                restarted = pair.start_backup("backup-2")
                active, passive = primary, restarted
            assert restarted.wait_for_log("synced from the active", 20), (
                restarted.log()[-3000:]
            )
            writer.wait_for(50)
        assert TAKEOVER not in passive.log()
        check_both_kept(procs, pair, active, passive, writer.confirmed)


def test_the_operators_failback_loses_no_confirmed_write(procs: Processes) -> None:
    """The primary dies (SIGKILL) and the backup takes over; the primary is
    started again, comes back passive and syncs; the operator restarts the
    backup (SIGTERM, start): the primary takes over and the backup comes
    back passive.  No confirmed write is lost across the whole procedure."""
    with Pair(procs, TIMING) as pair:
        primary, backup = pair.start()
        with writing([tcp(pair.p1), tcp(pair.p2)]) as writer:
            writer.wait_for(100)
            procs.kill(primary, signal.SIGKILL)
            writer.wait_for(50)
            assert backup.wait_for_log(TAKEOVER, 15), backup.log()[-3000:]

            primary = pair.start_primary("primary-2")
            assert primary.wait_for_log("Binary Star: PRIMARY -> PASSIVE", 15)
            assert primary.wait_for_log("synced from the active", 20)
            writer.wait_for(50)
            # what the operator checks first: the primary is passive and synced
            states = status(pair)
            assert states["actives"] == 1
            assert [
                (s["name"], s["state"], s["synced"]) for s in states["servers"]
            ] == [
                ("primary", "PASSIVE", True),
                ("backup", "ACTIVE", True),
            ]

            # the operator's step: restart the backup once the primary synced
            stop(procs, backup)
            backup = pair.start_backup("backup-2")
            assert primary.wait_for_log(TAKEOVER, 15), primary.log()[-3000:]
            assert backup.wait_for_log("Binary Star: BACKUP -> PASSIVE", 15)
            assert backup.wait_for_log("synced from the active", 20)
            writer.wait_for(50)
            states = status(pair, "--check")
            assert [(s["name"], s["state"]) for s in states["servers"]] == [
                ("primary", "ACTIVE"),
                ("backup", "PASSIVE"),
            ]
        check_both_kept(procs, pair, primary, backup, writer.confirmed)


# -- backup and restore of a pair ----------------------------------------------


def test_a_pair_restores_from_an_online_backup_of_its_passive(
    procs: Processes, tmp_path: Path
) -> None:
    """docs/operations.md: copy the passive's map while the pair runs; to
    restore, the copy becomes the primary's map and the backup starts once
    with --reset-data; the pair then serves the map as it was at the copy."""
    copy = tmp_path / "copy.sqlite3"
    with Pair(procs, TIMING) as pair, zmq_context() as ctx:
        primary, backup = pair.start()
        pair.probe(pair.sub_primary)  # the writer's and the subscriber's links are up
        before = pair.write_until_seen(b"/before", 300, pair.sub_primary)
        sequence = request_snapshot(ctx, pair.p1, timeout=5.0)
        assert sequence is not None
        assert backup.wait_for_status(10, state="PASSIVE", sequence=sequence.sequence)
        backed_up = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys; "
                "sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))",
                str(folder(procs, "backup", pair.p2) / "map.sqlite3"),
                str(copy),
            ],
            timeout=30,
            check=False,
        )
        assert backed_up.returncode == 0
        after = pair.write_until_seen(b"/after", 100, pair.sub_primary)
        stop(procs, backup)
        stop(procs, primary)

        restored = folder(procs, "primary", pair.p1)
        shutil.rmtree(restored)
        restored.mkdir()
        shutil.copy(copy, restored / "map.sqlite3")
        primary = pair.start_primary("primary-restored")
        backup = procs.start(
            "backup-reset", *pair._args("backup"), "--reset-data", port=pair.p2
        )
        assert backup.wait_for_log("synced from the active", 20), backup.log()[-3000:]
        snapshot = request_snapshot(ctx, pair.p1, timeout=5.0)
        assert snapshot is not None
        values = snapshot.values()
        assert all(values.get(key) == pair.known[key] for key in before)
        assert not any(key in values for key in after)
        assert backup.wait_for_status(10, state="PASSIVE", keys=len(values))

"""The map on disk with real processes: both servers killed with SIGKILL and
restarted in either order, a corrupt file refused by name, ``--reset-data``,
and ``trioclone dump --json`` / ``trioclone load`` between two servers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from tests.integration.procs import (
    FAST_TIMING,
    HOST,
    ChpClient,
    Pair,
    Processes,
    free_base_ports,
    start_standalone,
    vote_until_snapshot,
    wait_snapshot,
)

pytestmark = pytest.mark.slow
Context = zmq.Context[zmq.Socket[bytes]]


def hugz(client: ChpClient, timeout: float = 5.0) -> tuple[int, str]:
    """The sequence and lineage on the next HUGZ."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kv = client.next_update(deadline - time.monotonic(), skip_hugz=False)
        if kv is not None and kv.key == b"HUGZ":
            return kv.sequence, kv.properties["lineage"]
    raise TimeoutError("no HUGZ")


@pytest.mark.parametrize("first", ["primary", "backup"])
def test_both_servers_killed_come_back_with_map_sequence_and_lineage(
    procs: Processes, first: str
) -> None:
    with Pair(procs, (*FAST_TIMING, "--status-interval", "0.3")) as pair:
        primary, backup = pair.start()
        watcher = ChpClient(pair.ctx, pair.p1)
        pair.probe(watcher.sub)  # subscribed before the writes (slow joiner)
        keys = [pair.write(b"/kept") for _ in range(200)]
        watcher.wait_for(keys[-1], timeout=10)
        pair.writer.send_multipart(
            [b"/brief", bytes(8), b"\x01" * 16, b"ttl=1\n", b"gone soon"]
        )
        watcher.wait_for(b"/brief", timeout=10)
        sequence, lineage = hugz(watcher)
        assert backup.wait_for_status(10, sequence=sequence)  # the passive has it
        procs.kill(primary)
        procs.kill(backup)
        time.sleep(1.5)  # /brief expires while both are down

        if first == "primary":  # it serves as soon as a client asks
            pair.start_primary("primary-again")
            snapshot = wait_snapshot(pair.ctx, pair.p1)
            second = pair.start_backup("backup-again")
        else:  # Binary Star: a backup that starts alone never serves
            second = pair.start_backup("backup-again")
            assert second.wait_for_log("loaded the map kept in", 10)
            with pytest.raises(TimeoutError):
                vote_until_snapshot(pair.ctx, pair.p2, every=0.5, timeout=2)
            pair.start_primary("primary-again")
            snapshot = wait_snapshot(pair.ctx, pair.p1)
        client = ChpClient(pair.ctx, pair.p1)
        # the expired key's delete comes with a fresh sequence (the first
        # snapshot may come before it, with the key's last millisecond)
        deadline = time.monotonic() + 5
        while b"/brief" in snapshot.values() and time.monotonic() < deadline:
            time.sleep(0.05)
            snapshot = client.snapshot()
        assert snapshot.values() == {
            key: body for key, body in pair.known.items() if key != b"/brief"
        }
        assert snapshot.sequence == sequence + 1
        assert hugz(client) == (sequence + 1, lineage)
        assert second.wait_for_log("synced from the active", 15), second.log()[-3000:]
        later = ChpClient(pair.ctx, pair.p1, write_to=[pair.p1, pair.p2])
        later.probe()
        assert hugz(later)[1] == lineage
        for proc in procs.started:
            assert "Traceback" not in proc.log(), proc.log()[-3000:]


def test_a_corrupt_map_file_stops_the_server_with_the_file_named(
    procs: Processes, tmp_path: Path
) -> None:
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "map.sqlite3").write_bytes(b"\x00garbage" * 512)
    server = start_standalone(procs, "--data-dir", str(folder))
    assert server.popen.wait(timeout=15) == 1
    log = server.log()
    assert str(folder / "map.sqlite3") in log and "--reset-data" in log
    assert (folder / "map.sqlite3").read_bytes() == b"\x00garbage" * 512


def test_reset_data_starts_empty_and_the_map_is_kept_from_then_on(
    procs: Processes, ctx: Context, tmp_path: Path
) -> None:
    (port,) = free_base_ports(1)
    folder = str(tmp_path / "kept")
    first = start_standalone(procs, "--data-dir", folder, port=port)
    wait_snapshot(ctx, port)
    writer = ChpClient(ctx, port)
    writer.probe()
    procs.kill(first)
    second = start_standalone(procs, "--data-dir", folder, port=port)
    assert b"/probe/0" in wait_snapshot(ctx, port).values()
    procs.kill(second)
    start_standalone(procs, "--data-dir", folder, "--reset-data", port=port)
    assert wait_snapshot(ctx, port).values() == {}


def test_an_online_backup_of_the_data_folder_restores(
    procs: Processes, ctx: Context, tmp_path: Path
) -> None:
    """The README's one-line backup, taken while the server writes."""
    (port,) = free_base_ports(1)
    folder, restored = tmp_path / "live", tmp_path / "restored"
    server = start_standalone(procs, "--data-dir", str(folder), port=port)
    wait_snapshot(ctx, port)
    writer = ChpClient(ctx, port)
    writer.probe()
    for n in range(500):
        writer.set(b"/before/%03d" % n, b"v%d" % n)
    writer.wait_for(b"/before/499", timeout=10)
    restored.mkdir()
    backup = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; "
            "sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))",
            str(folder / "map.sqlite3"),
            str(restored / "map.sqlite3"),
        ]
    )
    for n in range(200):  # the server writes on meanwhile
        writer.set(b"/during/%03d" % n, b"d")
    assert backup.wait(timeout=30) == 0
    procs.kill(server)
    start_standalone(procs, "--data-dir", str(restored), port=port)
    values = wait_snapshot(ctx, port).values()
    assert all(values[b"/before/%03d" % n] == b"v%d" % n for n in range(500))
    assert all(values.get(key, b"d") == b"d" for key in values if b"/during/" in key)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioclone", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_dump_loads_into_another_server(
    procs: Processes, ctx: Context, tmp_path: Path
) -> None:
    source, target = free_base_ports(2)
    start_standalone(procs, port=source)
    start_standalone(procs, port=target)
    wait_snapshot(ctx, source)
    wait_snapshot(ctx, target)
    writer = ChpClient(ctx, source)
    writer.probe()
    values = {b"/cfg/%03d" % n: b"value %d" % n for n in range(300)}
    values[b"/bin"] = b"\x00\xff\x01"
    for key, body in values.items():
        writer.set(key, body)
    writer.wait_for(b"/bin", timeout=10)
    dump = tmp_path / "dump.json"
    done = cli("dump", "--json", "--server", f"tcp://{HOST}:{source}")
    assert done.returncode == 0, done.stderr
    dump.write_text(done.stdout)
    loaded = cli("load", str(dump), "--server", f"tcp://{HOST}:{target}")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == f"ok, {len(values) + 1} keys written"
    copy = wait_snapshot(ctx, target).values()
    assert copy == {**values, b"/probe/0": b"probe"}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2]", "not a JSON object"),
        ('{"/a": 1}', "a value is text"),
        ('{"/a": "x", "HUGZ": "y"}', "not a key a client may write"),
        ('{"/a": ""}', "an empty value"),
        ('{"/a": {"base64": "!!"}}', "bad base64"),
        ("{", "Expecting"),
    ],
)
def test_load_refuses_a_bad_file_and_writes_nothing(text: str, why: str) -> None:
    # no server runs at this address: the file is refused before connecting
    done = cli("load", "-", "--server", "tcp://127.0.0.1:9", stdin=text)
    assert done.returncode == 2
    assert why in done.stderr and "nothing was written" in done.stderr


def test_load_names_a_missing_file() -> None:
    done = cli("load", "/nonexistent/dump.json")
    assert done.returncode == 2 and "/nonexistent/dump.json" in done.stderr


def test_dump_json_round_trips_through_load_format(tmp_path: Path) -> None:
    """The JSON ``load`` reads is exactly ``dump --json``'s: text or base64."""
    from trioclone.cli_client import as_json, read_dump

    values = {"/t": b"text", "/b": b"\x00\xff"}
    path = tmp_path / "d.json"
    path.write_text(json.dumps({k: as_json(v) for k, v in values.items()}))
    assert read_dump(path) == values

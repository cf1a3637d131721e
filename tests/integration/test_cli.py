"""The client commands and the blocking client against a real pair over TCP.

A primary and a backup run as ``python -m trioclone serve --role ...``
processes on 127.0.0.1 with free ports (module fixture; stopped by PID:
SIGTERM, then SIGKILL after 5 s).  Every CLI command runs as a subprocess
with ``--server`` for both.  Real clock: every wait is bounded, no tight
timing is asserted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import zmq

import trioclone
from tests.integration.procs import (
    HOST,
    Processes,
    free_base_ports,
    start_standalone,
)
from trioclone import ClientClosedError, DeleteEvent, NoServerError, SetEvent
from trioclone.cli import build_parser, local_pair_commands, main, server_settings
from trioclone.endpoints import Endpoints
from trioclone.server.datadir import default_folder
from trioclone.server.settings import pair_settings

RUN_TIMEOUT = 30.0  # seconds any one CLI command may take
STOP_GRACE = 5.0


def free_base(span: int = 1) -> int:
    """A port P with P .. P + span - 1 free now, never handed out before."""
    return free_base_ports(1, span)[0]


def address(port: int) -> str:
    return f"tcp://{HOST}:{port}"


@dataclass
class Pair:
    servers: list[str]
    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def server_args(self) -> list[str]:
        return [arg for s in self.servers for arg in ("--server", s)]

    def log_tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.logs)


def cli(
    *args: str, servers: list[str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``python -m trioclone COMMAND ARGS --server ...``, output captured."""
    server_args = [arg for s in servers or [] for arg in ("--server", s)]
    command = [sys.executable, "-m", "trioclone", "--log-level", "WARNING"]
    return subprocess.run(
        [*command, *args, *server_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop(process: subprocess.Popen[Any]) -> None:
    """Stop by PID: SIGTERM, SIGKILL after STOP_GRACE s, then reap."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs_dir = tmp_path_factory.mktemp("pair")
    p1, p2 = free_base(3), free_base(3)
    s1, s2 = free_base(), free_base()
    sides = {
        "primary": (p1, p2, s1, s2),
        "backup": (p2, p1, s2, s1),
    }
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for role, (port, peer_port, state, peer_state) in sides.items():
            log = logs_dir / f"{role}.log"
            logs.append(log)
            with log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "trioclone",
                            "serve",
                            "--role",
                            role,
                            "--port",
                            str(port),
                            "--peer-port",
                            str(peer_port),
                            "--state-port",
                            str(state),
                            "--peer-state-port",
                            str(peer_state),
                            "--bind",
                            HOST,
                            "--peer",
                            HOST,
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        running = Pair([address(p1), address(p2)], processes, logs)
        deadline = time.monotonic() + 30
        while True:  # ready once a client can sync (the primary is active)
            probe = cli("dump", "--timeout", "3", servers=running.servers)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the pair never answered:\n" + running.log_tail())
        yield running
    finally:
        for process in processes:
            stop(process)


@pytest.fixture
def unused_port() -> int:
    return free_base(3)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_set_then_get_prints_the_value(pair: Pair) -> None:
    put = cli("set", "/cli/sg", "hello world", servers=pair.servers)
    assert put.returncode == 0, put.stderr
    assert put.stdout.startswith("ok, sequence ")
    sequence = int(put.stdout.split()[-1])
    assert sequence >= 1
    got = cli("get", "/cli/sg", servers=pair.servers)
    assert (got.returncode, got.stdout) == (0, "hello world\n"), got.stderr
    again = cli("set", "/cli/sg", "second", servers=pair.servers)
    assert int(again.stdout.split()[-1]) > sequence
    assert cli("get", "/cli/sg", servers=pair.servers).stdout == "second\n"


@pytest.mark.slow
def test_dump_and_dump_json(pair: Pair) -> None:
    for key, value in [("/cli/dump/b", "two words"), ("/cli/dump/a", "1")]:
        assert cli("set", key, value, servers=pair.servers).returncode == 0
    assert cli("set", "/cli/other", "x", servers=pair.servers).returncode == 0
    dump = cli("dump", "/cli/dump/", servers=pair.servers)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.splitlines() == ["/cli/dump/a=1", "/cli/dump/b=two words"]
    as_json = cli("dump", "/cli/dump/", "--json", servers=pair.servers)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "/cli/dump/a": "1",
        "/cli/dump/b": "two words",
    }
    everything = cli("dump", "--json", servers=pair.servers)
    assert json.loads(everything.stdout)["/cli/other"] == "x"


@pytest.mark.slow
def test_del_then_get_exits_1(pair: Pair) -> None:
    assert cli("set", "/cli/del", "doomed", servers=pair.servers).returncode == 0
    deleted = cli("del", "/cli/del", servers=pair.servers)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith("ok, sequence ")
    got = cli("get", "/cli/del", servers=pair.servers)
    assert got.returncode == 1
    assert got.stdout == ""
    assert "/cli/del: no such key" in got.stderr


@pytest.mark.slow
def test_set_with_ttl_expires(pair: Pair) -> None:
    put = cli("set", "/cli/ttl", "brief", "--ttl", "1", servers=pair.servers)
    assert put.returncode == 0, put.stderr
    deadline = time.monotonic() + 15  # the key goes 1 s after it was applied
    while (got := cli("get", "/cli/ttl", servers=pair.servers)).returncode == 0:
        assert got.stdout == "brief\n"
        assert time.monotonic() < deadline, "the key never expired"
    assert got.returncode == 1, got.stderr
    assert "no such key" in got.stderr


@pytest.mark.slow
def test_an_empty_value_is_refused_by_set(pair: Pair) -> None:
    put = cli("set", "/cli/empty", "", servers=pair.servers)
    assert put.returncode == 2
    assert "trioclone del" in put.stderr


def read_lines(
    stream: Any, lines: queue.Queue[str | None], first: list[str] | None = None
) -> None:
    """Every line but resync reports (a watcher may resync at any time); the
    very first line goes to ``first``."""
    for line in stream:
        if first is not None and not first:
            first.append(line)
        elif json.loads(line)["event"] != "resync":
            lines.put(line)
    lines.put(None)


@pytest.mark.slow
def test_watch_json_prints_a_line_for_a_set_done_meanwhile(
    pair: Pair, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "trioclone", "--log-level", "WARNING"]
    command += ["watch", "/cli/watch/", "--json", *pair.server_args()]
    errors = tmp_path / "watch.err"
    lines: queue.Queue[str | None] = queue.Queue()
    with (
        errors.open("w") as stderr,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True
        ) as watch,
    ):
        first: list[str] = []
        reader = threading.Thread(target=read_lines, args=(watch.stdout, lines, first))
        reader.start()
        try:
            event = None
            written: dict[str, int] = {}  # value -> sequence
            # The watcher may not be synced and subscribed yet: write until a
            # line shows up (bounded).
            for attempt in range(20):
                value = f"v{attempt}"
                put = cli("set", "/cli/watch/k", value, servers=pair.servers)
                assert put.returncode == 0, put.stderr
                written[value] = int(put.stdout.split()[-1])
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    continue
                assert line is not None, errors.read_text()
                event = json.loads(line)
                break
            assert event is not None, "watch printed nothing for 20 writes"
            # Its first line was the state under the prefix, as a resync.
            start = json.loads(first[0])
            assert (start["event"], start["server"]) == ("resync", pair.servers[0])
            assert set(start["changes"]) <= {"/cli/watch/k"}
            assert event == {
                "event": "set",
                "key": "/cli/watch/k",
                "sequence": written[event["value"]],
                "value": event["value"],
            }
            deleted = cli("del", "/cli/watch/k", servers=pair.servers)
            assert deleted.returncode == 0, deleted.stderr
            while True:  # lines for earlier writes that were still in flight
                line = lines.get(timeout=10.0)
                assert line is not None, errors.read_text()
                event = json.loads(line)
                if event["event"] == "delete":
                    break
                assert event["sequence"] == written[event["value"]], event
            assert event == {
                "event": "delete",
                "key": "/cli/watch/k",
                "sequence": int(deleted.stdout.split()[-1]),
            }
            # Ctrl-C stops it cleanly
            watch.send_signal(signal.SIGINT)
            assert watch.wait(10) == 130
        finally:
            stop(watch)
            reader.join(10)


@pytest.mark.slow
def test_a_binary_value_set_via_the_api_is_shown_escaped(pair: Pair) -> None:
    binary = b"\x00\xffbin"
    control = "tab\there"
    with trioclone.connect(pair.servers) as clone:
        clone.set("/cli/bin", binary)
        clone.set("/cli/ctl", control)
    got = cli("get", "/cli/bin", servers=pair.servers)
    assert got.returncode == 0, got.stderr
    assert got.stdout == repr(binary) + "\n"
    assert (
        cli("get", "/cli/ctl", servers=pair.servers).stdout
        == repr(control.encode()) + "\n"
    )
    as_json = cli("dump", "/cli/bin", "--json", servers=pair.servers)
    assert json.loads(as_json.stdout) == {"/cli/bin": {"base64": "AP9iaW4="}}


@pytest.mark.slow
def test_no_server_exits_3_with_a_clear_message(unused_port: int) -> None:
    started = time.monotonic()
    got = cli("get", "/k", "--timeout", "1", servers=[address(unused_port)], timeout=20)
    assert got.returncode == 3
    assert got.stdout == ""
    assert "no server answered within 1 s" in got.stderr
    assert address(unused_port) in got.stderr
    assert time.monotonic() - started < 15


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "complaint"),
    [
        ("tcp://127.0.0.1:notaport", "not a server address"),
        ("tcp://127.0.0.1:70000", "out of range"),
    ],
)
def test_a_bad_address_exits_2(server: str, complaint: str) -> None:
    got = cli("get", "/k", "--timeout", "1", servers=[server], timeout=20)
    assert got.returncode == 2
    assert complaint in got.stderr
    assert "Traceback" not in got.stderr


# --------------------------------------------------------------------------
# the blocking client
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_blocking_client_set_get_delete_close(pair: Pair) -> None:
    clone = trioclone.connect(pair.servers, sync_timeout=10)
    with clone:
        first = clone.set("/blk/a", "1")
        assert clone.get("/blk/a") == b"1"
        second = clone.set("/blk/b", b"2", ttl=60)
        assert second > first
        assert clone.items("/blk/") == [("/blk/a", b"1"), ("/blk/b", b"2")]
        assert clone.delete("/blk/a") > second
        assert clone.get("/blk/a") is None
        assert clone.get("/blk/a", b"gone") == b"gone"
    with pytest.raises(ClientClosedError):
        clone.set("/blk/a", "again")
    with pytest.raises(ClientClosedError):
        clone.get("/blk/b")
    clone.close()  # closing twice is harmless
    got = cli("get", "/blk/b", servers=pair.servers)
    assert got.stdout == "2\n"


def test_a_timeout_beyond_the_write_horizon_is_accepted() -> None:
    """``--timeout`` also bounds the sync; a write waits at most the client's
    write horizon (30 s) however long it is (see the client's tests)."""
    args = build_parser().parse_args(["set", "/cli/long", "v", "--timeout", "60"])
    assert args.timeout == 60.0


@pytest.mark.slow
def test_blocking_client_state_and_set_nowait(pair: Pair) -> None:
    with trioclone.connect(pair.servers, sync_timeout=10) as clone:
        assert clone.synced is True  # a bool: `if clone.synced:` means it
        assert (clone.phase, clone.server) == ("active", pair.servers[0])
        assert clone.failovers == 0
        before = clone.sequence
        clone.set_nowait("/blk/nowait", "fire and forget")
        deadline = time.monotonic() + 10
        while clone.get("/blk/nowait") != b"fire and forget":
            assert time.monotonic() < deadline, "the write never came back"
            time.sleep(0.01)
        assert clone.sequence > before
    with pytest.raises(ClientClosedError):
        clone.synced  # noqa: B018


@pytest.mark.slow
def test_blocking_watch_iterates_changes_and_ends_on_close(pair: Pair) -> None:
    events: queue.Queue[Any] = queue.Queue()
    with trioclone.connect(pair.servers, sync_timeout=10) as clone:

        def consume() -> None:
            for event in clone.watch("/bw/"):
                events.put(event)
            events.put(None)  # the iterator ended

        consumer = threading.Thread(target=consume)
        consumer.start()
        first = None
        for attempt in range(50):  # until the watch is surely running
            clone.set("/bw/probe", f"{attempt}")
            try:
                first = events.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        assert isinstance(first, SetEvent)
        a = clone.set("/bw/a", "1")
        b = clone.set("/bw/b", "2")
        gone = clone.delete("/bw/a")
        clone.set("/elsewhere", "x")
        got: list[Any] = []
        while len(got) < 3:  # (probes still in flight come first)
            event = events.get(timeout=10)
            assert event is not None, "the watch ended"
            if not (isinstance(event, SetEvent) and event.key == "/bw/probe"):
                got.append(event)
        assert got == [
            SetEvent("/bw/a", b"1", a),
            SetEvent("/bw/b", b"2", b),
            DeleteEvent("/bw/a", gone),
        ]
    consumer.join(10)
    assert not consumer.is_alive()
    assert events.get(timeout=1) is None


@pytest.mark.slow
def test_blocking_connect_without_a_server_raises(unused_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(NoServerError):
        trioclone.connect([address(unused_port)], sync_timeout=1)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_blocking_connect_rejects_a_bad_sync_timeout(value: float) -> None:
    with pytest.raises(trioclone.LocalProtocolError, match="sync_timeout"):
        trioclone.connect(["tcp://127.0.0.1:9"], sync_timeout=value)


# --------------------------------------------------------------------------
# numeric options: a bad value exits 2 naming the option (in-process parser)
# --------------------------------------------------------------------------

# Each bad value with the message that follows "argument --NAME: ".
SECONDS = "must be a positive, finite number of seconds, not {!r}"
HEARTBEATS = "must be a finite number of heartbeats, at least 1, not {!r}"
COUNT = "must be a whole number >= 1, not {!r}"
HWM = "must be a whole number >= 0 (0: no limit), not {!r}"
NOT_A_NUMBER = "{!r} is not a number"
NOT_WHOLE = "{!r} is not a whole number"
PORT = "port {} is out of range 1-65535"
BASE_PORT = (
    "port {} is out of range: a base port P needs P to P+2 within 1-65535, "
    "so at most 65533"
)

BAD_SECONDS = [
    *((v, SECONDS) for v in ["0", "-1", "nan", "inf", "-inf", "1e999"]),
    ("soon", NOT_A_NUMBER),
]
BAD_HEARTBEATS = [
    *((v, HEARTBEATS) for v in ["0", "0.5", "-2", "nan", "inf"]),
    ("two", NOT_A_NUMBER),
]
BAD_COUNTS = [
    *((v, COUNT) for v in ["0", "-5"]),
    *((v, NOT_WHOLE) for v in ["1.5", "nan", "inf", "many"]),
]
BAD_HWMS = [  # 0 is ZeroMQ's "no limit"
    *((v, HWM) for v in ["-1", "-5"]),
    *((v, NOT_WHOLE) for v in ["1.5", "nan", "inf", "many"]),
]
BAD_BASE_PORTS = [
    *((v, BASE_PORT) for v in ["0", "-1", "65534", "65536"]),
    *((v, NOT_WHOLE) for v in ["1.5", "http"]),
]
BAD_PORTS = [
    *((v, PORT) for v in ["0", "-1", "65536"]),
    *((v, NOT_WHOLE) for v in ["1.5", "http"]),
]

SERVE_OPTIONS = [
    *((name, BAD_SECONDS) for name in ["--heartbeat", "--hugz", "--sync-timeout"]),
    *((name, BAD_SECONDS) for name in ["--pending-age", "--status-interval"]),
    *((name, BAD_SECONDS) for name in ["--applied-horizon", "--snapshot-stall"]),
    ("--peer-expiry", BAD_HEARTBEATS),
    ("--pending-size", BAD_COUNTS),
    ("--applied-limit", BAD_COUNTS),
    ("--backlog-limit", BAD_COUNTS),
    ("--publisher-hwm", BAD_HWMS),
    ("--port", BAD_BASE_PORTS),
    ("--peer-port", BAD_BASE_PORTS),
    ("--state-port", BAD_PORTS),
    ("--peer-state-port", BAD_PORTS),
]
CLIENT_COMMANDS = [
    ["get", "/k"],
    ["set", "/k", "v"],
    ["del", "/k"],
    ["watch"],
    ["dump"],
]


def exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``trioclone ARGV`` in-process; it must exit 2.  Its stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("mode", [["--standalone"], ["--role", "backup"], ["--pair"]])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (option, value, message)
        for option, values in SERVE_OPTIONS
        for value, message in values
    ],
)
def test_serve_rejects_a_bad_number(
    mode: list[str],
    option: str,
    value: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = exits_2(["serve", *mode, f"{option}={value}"], capsys)
    assert f"argument {option}: {message.format(value)}\n" in err


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
@pytest.mark.parametrize(("value", "message"), BAD_SECONDS)
def test_client_commands_reject_a_bad_timeout(
    command: list[str], value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = exits_2([*command, f"--timeout={value}"], capsys)
    assert f"argument --timeout: {message.format(value)}\n" in err


@pytest.mark.parametrize(("value", "message"), BAD_SECONDS)
def test_set_rejects_a_bad_ttl(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = exits_2(["set", "/k", "v", f"--ttl={value}"], capsys)
    assert f"argument --ttl: {message.format(value)}\n" in err


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
@pytest.mark.parametrize("server", ["::1", "tcp://host:0", "tcp://*:5556", "[x]:1"])
def test_client_commands_reject_a_bad_server(
    command: list[str], server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = exits_2([*command, "--server", server], capsys)
    assert "argument --server: " in err


def test_good_numbers_are_parsed() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--role",
            "primary",
            "--port=65533",
            "--peer-port=1",
            "--state-port=65535",
            "--peer-state-port=1",
            "--heartbeat=0.25",
            "--peer-expiry=1",
            "--hugz=1e-3",
            "--sync-timeout=3",
            "--pending-size=1",
            "--pending-age=0.5",
            "--status-interval=86400",
        ]
    )
    assert (args.port, args.peer_port, args.state_port, args.peer_state_port) == (
        65533,
        1,
        65535,
        1,
    )
    assert (args.heartbeat, args.peer_expiry, args.hugz) == (0.25, 1.0, 0.001)
    assert (args.sync_timeout, args.pending_size, args.pending_age) == (3.0, 1, 0.5)
    assert args.status_interval == 86400.0
    put = build_parser().parse_args(
        ["set", "/k", "v", "--ttl", "0.5", "--timeout", "2"]
    )
    assert (put.ttl, put.timeout) == (0.5, 2.0)


@pytest.mark.parametrize("mode", [["--standalone"], ["--role", "backup"], ["--pair"]])
def test_serve_accepts_a_publisher_hwm_of_0_as_its_settings_do(
    mode: list[str],
) -> None:
    """ZeroMQ reads a high-water mark of 0 as no limit; the option, like
    ``ServerSettings.publisher_hwm``, takes it."""
    args = build_parser().parse_args(["serve", *mode, "--publisher-hwm", "0"])
    assert args.publisher_hwm == 0
    role = "primary" if args.pair else "standalone" if args.standalone else args.role
    settings = server_settings(
        args,
        role,
        port=None,
        peer_host="localhost",
        peer_port=None,
        state_port=None,
        peer_state_port=None,
    )
    assert settings.publisher_hwm == 0


@pytest.mark.slow
def test_set_ttl_inf_exits_2_without_a_traceback(pair: Pair) -> None:
    got = cli("set", "/cli/inf", "v", "--ttl", "inf", servers=pair.servers)
    assert got.returncode == 2
    assert "argument --ttl: must be a positive, finite number of seconds" in got.stderr
    assert cli("get", "/cli/inf", servers=pair.servers).returncode == 1  # not written
    assert "Traceback" not in got.stderr


# --------------------------------------------------------------------------
# serve --pair options
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["--peer", "otherhost"], "--peer does not go with --pair"),
        (["--peer", "localhost"], "--peer does not go with --pair"),
        (["--port", "5566"], "the primary's --port (ports 5566-5568) and the backup's"),
        (["--port", "7000", "--peer-port", "7002"], "overlap"),
        (["--peer-port", "5554"], "overlap"),  # 5554-5556 against 5556-5558
        (["--state-port", "5557"], "--state-port (port 5557)"),
        (["--peer-state-port", "5568"], "--peer-state-port (port 5568)"),
        (["--state-port", "6000", "--peer-state-port", "6000"], "overlap"),
    ],
)
def test_serve_pair_rejects_clashing_options(
    options: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = exits_2(["serve", "--pair", *options], capsys)
    assert complaint in err


def test_serve_pair_passes_every_option_to_its_servers() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "--log-level=WARNING",
            "serve",
            "--pair",
            "--bind=127.0.0.1",
            "--port=7000",
            "--peer-port=7010",
            "--state-port=7020",
            "--peer-state-port=7021",
            "--heartbeat=0.5",
            "--peer-expiry=3",
            "--hugz=0.25",
            "--sync-timeout=3",
            "--pending-size=10",
            "--pending-age=4",
            "--status-interval=5",
            "--applied-horizon=90",
            "--applied-limit=5000",
            "--backlog-limit=6000",
            "--snapshot-stall=7",
            "--publisher-hwm=8000",
        ]
    )
    commands = local_pair_commands(args)
    assert set(commands) == {"primary", "backup"}
    expected = {
        "primary": (7000, 7010, 7020, 7021),
        "backup": (7010, 7000, 7021, 7020),
    }
    for role, command in commands.items():
        assert command[:3] == [sys.executable, "-m", "trioclone"]
        child = parser.parse_args(command[3:])
        assert child.log_level == "WARNING"
        assert (child.role, child.bind, child.peer) == (role, "127.0.0.1", "127.0.0.1")
        ports = (child.port, child.peer_port, child.state_port, child.peer_state_port)
        assert ports == expected[role]
        assert (child.heartbeat, child.peer_expiry, child.hugz) == (0.5, 3.0, 0.25)
        assert (child.sync_timeout, child.pending_size) == (3.0, 10)
        assert (child.pending_age, child.status_interval) == (4.0, 5.0)
        assert (child.applied_horizon, child.applied_limit) == (90.0, 5000)
        assert (child.backlog_limit, child.snapshot_stall) == (6000, 7.0)
        assert child.publisher_hwm == 8000


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_serve_defaults_are_the_settings_defaults(role: str) -> None:
    args = build_parser().parse_args(["serve", "--role", role])
    ports = {"port": None, "peer_port": None}
    states = {"state_port": None, "peer_state_port": None}
    settings = server_settings(args, role, peer_host="h", **ports, **states)
    port = 5556 if role == "primary" else 5566
    # the command line keeps the map on disk by default (a library server
    # made from settings keeps it in memory unless given a folder)
    kept = str(default_folder(role, port))
    assert settings == pair_settings(role, peer_host="h", data_dir=kept)
    assert settings.bind == Endpoints.tcp("*", port)


def test_serve_pair_defaults_are_the_guides() -> None:
    commands = local_pair_commands(build_parser().parse_args(["serve", "--pair"]))
    parser = build_parser()
    primary = parser.parse_args(commands["primary"][3:])
    backup = parser.parse_args(commands["backup"][3:])
    assert (primary.port, primary.state_port, primary.peer) == (5556, 5003, "localhost")
    assert (backup.port, backup.state_port, backup.bind) == (5566, 5004, "*")


# --------------------------------------------------------------------------
# exit code 4, and the status line of serve
# --------------------------------------------------------------------------

SEQUENCE = struct.Struct("!q")


@dataclass
class MuteServer:
    """Answers snapshots (an empty map) and sends HUGZ; publishes no write."""

    address: str
    received: list[bytes] = field(default_factory=list)  # keys of KVSETs


@contextlib.contextmanager
def mute_server() -> Iterator[MuteServer]:
    (port,) = free_base_ports(1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router, pub, collector = (
        ctx.socket(kind) for kind in (zmq.ROUTER, zmq.PUB, zmq.SUB)
    )
    collector.setsockopt(zmq.SUBSCRIBE, b"")
    for offset, sock in enumerate((router, pub, collector)):
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{HOST}:{port + offset}")
    server = MuteServer(address(port))
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(collector, zmq.POLLIN)
        while not stop.is_set():
            pub.send_multipart([b"HUGZ", SEQUENCE.pack(0), b"", b"", b""])
            for sock, _ in poller.poll(100):
                frames = sock.recv_multipart()
                if sock is collector:
                    server.received.append(frames[0])
                elif frames[1:2] == [b"ICANHAZ?"]:
                    subtree = frames[2] if len(frames) > 2 else b""
                    kthxbai = [b"KTHXBAI", SEQUENCE.pack(0), b"", b"", subtree]
                    router.send_multipart([frames[0], *kthxbai])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        for sock in (router, pub, collector):
            sock.close(linger=0)
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_an_unconfirmed_write_exits_4() -> None:
    with mute_server() as server:
        started = time.monotonic()
        put = cli("set", "/cli/mute", "v", "--timeout", "2", servers=[server.address])
        assert put.returncode == 4, put.stderr
        assert put.stdout == ""
        assert "not confirmed within 2" in put.stderr
        assert "Traceback" not in put.stderr
        assert time.monotonic() - started < 20
        assert b"/cli/mute" in server.received  # sent, just never published
        deleted = cli("del", "/cli/mute", "--timeout", "1", servers=[server.address])
        assert deleted.returncode == 4, deleted.stderr


STATUS_FIELD = re.compile(r"'(state|sequence|keys)': '?(\w+)'?[,}]")


def status_lines(log: str) -> list[dict[str, str]]:
    """The state, sequence and keys of each status line, in order."""
    return [
        dict(STATUS_FIELD.findall(line))
        for line in log.splitlines()
        if " status {" in line
    ]


#: A status line and when it was logged (``logging``'s asctime, ms).
STATUS_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* status \{")


def status_times(log: str) -> list[float]:
    """When each status line was logged, in seconds."""
    return [
        datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in log.splitlines()
        if (match := STATUS_TIME.match(line))
    ]


@pytest.mark.slow
def test_serve_logs_a_status_line_every_status_interval(procs: Processes) -> None:
    server = start_standalone(procs, "--status-interval", "0.2")
    assert server.wait_for_log("status {", 15), server.log()
    first = status_lines(server.log())[0]
    assert first == {"state": "ACTIVE", "sequence": "0", "keys": "0"}, server.log()
    assert server.port is not None
    put = cli("set", "/cli/status", "v", servers=[address(server.port)])
    assert put.returncode == 0, put.stderr
    sequence = int(put.stdout.split()[-1])
    # a later status line shows the write
    assert server.wait_for_status(10, state="ACTIVE", sequence=sequence, keys=1), (
        server.log()
    )
    assert server.wait_for_log(" status {", 10, count=5), server.log()
    # Every 0.2 s, by the log's own clock: never sooner (to the log's
    # millisecond), and mostly about that (a busy machine delays a few).
    times = status_times(server.log())
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(times))
    assert len(gaps) >= 4, server.log()
    assert gaps[0] >= 0.198, gaps
    assert gaps[len(gaps) // 2] < 0.5, gaps  # not once a minute


def test_a_local_pair_keeps_a_folder_per_server_and_passes_the_fsync_mode(
    tmp_path: Path,
) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--pair", "--data-dir", str(tmp_path), "--fsync", "interval"]
    )
    commands = local_pair_commands(args)
    folders = {}
    for role, command in commands.items():
        child = parser.parse_args(command[3:])
        assert child.fsync == "interval" and not child.reset_data
        folders[role] = child.data_dir
    assert folders == {
        "primary": tmp_path / "primary-5556",
        "backup": tmp_path / "backup-5566",
    }
    memory = local_pair_commands(parser.parse_args(["serve", "--pair", "--in-memory"]))
    assert all(parser.parse_args(c[3:]).in_memory for c in memory.values())


def test_data_dir_and_in_memory_do_not_go_together(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "trioclone", "serve", "--standalone"),
            *("--in-memory", "--data-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was made

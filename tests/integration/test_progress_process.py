"""Progress of ``trioclone load`` and ``dump`` against a real in-memory
server process: shown when stderr is a terminal (a pseudo-terminal here),
never when it is not or with ``--quiet``; stdout the same either way."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from tests.integration.procs import (
    HOST,
    Processes,
    kvset,
    open_socket,
    recv,
    start_standalone,
    tcp,
    wait_snapshot,
)
from trioclone.cli_progress import CLEAR_TO_END

pytestmark = pytest.mark.slow
Context = zmq.Context[zmq.Socket[bytes]]
RUN_TIMEOUT = 30.0
LOADED = 20_000


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trioclone", *args]


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


@contextlib.contextmanager
def running_piped(args: list[str], folder: Path) -> Iterator[Callable[[], Run]]:
    """``python -m trioclone ARGS`` started, stdout and stderr to files (not
    terminals); yields a function that waits for it and returns its run."""
    folder.mkdir()
    out_path, err_path = folder / "stdout", folder / "stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen(
            command(args), stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )

    def finished() -> Run:
        returncode = process.wait(RUN_TIMEOUT)
        return Run(returncode, out_path.read_text(), err_path.read_text())

    try:
        yield finished
    finally:
        stop(process)


def on_terminal(args: list[str], folder: Path) -> Run:
    """``python -m trioclone ARGS`` run, stdout to a file, stderr on the
    slave side of a pseudo-terminal: ``Run.stderr`` is what it showed."""
    folder.mkdir()
    out_path = folder / "stdout"
    master, slave = pty.openpty()
    chunks = []
    try:
        with out_path.open("w") as out:
            process = subprocess.Popen(
                command(args), stdin=subprocess.DEVNULL, stdout=out, stderr=slave
            )
        os.close(slave)
        slave = -1
        try:
            with contextlib.suppress(OSError):  # EIO: every writer closed it
                while data := os.read(master, 65536):
                    chunks.append(data)
            returncode = process.wait(RUN_TIMEOUT)
        finally:
            stop(process)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return Run(returncode, out_path.read_text(), b"".join(chunks).decode())


def drawn(text: str) -> list[str]:
    """What a terminal showed, line by line: each redraw (after a carriage
    return), and the summary left at the end."""
    parts = (part.replace(CLEAR_TO_END, "").strip("\n") for part in text.split("\r"))
    return [part for part in parts if part]


@pytest.fixture
def server(procs: Processes, ctx: Context) -> int:
    """The base port of a standalone in-memory server, answering."""
    process = start_standalone(procs, "--in-memory")
    assert process.port is not None
    wait_snapshot(ctx, process.port)
    return process.port


def test_load_shows_progress_on_a_terminal_only(server: int, tmp_path: Path) -> None:
    dump = tmp_path / "map.json"
    dump.write_text(json.dumps({f"/load/{n:05d}": f"v{n}" for n in range(LOADED)}))
    args = ["load", str(dump), "--server", tcp(server)]
    ok = f"ok, {LOADED} keys written\n"

    shown = on_terminal(args, tmp_path / "shown")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ok
    lines = drawn(shown.stderr)
    count_rate_eta = r"load: [\d,]+/20,000 keys  [\d,]+ keys/s  ETA \d+ (s|min \d+ s)"
    assert any(re.fullmatch(count_rate_eta, line) for line in lines), lines
    assert re.fullmatch(r"load: 20,000 keys in [\d.]+ s, [\d,]+ keys/s", lines[-1])

    # the same load, twice at once (each as long as the one above, or longer)
    with running_piped(args, tmp_path / "piped") as piped:
        quiet = on_terminal([*args, "--quiet"], tmp_path / "quiet")
        plain = piped()
    assert quiet.returncode == 0 and quiet.stdout == ok
    assert quiet.stderr == ""
    assert plain.returncode == 0 and plain.stdout == ok
    assert "\r" not in plain.stderr and "keys/s" not in plain.stderr


def fill(ctx: Context, port: int, count: int) -> dict[str, str]:
    """``count`` keys written raw to the server's collector, all applied on
    return (a marker written after them on the same link came back)."""
    writer = open_socket(ctx, zmq.PUB, [])
    writer.setsockopt(zmq.SNDHWM, 0)  # none dropped: the writer waits instead
    writer.connect(tcp(port + 2))
    markers = open_socket(ctx, zmq.SUB, [port + 1], [b"/marker/"])

    def marker(name: bytes) -> None:
        for _ in range(100):  # until the links are up (a slow joiner)
            writer.send_multipart(kvset(b"/marker/" + name, b"m"))
            while frames := recv(markers, 0.1):
                if frames[0] == b"/marker/" + name:
                    return
        raise TimeoutError(f"marker {name!r} never came back")

    marker(b"first")
    values = {f"/dump/{n:07d}": f"value {n}" for n in range(count)}
    for key, value in values.items():
        writer.send_multipart(kvset(key.encode(), value.encode()))
    marker(b"last")  # in order on one link: everything before it is in
    return {**values, "/marker/first": "m", "/marker/last": "m"}


def test_dump_shows_the_snapshot_received_and_the_total_on_a_terminal(
    server: int, ctx: Context, tmp_path: Path
) -> None:
    """200,000 keys take about a second to sync: the line shows the keys
    received against the server's key count (its status reply), with an
    ETA; stdout is the dump, as ever."""
    values = fill(ctx, server, 200_000)
    total = f"{len(values):,}"
    shown = on_terminal(
        ["dump", "--server", f"tcp://{HOST}:{server}"], tmp_path / "dump"
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [f"{k}={v}" for k, v in sorted(values.items())]
    lines = drawn(shown.stderr)
    received = rf"dump \(snapshot\): [\d,]+/{total} keys  [\d,]+ keys/s  ETA \d+ s"
    assert any(re.fullmatch(received, line) for line in lines), lines
    assert f"dump (snapshot): {total} keys in " in "\n".join(lines)
    # then, if printing took over half a second, the lines written
    printed = [line for line in lines if line.startswith("dump: ")]
    assert all(re.match(rf"dump: [\d,]+(/{total})? lines", line) for line in printed)

    # --timeout is for a server to answer: a snapshot still arriving after
    # it is waited for (200,000 keys take more than 0.5 s to arrive)
    patient = on_terminal(
        ["dump", "--timeout", "0.5", "--quiet", "--server", tcp(server)],
        tmp_path / "patient",
    )
    assert patient.returncode == 0, patient.stderr
    assert patient.stdout == shown.stdout
    assert patient.stderr == ""  # --quiet: nothing on the terminal

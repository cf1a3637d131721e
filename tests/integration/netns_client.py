"""A client process for ``test_partitions.py``, run inside a network namespace.

``ip netns exec NS python tests/integration/netns_client.py --server ...
--server ... --prefix /left --control FILE``: it connects with the blocking
client (``trioclone.connect``) and obeys commands, one a line, that the test
appends to the control file; it reports on stdout, one JSON object a line
after ``@@ ``:

* ``start``: write until ``stop``, one confirmed ``set`` after another, each
  to a new key under the prefix, and every ``--shared-every``-th also to
  the ``--shared`` key; every write is reported (``write``: key, value,
  ``ok``, the sequence it got, the server in use, start and end times).
* ``unshare``: no more writes to the shared key (``unshared`` once none
  is in hand).
* ``stop``: finish the write in hand and stop writing (``stopped``).
* ``set KEY VALUE [SECONDS]``: one confirmed write (waiting at most SECONDS,
  ``--timeout`` by default), reported as above.
* ``await KEY VALUE SECONDS``: wait until the local map holds KEY=VALUE,
  then report the whole map (``map``; ``ok`` false if it never did).
* ``snapshot ENDPOINT SECONDS``: ask ENDPOINT (a server's snapshot socket)
  for its whole map with a raw ``ICANHAZ?`` (no trioclone code), again every
  0.5 s until it answers (a Binary Star vote each time): ``snapshot``.
* ``quit``.

Not a test module; pytest does not collect it.  It imports nothing from
``tests`` (it runs from its own directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

import trioclone

TIMINGS = trioclone.ClientTimings(
    request_timeout=0.5,
    silence_timeout=1.0,  # the servers send HUGZ every 0.25 s in these tests
    backoff=0.25,
    max_backoff=1.0,
    resend_interval=0.5,
)
_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    line = "@@ " + json.dumps({"event": event, **fields})
    with _lock:
        print(line, flush=True)


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "backslashreplace")


class Writer:
    def __init__(self, clone: trioclone.BlockingClient, args: argparse.Namespace):
        self.clone = clone
        self.args = args
        self.count = 0
        self.stopping = threading.Event()
        self.unsharing = threading.Event()
        self.thread: threading.Thread | None = None

    def write(self, key: str, value: str, timeout: float | None = None) -> None:
        started = time.monotonic()
        sequence: int | None = None
        with contextlib.suppress(trioclone.WriteTimeoutError):
            sequence = self.clone.set(key, value, timeout=timeout or self.args.timeout)
        emit(
            "write",
            key=key,
            value=value,
            ok=sequence is not None,
            sequence=sequence,
            server=self.clone.server,
            started=started,
            ended=time.monotonic(),
        )

    def _run(self) -> None:
        args, tag = self.args, self.args.prefix.strip("/")
        while not self.stopping.is_set():
            if self.unsharing.is_set() and args.shared:
                args.shared = ""  # (no write to it is in hand now)
                emit("unshared")
            self.count += 1
            n = self.count
            self.write(f"{args.prefix}/{n:05d}", f"{tag}-{n}-{uuid.uuid4().hex[:6]}")
            if args.shared and n % args.shared_every == 0:
                self.write(args.shared, f"{tag}-shared-{n}")
            self.stopping.wait(args.interval)

    def start(self) -> None:
        if self.thread is None:
            self.stopping.clear()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        thread, self.thread = self.thread, None
        self.stopping.set()
        if thread is not None:
            thread.join(self.args.timeout + 5.0)
        emit(
            "stopped", writes=self.count, alive=thread is not None and thread.is_alive()
        )


def await_value(
    clone: trioclone.BlockingClient, key: str, value: str, seconds: float
) -> None:
    deadline = time.monotonic() + seconds
    wanted = value.encode()
    while (ok := clone.get(key) == wanted) is False and time.monotonic() < deadline:
        time.sleep(0.05)
    emit(
        "map",
        ok=ok,
        items={k: text(v) for k, v in clone.items()},
        sequence=clone.sequence,
        server=clone.server,
        synced=clone.synced,
        failovers=clone.failovers,
    )


def snapshot(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, seconds: float
) -> None:
    """ICANHAZ on a fresh DEALER every 0.5 s until a whole reply arrives."""
    deadline = time.monotonic() + seconds
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(endpoint)
            dealer.send_multipart([b"ICANHAZ?", b""])
            entries: dict[str, str | None] = {}
            until = min(time.monotonic() + 0.5, deadline)
            for _ in range(1_000_000):
                if not dealer.poll(max(int((until - time.monotonic()) * 1000), 0)):
                    break
                key, seq, _uuid, props, body = dealer.recv_multipart()
                if key == b"KTHXBAI":
                    emit(
                        "snapshot",
                        ok=True,
                        endpoint=endpoint,
                        attempts=attempts,
                        sequence=struct.unpack("!q", seq)[0],
                        properties=text(props),
                        items=entries,
                    )
                    return
                entries[key.decode()] = text(body)
                until = time.monotonic() + 0.5  # a reply in progress
        finally:
            dealer.close(linger=0)
    emit("snapshot", ok=False, endpoint=endpoint, attempts=attempts)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", action="append", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--shared", default="")
    parser.add_argument("--shared-every", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.03)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    clone = trioclone.connect(args.server, timings=TIMINGS, sync_timeout=15.0)
    writer = Writer(clone, args)
    emit("ready", server=clone.server)
    offset, give_up = 0, time.monotonic() + args.lifetime  # never outlive a test
    try:
        while time.monotonic() < give_up:
            data = args.control.read_bytes() if args.control.exists() else b""
            end = data.rfind(b"\n") + 1
            commands, offset = data[offset:end].decode().splitlines(), max(offset, end)
            if not commands:
                time.sleep(0.05)
                continue
            for command in commands:
                name, *rest = command.split()
                if name == "start":
                    writer.start()
                elif name == "unshare":
                    writer.unsharing.set()
                elif name == "stop":
                    writer.stop()
                elif name == "set":
                    writer.write(rest[0], rest[1], float(rest[2]) if rest[2:] else None)
                elif name == "await":
                    await_value(clone, rest[0], rest[1], float(rest[2]))
                elif name == "snapshot":
                    snapshot(ctx, rest[0], float(rest[1]))
                elif name == "quit":
                    return 0
                else:
                    emit("error", command=command)
        return 1
    finally:
        writer.stopping.set()
        clone.close()
        ctx.destroy(linger=0)


if __name__ == "__main__":
    sys.exit(main())

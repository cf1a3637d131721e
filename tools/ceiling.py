"""The ceiling: the cheapest CHP server loop pyzmq allows (no Trio, no checks).

    python tools/ceiling.py --port P [--bind 127.0.0.1] [--curve-secret FILE]

Sockets as a Clone server's: ROUTER at P (snapshots), PUB at P+1 (updates),
SUB at P+2 (the collector, subscribed to everything), with the options
trioclone uses by default (collector RCVHWM 100,000, PUB SNDHWM 100,000,
ROUTER SNDHWM 10,000 with ROUTER_MANDATORY so snapshot sends block instead
of dropping).

The loop does only what any CHP server must: take each KVSET off the
collector (five frames, or it is dropped), stamp the next sequence
(``!q``), republish the five frames, store them under the key, and answer
each ICANHAZ with a KVSYNC per stored key under the subtree and a
KTHXBAI.  No other validation, no TTL, no deletes, no HUGZ, no logging.

It moves frames the fastest way pyzmq 27 offers, measured on the bench
machine (five-frame KVSET received, stamped, republished and stored; CPU
per update with the frames already queued):

* ``recv_multipart``/``send_multipart``: 13.7 us (pyzmq's Python checks per
  part: the old baseline's path);
* trioclone's path (``trioclone/_zmq.py``: the Cython ``recv(copy=False)``
  for each frame's ``more`` bit, ``Frame.bytes``, Cython ``send``): 5.5 us;
* Cython ``recv`` with ``copy=True`` and ``RCVMORE`` read per frame: 7.6 us;
* forwarding the received ``Frame`` objects zero-copy: 10 us;
* Cython ``recv``/``send`` with ``copy=True``, five frames, no ``more``
  check at all: 2.4 us.  That trusts every message on the collector to be
  a five-frame KVSET, which a correct server cannot: a short message would
  shift every later one, and a stranger's malformed message would then
  corrupt other clients' writes.

This loop reads each frame's ``more`` bit the cheapest way measured (the
Cython ``recv(copy=False)``, as trioclone does) and drops a message that is
not five frames whole; it sends with the Cython ``send`` and plain int
flags.  So it is the cheapest *correct* loop: what any CHP server must do,
done as cheaply as pyzmq allows.

The loop blocks in ``zmq_poll`` on the collector and the ROUTER, then
drains the collector (at most ``BATCH`` messages) or answers one ICANHAZ.
Polling first costs one ``zmq.Again`` per wake-up; draining both sockets
until both are empty before polling (tried first) costs four, and more CPU
per update at every rate measured (1,000/s to a flood).  Stored frames are
tuples of bytes (the garbage collector stops tracking them).  A reply is
the list of a subtree's records, kept while the sequence stays put, so
many clients asking for one subtree at once cost one scan of the store
(as trioclone shares a scan among them); it is sent frame by frame with
blocking sends, taking no writes meanwhile (a server must keep taking
them: trioclone interleaves; the bench's snapshots have no writes in
flight, so this only makes the ceiling faster).

With ``--curve-secret`` (a secret certificate, as ``trioclone keygen``
writes), all three sockets are CURVE servers with that key pair; with no
ZAP handler, libzmq lets in any client key: the cost measured is CURVE's
encryption alone.  Stopped by SIGTERM or SIGINT (default handlers).
"""

from __future__ import annotations

import argparse
import struct

import zmq
import zmq.auth

BATCH = 4096
COLLECTOR_HWM = 100_000
PUBLISHER_HWM = 100_000
SNAPSHOT_HWM = 10_000

# pyzmq's Cython methods with plain int flags: the Python ``zmq.Socket``
# wrappers and enum flags cost more than the frames themselves.
_recv = zmq.backend.Socket.recv
_send = zmq.backend.Socket.send
_poll = zmq.backend.zmq_poll
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_BLOCK_MORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_SEQUENCE = struct.Struct("!q")
Record = tuple[bytes, bytes, bytes, bytes, bytes]  # key, sequence, UUID, props, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="base port P")
    parser.add_argument("--bind", default="127.0.0.1", help="interface to bind")
    parser.add_argument(
        "--curve-secret", help="secret certificate: every socket a CURVE server"
    )
    args = parser.parse_args()
    serve(args.port, args.bind, args.curve_secret)


def serve(port: int, host: str, curve_secret: str | None = None) -> None:
    ctx = zmq.Context()
    if curve_secret is not None:  # defaults for every socket made below
        public, secret = zmq.auth.load_certificate(curve_secret)
        if secret is None:
            raise SystemExit(f"{curve_secret}: no secret key")
        ctx.setsockopt(zmq.CURVE_SERVER, 1)
        ctx.setsockopt(zmq.CURVE_PUBLICKEY, public)
        ctx.setsockopt(zmq.CURVE_SECRETKEY, secret)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, SNAPSHOT_HWM)
    router.bind(f"tcp://{host}:{port}")
    publisher = ctx.socket(zmq.PUB)
    publisher.setsockopt(zmq.SNDHWM, PUBLISHER_HWM)
    publisher.bind(f"tcp://{host}:{port + 1}")
    collector = ctx.socket(zmq.SUB)
    collector.setsockopt(zmq.RCVHWM, COLLECTOR_HWM)
    collector.setsockopt(zmq.SUBSCRIBE, b"")
    collector.bind(f"tcp://{host}:{port + 2}")
    loop(collector, publisher, router)


def loop(
    collector: zmq.Socket[bytes],
    publisher: zmq.Socket[bytes],
    router: zmq.Socket[bytes],
) -> None:
    recv, send, pack = _recv, _send, _SEQUENCE.pack
    NOBLOCK, MORE = _NOBLOCK, _MORE
    both = [(collector, _POLLIN), (router, _POLLIN)]
    store: dict[bytes, Record] = {}
    # the reply to each subtree asked for, kept while the sequence stays
    # put: many clients asking for one subtree at once cost one scan
    replies: dict[bytes, list[Record]] = {}
    sequence = replied_at = 0
    while True:
        for sock, _events in _poll(both, -1):
            if sock is router:
                try:
                    request = router.recv_multipart(NOBLOCK)
                except zmq.Again:
                    continue
                if len(request) == 3:  # identity, ICANHAZ?, subtree
                    if replied_at != sequence:
                        replies.clear()
                        replied_at = sequence
                    subtree = request[2]
                    if subtree not in replies:
                        replies[subtree] = reply(store, subtree, sequence)
                    answer(router, request[0], replies[subtree])
                continue
            try:
                for _ in range(BATCH):
                    # Each frame's ``more`` bit read (a Frame, not copied):
                    # a message that is not five frames is dropped whole,
                    # never allowed to shift the ones after it.
                    frame = recv(collector, NOBLOCK, False)
                    key = frame.bytes
                    if frame.more:
                        frame = recv(collector, 0, False)  # (ours replaces it)
                        if frame.more:
                            frame = recv(collector, 0, False)
                            uuid = frame.bytes
                            if frame.more:
                                frame = recv(collector, 0, False)
                                props = frame.bytes
                                if frame.more:
                                    frame = recv(collector, 0, False)
                                    body = frame.bytes
                                    if not frame.more:
                                        sequence += 1
                                        stamp = pack(sequence)
                                        send(publisher, key, MORE)
                                        send(publisher, stamp, MORE)
                                        send(publisher, uuid, MORE)
                                        send(publisher, props, MORE)
                                        send(publisher, body, NOBLOCK)
                                        store[key] = (key, stamp, uuid, props, body)
                                        continue
                    while frame.more:  # the rest of a malformed message
                        frame = recv(collector, 0, False)
            except zmq.Again:
                pass


def reply(store: dict[bytes, Record], subtree: bytes, sequence: int) -> list[Record]:
    """The KVSYNCs of the keys under ``subtree``, then KTHXBAI."""
    messages = [frames for key, frames in store.items() if key.startswith(subtree)]
    messages.append((b"KTHXBAI", _SEQUENCE.pack(sequence), b"", b"", subtree))
    return messages


def answer(router: zmq.Socket[bytes], identity: bytes, messages: list[Record]) -> None:
    """Send ``messages`` to ``identity`` with blocking sends (the ROUTER's
    queue to a slow reader fills and this waits)."""
    send, MORE, LAST = _send, _BLOCK_MORE, 0
    try:
        for key, stamp, uuid, props, body in messages:
            send(router, identity, MORE)
            send(router, key, MORE)
            send(router, stamp, MORE)
            send(router, uuid, MORE)
            send(router, props, MORE)
            send(router, body, LAST)
    except zmq.ZMQError:  # the client went away (ROUTER_MANDATORY)
        pass


if __name__ == "__main__":
    main()

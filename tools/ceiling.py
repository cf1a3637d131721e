"""A bare synchronous pyzmq CHP server (no Trio, no checks): the bench baseline.

    python tools/ceiling.py --port P [--bind 127.0.0.1] [--curve-secret FILE]

Sockets as a Clone server's: ROUTER at P (snapshots), PUB at P+1 (updates),
SUB at P+2 (the collector, subscribed to everything), with the options
trioclone uses by default (collector RCVHWM 100,000, PUB SNDHWM 100,000,
ROUTER SNDHWM 10,000 with ROUTER_MANDATORY so snapshot sends block instead
of dropping).

The loop: poll; drain up to 512 KVSETs (each: stamp the next sequence as
``!q``, republish the five frames, store the frames under the key); answer
each ICANHAZ with a KVSYNC per stored key under the subtree and a KTHXBAI,
with blocking sends.  Nothing else: no validation, no TTL, no deletes, no
HUGZ, no logging.  With ``--curve-secret`` (a secret certificate, as
``trioclone keygen`` writes), all three sockets are CURVE servers with that
key pair; with no ZAP handler, libzmq lets in any client key: the cost
measured is CURVE's encryption alone.  It is a baseline, not a ceiling: it uses pyzmq's own
multipart calls, which are slower than trioclone's own, and trioclone
outruns it (see the README).  Stopped by SIGTERM or
SIGINT (default handlers).
"""

from __future__ import annotations

import argparse
import struct

import zmq
import zmq.auth

BATCH = 512
COLLECTOR_HWM = 100_000
PUBLISHER_HWM = 100_000
SNAPSHOT_HWM = 10_000


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

    poller = zmq.Poller()
    poller.register(collector, zmq.POLLIN)
    poller.register(router, zmq.POLLIN)
    pack = struct.Struct("!q").pack
    receive, publish = collector.recv_multipart, publisher.send_multipart
    store: dict[bytes, list[bytes]] = {}
    sequence = 0
    while True:
        ready = dict(poller.poll())
        if collector in ready:
            for _ in range(BATCH):
                try:
                    frames = receive(zmq.NOBLOCK)
                except zmq.Again:
                    break
                sequence += 1
                frames[1] = pack(sequence)
                publish(frames)
                store[frames[0]] = frames
        if router in ready:
            try:
                identity, _command, subtree = router.recv_multipart(zmq.NOBLOCK)
            except (zmq.Again, ValueError):
                continue
            try:
                for key, frames in store.items():
                    if key.startswith(subtree):
                        router.send_multipart([identity, *frames])
                router.send_multipart(
                    [identity, b"KTHXBAI", pack(sequence), b"", b"", subtree]
                )
            except zmq.ZMQError:  # the client went away (ROUTER_MANDATORY)
                pass


if __name__ == "__main__":
    main()

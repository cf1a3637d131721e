"""A relay's mirror of the pair's map, sans-IO.

A relay is a read replica: it follows the pair exactly as a client of the
whole map does (``Replica``: snapshot, stream, gaps, resets, failover), and
keeps what it follows in a ``Store``, so it can answer snapshots the way a
server does.  Its stream is the upstream's own, forwarded as is (see
``trioclone/relay.py``); this core only decides what the relay may say.

Rules
-----
* The mirror serves a snapshot only while it is ``serving``: synced with the
  server it follows, nothing left to catch up, and holding every update the
  relay has forwarded (the shell feeds it what was forwarded before it asks).
  Otherwise a request is not answered, as a passive server does not answer:
  a client gives up after its request timeout and tries its next server.
* A snapshot says the mirror's sequence and the upstream's lineage on
  KTHXBAI, so a relay's snapshot and the stream it forwards name one map.
* The relay never expires a key itself: the upstream publishes each expiry
  as a delete, which the mirror applies like any other update.  Snapshots
  still carry the time each key has left (the ``Store`` counts it down).
"""

from __future__ import annotations

from collections.abc import Sequence

from trioclone.core.chp import LINEAGE, KVMsg, encode_properties, kthxbai
from trioclone.core.replica import Phase, Replica, Timings
from trioclone.core.store import Store

Frames = list[bytes]


class RelayMirror(Replica[Store]):
    """The whole map of the server in use, in a ``Store``."""

    def __init__(self, upstreams: int, timings: Timings) -> None:
        super().__init__(upstreams, (b"",), timings, Store())

    def _new_map(self) -> Store:
        return Store()

    def _put(self, target: Store, msg: KVMsg, now: float) -> None:
        props = encode_properties(msg.properties) if msg.properties else b""
        target.put(msg.key, msg.sequence, msg.uuid, props, msg.body, msg.ttl, now)

    def _updated(self, msg: KVMsg) -> None:
        self.live.sequence = msg.sequence  # (it keys the snapshot's key list)

    def _swapped(self, old: Store, now: float) -> None:
        self.live.sequence = self.sequence

    @property
    def serving(self) -> bool:
        """A snapshot from this mirror now is the upstream's map, complete."""
        return self.phase is Phase.ACTIVE and not self.busy

    def kthxbai(self, subtree: bytes) -> Frames:
        """The end of a snapshot of ``subtree`` taken now."""
        return kthxbai(self.sequence, subtree, {LINEAGE: self.lineage or ""})

    def status(self, upstreams: Sequence[str]) -> dict[str, object]:
        """The mirror's part of the relay's status reply."""
        return {
            "state": "RELAY",
            "role": "relay",
            "serving": self.serving,
            "synced": self.serving,
            "upstream": upstreams[self.server] if self.server >= 0 else None,
            "phase": self.phase.value,
            "sequence": self.sequence,
            "keys": len(self.live),
            "lineage": self.lineage,
        }
